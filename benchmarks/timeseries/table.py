"""Render results.jsonl (forecast.py) as the markdown table of benchmarks/TIMESERIES.md."""

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
    main(sys.argv[1] if len(sys.argv) > 1 else str(pathlib.Path(__file__).resolve().parent / "results.jsonl"))
