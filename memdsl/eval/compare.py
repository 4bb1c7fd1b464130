"""Paired comparisons between rows of `memdsl eval` tables (the controls of benchmarks/QUALITY.md).

Runs with the same seed see the same training batches and are scored on the same held-out examples
(`runner.EVAL_SEED`), so a control is read per seed: value(A) − value(B) for each seed both have.

    python -m memdsl.eval.compare benchmarks/quality/mqar.csv:omeganet \\
        benchmarks/quality/controls/mqar.csv:omeganet_w1 [--x 64]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Paired:
    a: str
    b: str
    metric: str
    x: str
    seeds: tuple[int, ...]
    values_a: tuple[float, ...]
    values_b: tuple[float, ...]

    @property
    def diffs(self) -> tuple[float, ...]:
        return tuple(va - vb for va, vb in zip(self.values_a, self.values_b, strict=True))

    def line(self) -> str:
        d = self.diffs
        spread = f" ± {statistics.stdev(d):.3f}" if len(d) > 1 else ""
        wins = sum(x > 0 for x in d)
        return (f"{self.a} − {self.b} ({self.metric} @ {self.x}): {statistics.mean(d):+.3f}{spread} over "
                f"{len(d)} seeds; per seed " + ", ".join(f"{x:+.3f}" for x in d) + f"; A higher in {wins}/{len(d)}")


def load(path: str) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _values(rows: list[dict], model: str, x: str | None) -> tuple[str, str, dict[int, float]]:
    mine = [r for r in rows if r["model"] == model]
    if not mine:
        raise ValueError(f"no rows for model {model!r} (models: {sorted({r['model'] for r in rows})})")
    xs = sorted({r["x"] for r in mine}, key=float)
    x = x if x is not None else xs[0]
    picked = {int(r["seed"]): float(r["value"]) for r in mine if r["x"] == x}
    if not picked:
        raise ValueError(f"model {model!r} has no rows at x = {x} (has {xs})")
    return mine[0]["metric"], x, picked


def paired(rows_a: list[dict], model_a: str, rows_b: list[dict], model_b: str, x: str | None = None) -> Paired:
    """value(A) − value(B) per seed, over the seeds both tables ran (at `x`, default the first x of A)."""
    metric, x, va = _values(rows_a, model_a, x)
    metric_b, _, vb = _values(rows_b, model_b, x)
    if metric != metric_b:
        raise ValueError(f"different metrics: {metric} vs {metric_b}")
    seeds = tuple(sorted(set(va) & set(vb)))
    if not seeds:
        raise ValueError(f"{model_a} and {model_b} share no seed")
    return Paired(model_a, model_b, metric, x, seeds, tuple(va[s] for s in seeds), tuple(vb[s] for s in seeds))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="CSV:MODEL")
    p.add_argument("b", help="CSV:MODEL")
    p.add_argument("--x", help="the column (sequence length, chunk) to compare; default the first")
    args = p.parse_args(argv)
    (pa, _, ma), (pb, _, mb) = args.a.partition(":"), args.b.partition(":")
    try:
        print(paired(load(pa), ma, load(pb), mb, args.x).line())
    except (OSError, ValueError) as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
