"""Forecast ETTh1 with a 2-D memdsl rule (time x variate): a Chimera/Hydra/2-D Mamba-2 mixer in a small
forecaster, trained for a few steps, checked against the naive forecast (repeat the last value).

    python examples/06_forecast.py --rule chimera --horizon 96 --steps 60

Needs ../shared/data/ltsf/ETTh1.csv.gz (the ETDataset original; see README.md, Data); skips without it.
The full protocol and results table: benchmarks/timeseries/forecast.py and benchmarks/TIMESERIES.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timeseries"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import ltsf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", default="chimera", choices=sorted(ltsf.MODELS))
    ap.add_argument("--horizon", type=int, default=96)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test windows only")
    args = ap.parse_args()
    if ltsf.data_path("ETTh1") is None:
        print("skipped: ../shared/data/ltsf/ETTh1.csv.gz is absent")
        return 0
    torch.set_num_threads(2)
    splits = ltsf.load_splits("ETTh1", 96)
    model = ltsf.build_model(args.rule, 96, args.horizon, splits["train"].shape[1])
    res = ltsf.train_and_test(model, splits, 96, args.horizon, args.steps, args.batch, test_limit=args.test_limit)
    x, y = ltsf.windows(splits["test"], 96, args.horizon)
    x, y = x[:args.test_limit], y[:args.test_limit]
    naive = (x[:, -1:] - y).pow(2).mean().item()
    print(f"{args.rule} ETTh1 horizon {args.horizon}: test MSE {res['mse']:.3f} MAE {res['mae']:.3f} "
          f"(naive last value {naive:.3f}); train {res['train_s']:.0f}s for {args.steps} steps")
    if not res["mse"] < naive:
        print("FAILED: no better than repeating the last value")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
