"""ETTh1 long-term forecasting with memdsl rules (protocol: ../shared/data/README.md; code: ltsf.py).

    nice python benchmarks/timeseries/forecast.py --runs linear:96,192,336,720 chimera:96 --steps 80

Appends one JSON line per (model, horizon) to --out; benchmarks/TIMESERIES.md holds the table.
Skips when ../shared/data is absent.
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
import ltsf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="+", default=["linear:96", "chimera:96"],
                    help="MODEL:H1,H2,... with MODEL one of " + ", ".join(ltsf.MODELS))
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--linear-steps", type=int, default=300, help="steps for the linear-only model")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=8)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results.jsonl"))
    args = ap.parse_args()
    if ltsf.data_path("ETTh1") is None:
        print("skipped: ../shared/data/ltsf/ETTh1.csv.gz is absent")
        return 0
    torch.set_num_threads(2)
    splits = ltsf.load_splits("ETTh1", 96)
    for run in args.runs:
        name, horizons = run.split(":")
        for h in (int(x) for x in horizons.split(",")):
            torch.manual_seed(0)
            model = ltsf.build_model(name, 96, h, splits["train"].shape[1], d_model=args.d_model)
            steps = args.linear_steps if name == "linear" else args.steps
            print(f"{name} horizon {h}: {steps} steps, batch {args.batch}", flush=True)
            res = ltsf.train_and_test(model, splits, 96, h, steps, args.batch, log=lambda s: print(s, flush=True))
            row = {"model": name, "horizon": h, "steps": steps, "batch": args.batch, "d_model": args.d_model,
                   "params": sum(p.numel() for p in model.parameters()), **res,
                   "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                   "date": time.strftime("%Y-%m-%d %H:%M")}
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
