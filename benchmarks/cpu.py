"""CPU benchmark: memdsl's anchored chunk program vs its exact token loop vs titans-pytorch.

    python benchmarks/cpu.py [--T 2048] [--repeat 5] [--out benchmarks/RESULTS.md]

Configuration cpu-small (../shared/BENCH.md): B=2, H=4, d_head=64, T=2048, C in {16, 64}; Titans
with a 2-layer MLP memory (rules/titans.mem, expansion 4) and with a linear memory
(rules/titans_linear.mem). memdsl runs its torch chunk program (`backend="chunk"`) and the
torch-printed tile programs (`backend="tiles"`, codegen/tile_torch.py: a generated backward).
Peers: `titans_pytorch.NeuralMemory` with `chunk_size=1, batch_size=C` (gradients anchored per C
tokens, the same model class as memdsl's) and with its cheaper default `chunk_size=C` (one anchor
per call). Every candidate runs in its own subprocess (a peer that exhausts the address-space cap
cannot starve the next one), one after the other in one run; ratios are taken between those
medians. The glibc allocator variables of BENCH.md are set for every candidate (the script
re-executes itself with them). FLOPs of each memdsl forward being timed are counted by torch's
FlopCounterMode.
"""

from __future__ import annotations

import argparse
import datetime
import json
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
        if train:  # every input needs its gradient, gates too: in training they come from learned projections
            # (titans-pytorch's fwd+bwd computes its gate projections' gradients); a program that skipped them
            # would be timed on less work than its peers
            leaves = {n: t.clone().requires_grad_() for n, t in tok.items()}
            g = {n: t.clone().requires_grad_() for n, t in gates.items()}
            y, _ = rule(leaves["q"], leaves["k"], leaves["v"], g, chunk=chunk, backend=backend)
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


MEMDSL = {"memdsl chunk": "chunk", "memdsl tiles": "tiles"}
CANDIDATES = [*MEMDSL, "memdsl exact loop", "titans-pytorch same semantics", "titans-pytorch default"]
RULES = (("titans", 2), ("titans_linear", 1))


def run_candidate(args) -> dict:
    """One candidate of one configuration, in this (child) process: median times, and for memdsl's chunk
    programs the FLOPs of the forward being timed and its error against the anchored token loop."""
    B, T, H, D, chunk, name = args.B, args.T, args.H, args.D, args.chunk, args.candidate
    depth = dict(RULES)[args.rule]
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, resource.getrlimit(resource.RLIMIT_AS)[1]))
    rule = memdsl.compile(str(ROOT / "rules" / f"{args.rule}.mem"))
    tok, gates, _ = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=torch.float32)
    out: dict = {}
    if name in MEMDSL:
        backend = MEMDSL[name]
        # correctness first: the chunk program against the anchored token loop on a prefix, with a gradient
        # asked for (the tile programs' forward runs as it does in training)
        short = {n: t[:, :4 * chunk].clone().requires_grad_() for n, t in tok.items()}
        g_short = {n: g[:, :4 * chunk] for n, g in gates.items()}
        y_ref, _ = rule(short["q"], short["k"], short["v"], g_short, chunk=chunk, backend="anchored_loop")
        y_got, _ = rule(short["q"], short["k"], short["v"], g_short, chunk=chunk, backend=backend)
        out["err"] = rel_rms(y_got.detach(), y_ref.detach())
        assert out["err"] < 1e-4, out["err"]
        with FlopCounterMode(display=False, custom_mapping=INPLACE_GEMMS) as fc:
            memdsl_runner(rule, tok, gates, backend, chunk, False)()
        out["flops"] = fc.get_total_flops()
        fwd, train, rep = (memdsl_runner(rule, tok, gates, backend, chunk, False),
                           memdsl_runner(rule, tok, gates, backend, chunk, True), args.repeat)
    elif name == "memdsl exact loop":
        fwd, train, rep = (memdsl_runner(rule, tok, gates, "loop", chunk, False),
                           memdsl_runner(rule, tok, gates, "loop", chunk, True), args.loop_repeat)
    else:
        same = name == "titans-pytorch same semantics"
        fwd, train, rep = (titans_runner(depth, chunk, same, B, T, H, D, False),
                           titans_runner(depth, chunk, same, B, T, H, D, True), args.repeat)
    out["fwd"], out["train"] = guarded(fwd, rep), guarded(train, rep)
    return out


