"""Detect anomalies in NASA MSL (or SMAP) telemetry with a 2-D memdsl rule: a one-step-ahead predictor whose
mixer is Chimera (time x variate), scored by its prediction error, evaluated with the literature's
point-adjusted F1 (threshold at the 99th percentile of train + test scores; protocol: benchmarks/timeseries/
anomaly.py). Checks itself: the trained predictor beats repeating the last value on the test rows.

    python examples/07_anomaly.py --dataset MSL --steps 40

Needs ../shared/data/anomaly/SMAP_MSL.tar.gz (telemanom, Hundman et al. 2018; see README.md, Data); skips
without it. Full runs and the table: benchmarks/timeseries/detect.py and benchmarks/TIMESERIES.md.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "timeseries"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import anomaly  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="MSL", choices=["MSL", "SMAP"])
    ap.add_argument("--rule", default="chimera")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--rows", type=int, default=None, help="use the first N train and test rows only (quick checks)")
    args = ap.parse_args()
    if anomaly.data_path() is None:
        print("skipped: ../shared/data/anomaly/SMAP_MSL.tar.gz is absent")
        return 0
    torch.set_num_threads(1)
    data = {k: v[:args.rows] for k, v in anomaly.load(args.dataset).items()}
    torch.manual_seed(0)
    model = anomaly.Predictor(data["train"].shape[1], 8, args.rule, (16, 16))
    anomaly.train(model, data["train"], args.window, args.steps, args.batch)
    s_train, s_test = anomaly.score(model, data["train"], args.window), anomaly.score(model, data["test"], args.window)
    m = anomaly.scores_to_metrics(s_train, s_test, data["labels"])
    test = torch.from_numpy(data["test"])
    naive = (test[1:] - test[:-1]).pow(2).mean().item()
    print(f"{args.dataset} ({len(data['test'])} test rows, {data['labels'].mean():.1%} anomalous), {args.rule}: "
          f"point-adjusted P {m['pa_precision']:.3f} R {m['pa_recall']:.3f} F1 {m['pa_f1']:.3f}; unadjusted F1 "
          f"{m['raw_f1']:.3f}; test prediction MSE {s_test[1:].mean():.4f} (repeat last value {naive:.4f})")
    if not s_test[1:].mean() < naive:
        print("FAILED: the predictor is no better than repeating the last value")
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
