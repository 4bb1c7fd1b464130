"""MSL / SMAP anomaly detection with memdsl rules (protocol and data: anomaly.py's docstring).

    nice python benchmarks/timeseries/detect.py --datasets MSL SMAP --models chimera pointwise random --steps 200

Models: a 2-D rule (chimera, mamba2d, hydra) as the mixer of a one-step-ahead predictor; `pointwise` (the same
predictor without a mixer: each cell sees only its own current value); `last_value` (the score is the squared
change from the previous row: no model); `random` (uniform random scores: what point adjustment alone gives).
Appends one JSON line per (dataset, model) to --out. Skips when
../shared/data is absent.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
import anomaly  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", nargs="+", default=["MSL", "SMAP"])
    ap.add_argument("--models", nargs="+", default=["chimera", "pointwise", "random"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--d-model", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=1.0, help="anomaly ratio r: threshold at the (100 - r)th percentile")
    ap.add_argument("--tile", default=None, help="override the rule's tile, e.g. 16x16 (a scan2d rule is exact for "
                    "every tile: only the speed changes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results.jsonl"))
    args = ap.parse_args()
    if anomaly.data_path() is None:
        print("skipped: ../shared/data/anomaly/SMAP_MSL.tar.gz is absent")
        return 0
    torch.set_num_threads(args.threads)
    for name in args.datasets:
        data = anomaly.load(name)
        print(f"{name}: train {data['train'].shape}, test {data['test'].shape}, "
              f"anomalous test points {data['labels'].mean():.1%}", flush=True)
        for model_name in args.models:
            t0 = time.perf_counter()
            train_s = 0.0
            if model_name == "random":
                rng = np.random.default_rng(args.seed)
                s_train, s_test = rng.random(len(data["train"])), rng.random(len(data["test"]))
            elif model_name == "last_value":  # predict x[t] by x[t - 1]: no model at all
                s_train, s_test = (np.concatenate([[0.0], ((d[1:] - d[:-1]) ** 2).mean(1)])
                                   for d in (data["train"], data["test"]))
            else:
                torch.manual_seed(args.seed)
                model = anomaly.Predictor(data["train"].shape[1], args.d_model,
                                          None if model_name == "pointwise" else model_name,
                                          tuple(int(x) for x in args.tile.split("x")) if args.tile else None)
                train_s = anomaly.train(model, data["train"], args.window, args.steps, args.batch, seed=args.seed,
                                        log=lambda s: print(s, flush=True))
                s_train = anomaly.score(model, data["train"], args.window)
                s_test = anomaly.score(model, data["test"], args.window)
            m = anomaly.scores_to_metrics(s_train, s_test, data["labels"], args.ratio)
            row = {"bench": "anomaly", "dataset": name, "model": model_name,
                   "steps": 0 if model_name in ("random", "last_value") else args.steps, "batch": args.batch,
                   "window": args.window,
                   "d_model": args.d_model, "tile": args.tile, "ratio": args.ratio, "seed": args.seed, **m,
                   "train_s": train_s,
                   "total_s": time.perf_counter() - t0, "threads": args.threads, "torch": torch.__version__,
                   "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
            print(f"{name} {model_name}: point-adjusted P {m['pa_precision']:.4f} R {m['pa_recall']:.4f} "
                  f"F1 {m['pa_f1']:.4f}; without adjustment F1 {m['raw_f1']:.4f}  ({row['total_s']:.0f}s)",
                  flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
