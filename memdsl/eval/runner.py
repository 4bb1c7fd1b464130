"""`memdsl eval`: train the same small model around each rule on one task and write the tables.

Each (model, seed[, width]) run trains for `--steps` steps or its share of `--budget-minutes`,
whichever ends first; the table says how many steps every run got. Outputs in `--out`:
`<task>.csv` (one row per run and metric), `<task>.md` (means ± std over seeds),
`<task>_curves.csv` (training loss per step) and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..tnt import TNTSchedule
from .corpus import NAME as CORPUS_NAME
from .corpus import split_corpus
from .model import EvalModel, ModelConfig, ModelSpec, parse_spec
from .tasks import MQAR, NIAH, lm_batch
from .train import TrainResult, accuracy, mean_loss, train

EVAL_SEED = 12345  # every model is scored on the same held-out examples


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _stream(sample, *args) -> Iterator:
    while True:
        yield sample(*args)


class Table:
    """Rows of one task, written as CSV and as a markdown table of means over seeds."""

    def __init__(self, args: argparse.Namespace, specs: list[ModelSpec]):
        self.args, self.specs = args, specs
        self.rows: list[dict] = []
        self.curves: list[tuple[str, int, int, list[float]]] = []  # (model, width, seed, curve)

    def add(self, spec: ModelSpec, width: int, seed: int, res: TrainResult, state: int, metric: str, x, value: float):
        self.rows.append({"model": spec.label, "width": width, "state": state, "seed": seed, "steps": res.steps,
                          "skipped": res.skipped, "seconds": round(res.seconds, 1), "metric": metric, "x": x,
                          "value": round(value, 5)})

    def write(self, out: Path, task: str, started: float, plots: bool = True) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{task}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)
        with open(out / f"{task}_curves.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "width", "seed", "step", "loss"])
            for model, width, seed, curve in self.curves:
                w.writerows([model, width, seed, i, round(v, 5)] for i, v in enumerate(curve))
        (out / f"{task}.md").write_text(self.markdown(task, started))
        if not plots:
            return []
        from .plots import plot_task
        try:
            return plot_task(task, self.rows, self.curves, out)
        except Exception:  # the tables are the result; a plot that fails must not lose them
            traceback.print_exc()
            return []

    def markdown(self, task: str, started: float) -> str:
        a = self.args
        cols = sorted({(r["metric"], r["x"]) for r in self.rows}, key=lambda mx: (mx[0], float(mx[1])))
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault((r["model"], r["width"]), []).append(r)
        head = ["model", "width", "state", "seeds", "steps", "skipped", "s/run"] + [f"{m} @ {x}" for m, x in cols]
        lines = [f"| {' | '.join(head)} |", "|" + " --- |" * len(head)]
        for (model, width), rs in groups.items():
            cells = [model, str(width), str(rs[0]["state"]), str(len({r['seed'] for r in rs})),
                     _mean_std([r["steps"] for r in rs], 0), str(sum(r["skipped"] for r in rs)),
                     _mean_std([r["seconds"] for r in rs], 0)]
            for m, x in cols:
                vals = [r["value"] for r in rs if (r["metric"], r["x"]) == (m, x)]
                cells.append(_mean_std(vals, 3) if vals else "")
            lines.append(f"| {' | '.join(cells)} |")
        argv = sys.argv[sys.argv.index("eval") + 1:] if "eval" in sys.argv else [*a.rules, "--task", task, "..."]
        cmd = "memdsl eval " + " ".join(argv)
        meta = (f"command: `{cmd}`  \nmachine: {_cpu()}, torch "
                f"{torch.__version__}, {a.threads} thread(s); wall time {(time.time() - started) / 60:.1f} min  \n"
                f"model: width {a.widths}, {a.heads} heads, {a.layers} layers, batch {a.batch}, lr {a.lr}, "
                f"≤ {a.steps} steps, budget {a.budget_minutes} min for the table, seeds {a.seeds}")
        if task in ("lm", "chunk", "niah"):
            meta += f"  \ncorpus: {CORPUS_NAME}"
        extra = "\n" + chunk_summary(self.rows, a.train_chunk) if task == "chunk" else ""
        return f"## {task}\n\n{meta}\n\n" + "\n".join(lines) + "\n" + extra


def chunk_summary(rows: list[dict], train_chunk: int) -> str:
    """Paired view of the chunk task: per model, loss at each evaluation chunk minus the loss at the
    training chunk (mean over seeds, same weights), and the best evaluation chunk of every seed."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by_seed: dict[int, dict[int, float]] = {}
        for r in rows:
            if r["model"] == model:
                by_seed.setdefault(int(r["seed"]), {})[int(r["x"])] = float(r["value"])
        chunks = sorted(next(iter(by_seed.values())))
        if train_chunk not in chunks:
            continue
        deltas = [f"{c}: {statistics.mean(v[c] - v[train_chunk] for v in by_seed.values()):+.4f}" for c in chunks]
        best = [min(v, key=v.get) for v in by_seed.values()]
        out.append(f"- {model}: loss − loss@{train_chunk} = " + ", ".join(deltas) + f"; best chunk per seed: {best}")
    return "\n".join(out) + "\n"


