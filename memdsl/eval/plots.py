"""PNG plots of a task's rows (matplotlib, imported lazily: without it the tables are still written)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

TITLES = {
    "mqar": ("state size (memory floats per sequence)", "MQAR accuracy", "log"),
    "niah": ("evaluation length (tokens)", "needle accuracy", "log"),
    "lm": ("", "", "linear"),
    "chunk": ("evaluation chunk size", "validation loss − loss at the training chunk (nats/byte)", "log"),
}


def _smooth(curve: list[float], k: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(curve):
        acc += v - (curve[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def plot_task(task: str, rows: list[dict], curves: list[tuple], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: tables written, plots skipped")
        return []
    written = []
    if task != "lm":
        xlabel, ylabel, scale = TITLES[task]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for model in dict.fromkeys(r["model"] for r in rows):
            pts: dict[float, list[float]] = {}
            mine = [r for r in rows if r["model"] == model]
            if task == "chunk":  # paired: the same weights at the training chunk (the label's @C) as 0
                ref = {r["seed"]: r["value"] for r in mine if str(r["x"]) == model.rpartition("@")[2]}
                mine = [{**r, "value": r["value"] - ref.get(r["seed"], math.nan)} for r in mine]
            for r in mine:
                pts.setdefault(float(r["state"] if task == "mqar" else r["x"]), []).append(r["value"])
            pts = {x: [v for v in vs if math.isfinite(v)] for x, vs in pts.items()}  # diverged runs: see the table
            xs = sorted(x for x, vs in pts.items() if vs)
            means = [statistics.mean(pts[x]) for x in xs]
            errs = [statistics.stdev(pts[x]) if len(pts[x]) > 1 else 0.0 for x in xs]
            ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=model)
        ax.set_xscale(scale)
        written.append(_finish(fig, ax, xlabel, ylabel, out / f"{task}.png"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_model: dict[tuple, list[list[float]]] = {}
    for model, width, _, curve in curves:
        by_model.setdefault((model, width), []).append(curve)
    for (model, width), cs in by_model.items():
        n = min(len(c) for c in cs)
        mean = [statistics.mean([v for v in (c[i] for c in cs) if math.isfinite(v)] or [math.nan]) for i in range(n)]
        label = model if len({w for _, w in by_model}) == 1 else f"{model} w{width}"
        ax.plot(_smooth(mean), label=label, lw=1)
    return written + [_finish(fig, ax, "training step", "training loss (mean over seeds, smoothed)",
                              out / f"{task}_loss.png")]


def _finish(fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    import matplotlib.pyplot as plt  # lazily, like plot(): the Agg backend is chosen there first
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def replot(out: Path, task: str) -> list[Path]:
    """Redraw a task's plots from its CSV files (`python -m memdsl.eval.plots DIR TASK`)."""
    import csv
    with open(out / f"{task}.csv") as f:
        rows = [{**r, "state": int(r["state"]), "value": float(r["value"])} for r in csv.DictReader(f)]
    curves: dict[tuple, list[float]] = {}
    with open(out / f"{task}_curves.csv") as f:
        for r in csv.DictReader(f):
            curves.setdefault((r["model"], int(r["width"]), int(r["seed"])), []).append(float(r["loss"]))
    return plot_task(task, rows, [(*key, c) for key, c in curves.items()], out)


if __name__ == "__main__":
    import sys
    print(replot(Path(sys.argv[1]), sys.argv[2]))
