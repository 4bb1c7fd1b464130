"""CPU benchmark: memdsl's anchored chunk program vs its exact token loop vs titans-pytorch.

    python benchmarks/cpu.py [--T 2048] [--repeat 5] [--out benchmarks/RESULTS.md]

Configuration cpu-small (../shared/BENCH.md): B=2, H=4, d_head=64, T=2048, C in {16, 64}; Titans
with a 2-layer MLP memory (rules/titans.mem, expansion 4) and with a linear memory
(rules/titans_linear.mem). Peers: `titans_pytorch.NeuralMemory` with `chunk_size=1, batch_size=C`
(gradients anchored per C tokens, the same model class as memdsl's) and with its cheaper default
`chunk_size=C` (one anchor per call). Ratios are measured side by side in one run; medians of
repeats. The glibc allocator variables of BENCH.md are set for every candidate (the script
re-executes itself with them). FLOPs of the memdsl forward are counted by torch's FlopCounterMode.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(ROOT))
from benchmarks.common import median_time, reexec_with_allocator_settings, report  # noqa: E402

reexec_with_allocator_settings()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import memdsl  # noqa: E402
from memdsl.checking import make_inputs, rel_rms  # noqa: E402

MEMORY_CAP = 18 << 30  # bytes; a candidate that needs more is reported as out of memory


def guarded(fn, repeat: int) -> float | None:
    """Median time, or None when the candidate runs out of the memory cap."""
    try:
        return median_time(fn, repeat)[0]
    except (RuntimeError, MemoryError) as err:
        # under the address-space cap an allocation fails as "... alloc ..." in torch, and as "could not
        # create a primitive" when oneDNN cannot get its scratch buffers
        text = str(err).lower()
        if not isinstance(err, MemoryError) and "alloc" not in text and "could not create a primitive" not in text:
            raise
        print(f"  out of memory: {str(err).splitlines()[0][:120]}", file=sys.stderr, flush=True)
        return None


def fmt(t: float | None) -> str:
    return "out of memory" if t is None else f"{t * 1e3:.0f}"


def ratio(t: float | None, base: float) -> str:
    return "–" if t is None else f"{t / base:.1f}x"


def _batched_gemm_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    batch, m, k = a_shape
    return 2 * batch * m * k * b_shape[-1]


# FlopCounterMode has no entry for the in-place GEMM the chunk program updates its state with
# (`baddbmm_`): without this it counts those FLOPs as zero and understates the rate.
INPLACE_GEMMS = {torch.ops.aten.baddbmm_: _batched_gemm_flops}


def matmul_rate(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t, _, _ = median_time(lambda: a @ b, repeat)
    return 2 * n**3 / t


def memdsl_runner(rule, tok, gates, backend, chunk, train: bool):
    def run():
        if train:
            leaves = {n: t.clone().requires_grad_() for n, t in tok.items()}
            y, _ = rule(leaves["q"], leaves["k"], leaves["v"], gates, chunk=chunk, backend=backend)
            y.sum().backward()
        else:
            with torch.no_grad():
                rule(tok["q"], tok["k"], tok["v"], gates, chunk=chunk, backend=backend)
    return run


def titans_runner(depth: int, chunk: int, same_semantics: bool, B: int, T: int, H: int, D: int, train: bool):
    from titans_pytorch import MemoryMLP, NeuralMemory
    kw = dict(chunk_size=1, batch_size=chunk) if same_semantics else dict(chunk_size=chunk)
    mem = NeuralMemory(dim=H * D, heads=H, dim_head=D, model=MemoryMLP(D, depth=depth, expansion_factor=4.0),
                       mem_model_norm_add_residual=False, **kw)
    seq = torch.randn(B, T, H * D)

    def run():
        if train:
            x = seq.clone().requires_grad_()
            out, _ = mem(x)
            out.sum().backward()
        else:
            with torch.no_grad():
                mem(seq)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--chunks", default="16,64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--loop-repeat", type=int, default=1, help="repeats of the slow exact loop")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    args = ap.parse_args()
    B, T, H, D = args.B, args.T, args.H, args.D
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, resource.getrlimit(resource.RLIMIT_AS)[1]))
    peak = matmul_rate()
    rows = []
    for rule_name, depth in (("titans", 2), ("titans_linear", 1)):
        for chunk in (int(c) for c in args.chunks.split(",")):
            rule = memdsl.compile(str(ROOT / "rules" / f"{rule_name}.mem"))
            tok, gates, _ = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=torch.float32)
            # correctness first: the chunk program against the anchored token loop on a prefix
            short = {n: t[:, :4 * chunk] for n, t in tok.items()}
            g_short = {n: g[:, :4 * chunk] for n, g in gates.items()}
            y_ref, _ = rule(short["q"], short["k"], short["v"], g_short, chunk=chunk, backend="anchored_loop")
            y_got, _ = rule(short["q"], short["k"], short["v"], g_short, chunk=chunk)
            err = rel_rms(y_got, y_ref)
            assert err < 1e-4, err
            with FlopCounterMode(display=False, custom_mapping=INPLACE_GEMMS) as fc:
                memdsl_runner(rule, tok, gates, "chunk", chunk, False)()
            flops = fc.get_total_flops()
            cands = {
                "memdsl chunk": (memdsl_runner(rule, tok, gates, "chunk", chunk, False),
                                 memdsl_runner(rule, tok, gates, "chunk", chunk, True), args.repeat),
                "memdsl exact loop": (memdsl_runner(rule, tok, gates, "loop", chunk, False),
                                      memdsl_runner(rule, tok, gates, "loop", chunk, True), args.loop_repeat),
                "titans-pytorch same semantics": (titans_runner(depth, chunk, True, B, T, H, D, False),
                                                  titans_runner(depth, chunk, True, B, T, H, D, True), args.repeat),
                "titans-pytorch default": (titans_runner(depth, chunk, False, B, T, H, D, False),
                                           titans_runner(depth, chunk, False, B, T, H, D, True), args.repeat),
            }
            times = {}
            for name, (fwd, train, rep) in cands.items():
                times[name] = (guarded(fwd, rep), guarded(train, rep))
                print(f"{rule_name} C={chunk} {name}: fwd {fmt(times[name][0])} ms, "
                      f"fwd+bwd {fmt(times[name][1])} ms", file=sys.stderr, flush=True)
            base = times["memdsl chunk"]
            for name, (f, fb) in times.items():
                rows.append((rule_name, chunk, name, f, fb, ratio(f, base[0]), ratio(fb, base[1]),
                             flops / base[0] / peak if name == "memdsl chunk" else None, err))
    header = ("| rule | C | candidate | fwd ms | fwd+bwd ms | fwd / memdsl | fwd+bwd / memdsl | "
              "memdsl fwd FLOP rate / fp32 matmul peak |\n|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        util = f"{100 * r[7]:.0f}%" if r[7] is not None else ""
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {fmt(r[3])} | {fmt(r[4])} | {r[5]} | {r[6]} | {util} |")
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    meta = (f"\n### CPU, {datetime.date.today()} — {cpu or platform.processor()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
            f"Command: `python benchmarks/cpu.py --T {T} --repeat {args.repeat}` (B={B}, H={H}, d_head={D}, fp32, "
            f"glibc allocator variables of BENCH.md set for every candidate; address space capped at "
            f"{MEMORY_CAP >> 30} GiB so a peer that needs more is reported, not killed). Measured fp32 matmul rate "
            f"(2048³): {peak / 1e9:.1f} GFLOP/s. Before timing, memdsl's chunk program was checked against "
            f"its anchored token loop on the first 4 chunks (relative RMS ≤ 1e-4).\n\n")
    table = meta + "\n".join(lines) + "\n"
    report(table, args.out)


if __name__ == "__main__":
    main()