def chunk_summary_from_csv(path: str, train_chunk: int) -> str:
    with open(path) as f:
        return chunk_summary(list(csv.DictReader(f)), train_chunk)


def _cpu() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def _mean_std(vals: list[float], digits: int) -> str:
    """Mean ± sample std of the finite values, and how many were not finite (a diverged run)."""
    ok = [v for v in vals if math.isfinite(v)]
    bad = f" ({len(vals) - len(ok)} non-finite)" if len(ok) < len(vals) else ""
    if not ok:
        return "nan" + bad
    if len(ok) == 1:
        return f"{ok[0]:.{digits}f}{bad}"
    return f"{statistics.mean(ok):.{digits}f} ± {statistics.stdev(ok):.{digits}f}{bad}"


def _run_one(args, spec: ModelSpec, cfg: ModelConfig, seed: int, batches: Iterator, max_seconds: float,
             table: Table) -> tuple[EvalModel, TrainResult]:
    torch.manual_seed(seed)
    model = EvalModel(spec, cfg)
    res = train(model, batches, args.steps, max_seconds, args.lr, desc=f"{spec.label} w{cfg.width} s{seed}",
                quiet=args.quiet)
    table.curves.append((spec.label, cfg.width, seed, res.curve))
    return model, res


def _mqar(args, spec: ModelSpec, width: int, seed: int, seq: int, share: float, table: Table) -> None:
    task = MQAR(args.vocab, args.pairs, seq)
    cfg = ModelConfig(args.vocab, width, args.heads, args.layers)
    rng = np.random.default_rng(seed)
    model, res = _run_one(args, spec, cfg, seed, _stream(task.sample, args.batch, rng), share, table)
    x, y = task.sample(512, np.random.default_rng(EVAL_SEED))
    table.add(spec, width, seed, res, model.state_size(), "acc", seq, accuracy(model, x, y))


def _niah(args, spec: ModelSpec, width: int, seed: int, seq: int, share: float, table: Table) -> None:
    task = NIAH()
    train_text, valid_text = split_corpus()
    cfg = ModelConfig(task.vocab, width, args.heads, args.layers)
    rng = np.random.default_rng(seed)
    model, res = _run_one(args, spec, cfg, seed, _stream(task.sample, args.batch, seq, rng, train_text), share, table)
    for length in _ints(args.eval_lengths):  # lengths beyond `seq` test extrapolation
        x, y = task.sample(256, length, np.random.default_rng(EVAL_SEED), valid_text)
        table.add(spec, width, seed, res, model.state_size(), "acc", length, accuracy(model, x, y, batch=32))


def _lm(args, spec: ModelSpec, width: int, seed: int, seq: int, share: float, table: Table) -> None:
    train_text, valid_text = split_corpus()
    if args.task == "chunk":
        spec = ModelSpec(spec.rule, chunk=args.train_chunk)
    cfg = ModelConfig(256, width, args.heads, args.layers)
    rng = np.random.default_rng(seed)
    model, res = _run_one(args, spec, cfg, seed, _stream(lm_batch, train_text, args.batch, seq, rng), share, table)

    def valid() -> Iterator:
        return _stream(lm_batch, valid_text, 16, seq, np.random.default_rng(EVAL_SEED))
    if args.task == "lm":
        table.add(spec, width, seed, res, model.state_size(), "valid_loss", seq, mean_loss(model, valid, 8))
        return
    for chunk in _ints(args.eval_chunks):  # the same weights, read at another chunk size
        model.set_chunk(chunk)
        table.add(spec, width, seed, res, model.state_size(), "valid_loss", chunk, mean_loss(model, valid, 8))


TASKS = {"mqar": _mqar, "niah": _niah, "lm": _lm, "chunk": _lm}


def run(args: argparse.Namespace) -> str:
    """Run one table; returns its markdown and the paths written."""
    torch.set_num_threads(args.threads)
    g, c, s = _ints(args.tnt)
    specs = [parse_spec(r, TNTSchedule(g, ((c, s),)), args.stage2_chunk) for r in args.rules]
    if args.task == "chunk" and any(sp.tnt is not None for sp in specs):
        raise ValueError("the chunk task compares single-memory rules; drop the tnt: specs")
    widths = _ints(args.widths) if args.task == "mqar" else _ints(args.widths)[:1]
    seq = args.seq_len or (64 if args.task == "mqar" else 128)
    share = 60 * args.budget_minutes / (len(specs) * len(widths) * args.seeds)
    table, started = Table(args, specs), time.time()
    out = Path(args.out)
    for spec in specs:
        for width in widths:
            for seed in range(args.seeds):
                try:
                    TASKS[args.task](args, spec, width, seed, seq, share, table)
                except Exception:  # a long table outlives one failing run; the log keeps the traceback
                    print(f"run {spec.label} width {width} seed {seed} failed:", file=sys.stderr)
                    traceback.print_exc()
                if table.rows:
                    table.write(out, args.task, started, plots=False)  # partial results survive a crash
    if not table.rows:
        raise RuntimeError("every run failed (tracebacks above)")
    pngs = table.write(out, args.task, started)
    written = [out / f"{args.task}.{e}" for e in ("md", "csv")] + [out / f"{args.task}_curves.csv"] + pngs
    return (out / f"{args.task}.md").read_text() + "\nwrote " + ", ".join(map(str, written))
