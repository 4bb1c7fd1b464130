"""`memdsl bench`: CPU timings of one rule's backends, side by side (medians of repeats)."""

from __future__ import annotations

import statistics
import time

import torch

from .api import compile as compile_rule
from .checking import make_inputs


def _time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_backends(path: str, B: int = 2, T: int = 256, H: int = 4, D: int = 32, chunk: int | None = None,
                   repeat: int = 3) -> str:
    rule = compile_rule(path, chunk=chunk)
    chunk = chunk or rule.chunk
    tok, gates, params = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=torch.float32)
    backends = ["chunk", "loop"] + (["wy"] if rule.algorithm == "wy" else [])
    rows = []
    for backend in backends:
        def fwd(backend=backend):
            with torch.no_grad():
                rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=chunk, backend=backend)

        def fwd_bwd(backend=backend):
            leaves = {n: t.clone().requires_grad_() for n, t in tok.items()}
            y, _ = rule(leaves["q"], leaves["k"], leaves["v"], gates, params, chunk=chunk, backend=backend)
            y.sum().backward()

        rows.append((backend, _time(fwd, repeat), _time(fwd_bwd, repeat)))
    base = rows[0]
    out = [f"{rule.name} ({rule.algorithm}), B={B} T={T} H={H} D={D} chunk={chunk}, fp32, "
           f"{torch.get_num_threads()} threads, median of {repeat}",
           f"{'backend':<10} {'fwd ms':>10} {'fwd+bwd ms':>12} {'fwd vs chunk':>13}"]
    for name, f, fb in rows:
        out.append(f"{name:<10} {f * 1e3:10.1f} {fb * 1e3:12.1f} {f / base[1]:12.1f}x")
    return "\n".join(out)
