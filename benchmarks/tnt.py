"""TNT training throughput vs a single memory at the local chunk size (CPU, torch path).

    python benchmarks/tnt.py [--T 2048,8192,32768] [--out benchmarks/RESULTS.md]

Titans (rules/titans.mem), B=1, H=4, d_head=64, fp32. TNT: global chunk 2048, one local memory
with chunk 16 and reset 2048, Q-K projection on. Single: the same rule at chunk 16. Forward +
backward of the memory (the layer's projections are the same for both and left out). Medians of
repeats; ratio = single time / TNT time, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import median_time, reexec_with_allocator_settings, report  # noqa: E402

reexec_with_allocator_settings()

import torch  # noqa: E402

import memdsl  # noqa: E402
from memdsl.checking import make_inputs  # noqa: E402
from memdsl.tnt import TNTSchedule, tnt_forward  # noqa: E402


def timed(fn, repeat):
    return median_time(fn, repeat)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="2048,8192,32768")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (20 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rule = memdsl.compile(str(ROOT / "rules" / "titans.mem"))
    schedule = TNTSchedule(2048, ((16, 2048),))
    rows = []
    for T in (int(t) for t in args.T.split(",")):
        tok, gates, params = make_inputs(rule, B=1, T=T, H=4, D=64, dtype=torch.float32)

        def single(tok=tok, gates=gates, params=params):
            q = tok["q"].clone().requires_grad_()
            y, _ = rule(q, tok["k"], tok["v"], gates, params, chunk=16)
            y.sum().backward()

        def tnt(tok=tok, gates=gates, params=params):
            q = tok["q"].clone().requires_grad_()
            y = tnt_forward(rule, [rule], q, tok["k"], tok["v"], gates, params, schedule)
            y.sum().backward()

        t_tnt = timed(tnt, args.repeat)
        t_single = timed(single, args.repeat)
        rows.append((T, t_single, t_tnt))
        print(f"T={T}: single {t_single:.2f} s, TNT {t_tnt:.2f} s, {t_single / t_tnt:.1f}x", file=sys.stderr,
              flush=True)
    table = (f"\n### TNT vs single memory, CPU, {datetime.date.today()} — {os.cpu_count()} cores, "
             f"torch {torch.__version__}\n\n"
             f"Command: `python benchmarks/tnt.py --T {args.T} --repeat {args.repeat}` (titans, B=1, H=4, d_head=64, "
             "fp32, forward+backward of the memory; TNT = global chunk 2048 + one local at chunk 16, reset 2048, "
             "Q-K projection; single = chunk 16).\n\n"
             "| T | single memory, C=16 (s) | TNT (s) | speed-up |\n|---|---|---|---|\n"
             + "\n".join(f"| {T} | {a:.2f} | {b:.2f} | {a / b:.1f}x |" for T, a, b in rows) + "\n")
    report(table, args.out)


if __name__ == "__main__":
    main()