def in_subprocess(args, rule_name: str, chunk: int, name: str) -> dict:
    cmd = [sys.executable, __file__, "--candidate", name, "--rule", rule_name, "--chunk", str(chunk),
           "--B", str(args.B), "--T", str(args.T), "--H", str(args.H), "--D", str(args.D),
           "--repeat", str(args.repeat), "--loop-repeat", str(args.loop_repeat)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(done.stderr)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {rule_name} C={chunk} {name}: child exited {done.returncode}", file=sys.stderr, flush=True)
        return {"fwd": None, "train": None}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--chunks", default="16,64")
    ap.add_argument("--repeat", type=int, default=5)
    # BENCH.md asks for >= 5 repeats; one sample of the exact loop's ~16 GiB backward once took 20 s instead of 3.5 s
    ap.add_argument("--loop-repeat", type=int, default=5, help="repeats of the slow exact loop")
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of the candidates")
    ap.add_argument("--out", default=None, help="append the table to this markdown file")
    ap.add_argument("--candidate", help=argparse.SUPPRESS)  # child mode: one candidate, JSON on stdout
    ap.add_argument("--rule", help=argparse.SUPPRESS)
    ap.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.candidate:
        print(json.dumps(run_candidate(args)))
        return
    B, T, H, D = args.B, args.T, args.H, args.D
    chosen = [c for c in CANDIDATES if c in args.candidates.split(",")]
    peak = matmul_rate()
    rows = []
    for rule_name, _ in RULES:
        for chunk in (int(c) for c in args.chunks.split(",")):
            times = {}
            for name in chosen:
                times[name] = in_subprocess(args, rule_name, chunk, name)
                r = times[name]
                print(f"{rule_name} C={chunk} {name}: fwd {fmt(r['fwd'])} ms, fwd+bwd {fmt(r['train'])} ms",
                      file=sys.stderr, flush=True)
            base = times.get("memdsl chunk") or next(iter(times.values()))
            for name, r in times.items():
                util = r["flops"] / r["fwd"] / peak if r.get("flops") and r["fwd"] else None
                rows.append((rule_name, chunk, name, r["fwd"], r["train"], ratio(r["fwd"], base["fwd"] or 1),
                             ratio(r["train"], base["train"] or 1), util))
    header = ("| rule | C | candidate | fwd ms | fwd+bwd ms | fwd / memdsl chunk | fwd+bwd / memdsl chunk | "
              "memdsl fwd FLOP rate / fp32 matmul peak |\n|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        util = f"{100 * r[7]:.0f}%" if r[7] is not None else ""
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {fmt(r[3])} | {fmt(r[4])} | {r[5]} | {r[6]} | {util} |")
    chosen = f" --candidates '{args.candidates}'" if args.candidates != ",".join(CANDIDATES) else ""
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    meta = (f"\n### CPU, {datetime.date.today()} — {cpu or platform.processor()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n"
            f"Command: `python benchmarks/cpu.py --T {T} --repeat {args.repeat} --loop-repeat {args.loop_repeat}"
            f"{chosen}` (B={B}, H={H}, d_head={D}, fp32; fwd+bwd: the gradients of q, k, v and every gate for "
            f"memdsl, of the input and every parameter for titans-pytorch; "
            f"glibc allocator variables of BENCH.md set for every candidate; every candidate in its own subprocess, "
            f"address space capped at {MEMORY_CAP >> 30} GiB so a peer that needs more is reported, not killed). "
            f"Measured fp32 matmul rate (2048³): {peak / 1e9:.1f} GFLOP/s. Before timing, each memdsl chunk "
            f"program was checked against its anchored token loop on the first 4 chunks (relative RMS ≤ 1e-4).\n\n")
    table = meta + "\n".join(lines) + "\n"
    report(table, args.out)


if __name__ == "__main__":
    main()
