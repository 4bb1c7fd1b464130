"""TNT training throughput vs a single memory at the local chunk size (CPU, torch path).

    python benchmarks/tnt.py [--T 2048,8192,32768] [--repeat 5] [--threads N] [--out benchmarks/RESULTS.md]

Titans (rules/titans.mem), B=1, H=4, d_head=64, fp32. TNT: global chunk 2048, one local memory
with chunk 16 and reset 2048, Q-K projection on. Single: the same rule at chunk 16. Forward +
backward of the memory (the layer's projections are the same for both and left out). Medians of
repeats, taken round-robin (each repeat times every case in turn, so a change of load on a shared
machine hits all of them alike); ratio = single time / TNT time. Where TNT's time goes is
timed too: the global memory alone (chunk-start reads at C_G), the locals alone (Q-K projection
included) and the Q-K projection alone. Before timing, the lowered hierarchy is checked against the
token-by-token reference on a small case.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.common import reexec_with_allocator_settings, report  # noqa: E402

reexec_with_allocator_settings()

import torch  # noqa: E402

import memdsl  # noqa: E402
from memdsl.checking import make_inputs, rel_rms  # noqa: E402
from memdsl.tnt import TNTSchedule, _gates_for, _params_for, qk_project, tnt_forward, tnt_locals, tnt_reference  # noqa: E402,E501


def check(rule) -> float:
    """Lowered TNT vs the token reference (fp64, a small hierarchy of the same shape: C_G = 2 S_L, S_L = 8 C_L)."""
    tok, gates, params = make_inputs(rule, B=1, T=70, H=2, D=8)
    schedule = TNTSchedule(32, ((2, 16),))
    y = tnt_forward(rule, [rule], tok["q"], tok["k"], tok["v"], gates, params, schedule)
    return rel_rms(y, tnt_reference(rule, [rule], tok["q"], tok["k"], tok["v"], gates, params, schedule))


def cases(rule, schedule, tok, gates, params) -> dict:
    """The runs to time, each a function of q: the two candidates and TNT's parts."""
    k, v = tok["k"], tok["v"]
    g_gates, g_params = _gates_for(rule, gates, "global"), _params_for(rule, params, "global")
    (chunk, reset), = schedule.locals
    return {
        "single": lambda q: rule(q, k, v, gates, params, chunk=chunk)[0],
        "tnt": lambda q: tnt_forward(rule, [rule], q, k, v, gates, params, schedule),
        "global": lambda q: rule(q, k, v, g_gates, g_params, chunk=schedule.global_chunk, read_order="chunk_start")[0],
        "locals": lambda q: tnt_locals([rule], q, k, v, gates, params, schedule),
        "qk": lambda q: qk_project(q, k, reset),  # as the locals compute it
    }


def round_robin(fns: dict, tok, repeat: int) -> dict[str, tuple[float, float, float]]:
    """(median, min, max) seconds of forward + backward per case, after one warm-up of each."""
    def run(fn) -> float:
        q = tok["q"].clone().requires_grad_()
        t0 = time.perf_counter()
        fn(q).sum().backward()
        return time.perf_counter() - t0

    for fn in fns.values():
        run(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(run(fn))
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="2048,8192,32768")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resource.setrlimit(resource.RLIMIT_AS, (20 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rule = memdsl.compile(str(ROOT / "rules" / "titans.mem"))
    err = check(rule)
    assert err < 1e-10, f"TNT lowering differs from its token reference: rel. RMS {err:.3g}"
    schedule = TNTSchedule(2048, ((16, 2048),))
    rows = []
    for T in (int(t) for t in args.T.split(",")):
        tok, gates, params = make_inputs(rule, B=1, T=T, H=4, D=64, dtype=torch.float32)
        times = round_robin(cases(rule, schedule, tok, gates, params), tok, args.repeat)
        for name, (med, lo, hi) in times.items():
            print(f"T={T} {name}: {med:.3f} s (min {lo:.3f}, max {hi:.3f})", file=sys.stderr, flush=True)
        rows.append((T, times))
    threads = torch.get_num_threads()
    table = (f"\n### TNT vs single memory, CPU, {datetime.date.today()} — {cpu_name()}, {os.cpu_count()} cores, "
             f"{threads} threads, torch {torch.__version__}\n\n"
             f"Command: `python benchmarks/tnt.py --T {args.T} --repeat {args.repeat}"
             f"{f' --threads {args.threads}' if args.threads else ''}` (titans, B=1, H=4, d_head=64, fp32, "
             "forward+backward of the memory; TNT = global chunk 2048 + one local at chunk 16, reset 2048, "
             "Q-K projection; single = chunk 16; BENCH.md allocator settings; medians of "
             f"{args.repeat} round-robin repeats after a warm-up; lowering checked against the token reference: "
             f"{err:.1e}).\n\n"
             "| T | single, C=16 (s) | TNT (s) | speed-up | TNT parts: global C_G (s) | locals (s) | "
             "of which Q-K proj. (s) |\n|---|---|---|---|---|---|---|\n"
             + "\n".join(f"| {T} | {t['single'][0]:.2f} | {t['tnt'][0]:.2f} | {t['single'][0] / t['tnt'][0]:.2f}x | "
                         f"{t['global'][0]:.2f} | {t['locals'][0]:.2f} | {t['qk'][0]:.2f} |" for T, t in rows)
             + "\n")
    report(table, args.out)


if __name__ == "__main__":
    main()
