"""Render results.jsonl (forecast.py) as the markdown table of benchmarks/TIMESERIES.md.

    python benchmarks/timeseries/table.py [results.jsonl]            # one row per (model, steps, selection)
    python benchmarks/timeseries/table.py [results.jsonl] --chosen   # per horizon, the run with the lowest
                                                                     # validation MSE, per design and seed
"""

from __future__ import annotations

import json
import pathlib
import sys

PUBLISHED = {  # ETTh1, lookback 96: MSE / MAE at horizons 96, 192, 336, 720 (../shared/data/README.md)
    "iTransformer": [(0.386, 0.405), (0.441, 0.436), (0.487, 0.458), (0.503, 0.491)],
    "PatchTST": [(0.414, 0.419), (0.460, 0.445), (0.501, 0.466), (0.500, 0.488)],
    "TimesNet": [(0.384, 0.402), (0.436, 0.429), (0.491, 0.469), (0.521, 0.500)],
    "DLinear": [(0.386, 0.400), (0.437, 0.432), (0.481, 0.459), (0.519, 0.516)],
}
HORIZONS = (96, 192, 336, 720)


DEFAULT = {"d_model": 8, "layers": 1, "mlp": 0, "dt_bias": None, "cycle": 0, "ema": 0.0, "dropout": 0.0,
           "weight_decay": 0.0, "batch": 16, "patience": 0, "mixer_lr": None, "head_rank": 0, "zero_head": False,
           "two_stage": False}  # forecast.py's defaults of what --chosen keeps apart (the design)


def design(r: dict) -> str:
    """The model-design and training-regime options of a row that differ from forecast.py's defaults (lr and
    steps are not design: --chosen picks them per horizon)."""
    return ", ".join(f"{k} {r[k]}" for k in DEFAULT if r.get(k, DEFAULT[k]) != DEFAULT[k])


def chosen(path: str) -> None:
    """Per (model, design, seed) and horizon, the best-validation run with the lowest validation MSE: the
    per-horizon choice of lr and steps on validation (TIMESERIES.md, second and third sessions)."""
    best: dict[tuple, dict[int, dict]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        r = json.loads(line)
        if "bench" in r or "val_mse" not in r:
            continue
        by_h = best.setdefault((r["model"], design(r), r.get("seed", 0)), {})
        if r["horizon"] not in by_h or r["val_mse"] < by_h[r["horizon"]]["val_mse"]:
            by_h[r["horizon"]] = r
    print("| model | design | seed | " + " | ".join(f"{h} MSE / MAE (val; lr, steps)" for h in HORIZONS)
          + " | avg MSE |")
    print("| --- | --- | ---: | " + " | ".join("---:" for _ in HORIZONS) + " | ---: |")
    for (model, des, seed), by_h in best.items():
        cells = [f"{r['mse']:.3f} / {r['mae']:.3f} ({r['val_mse']:.4f}; {r.get('lr', 1e-3):g}, {r['steps']})"
                 if (r := by_h.get(h)) else "—" for h in HORIZONS]
        avg = f"{sum(by_h[h]['mse'] for h in HORIZONS) / 4:.3f}" if all(h in by_h for h in HORIZONS) else "—"
        print(f"| memdsl {model} | {des or 'default'} | {seed} | " + " | ".join(cells) + f" | {avg} |")


def main(path: str) -> None:
    rows: dict[str, dict[int, dict]] = {}
    for line in pathlib.Path(path).read_text().splitlines():
        r = json.loads(line)
        if "bench" in r:  # the other benchmarks' rows (hydra_train, anomaly, pigcvp)
            continue
        key = f"{r['model']} ({r['steps']} steps{', best validation' if r.get('val_every') else ''})"
        rows.setdefault(key, {})[r["horizon"]] = r  # the last run of a (model, steps, horizon) counts
    print("| model | " + " | ".join(f"{h} MSE / MAE" for h in HORIZONS) + " | avg MSE | train s (per run) |")
    print("| --- | " + " | ".join("---:" for _ in HORIZONS) + " | ---: | --- |")
    for name, by_h in rows.items():
        cells = [f"{by_h[h]['mse']:.3f} / {by_h[h]['mae']:.3f}" if h in by_h else "—" for h in HORIZONS]
        avg = f"{sum(by_h[h]['mse'] for h in HORIZONS) / 4:.3f}" if all(h in by_h for h in HORIZONS) else "—"
        secs = ", ".join(f"{by_h[h]['train_s']:.0f}" for h in HORIZONS if h in by_h)
        print(f"| memdsl {name} | " + " | ".join(cells)
              + f" | {avg} | {secs} |")
    for name, vals in PUBLISHED.items():
        cells = [f"{m:.3f} / {a:.3f}" for m, a in vals]
        print(f"| {name} (published) | " + " | ".join(cells) + f" | {sum(m for m, _ in vals) / 4:.3f} | — |")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--chosen"]
    src = args[0] if args else str(pathlib.Path(__file__).resolve().parent / "results.jsonl")
    chosen(src) if "--chosen" in sys.argv else main(src)
