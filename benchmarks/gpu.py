"""GPU benchmark (run by benchmarks/gpu_check.sh on an H200): medians by triton.testing.do_bench.

For each shape (B, T, H, D) in (8, 2048, 16, 64), (2, 8192, 16, 128), (1, 32768, 16, 128):
fwd and fwd+bwd medians of memdsl's generated Triton kernels (forward and generated backward) vs
memdsl's torch chunk program, for TTT-Linear, the gated delta rule (WY), Titans (MLP memory,
momentum) and Titans linear; ATLAS on the torch path (it has no kernel yet); the peers
flash-linear-attention `chunk_ttt_linear` / `chunk_gated_delta_rule` and titans-pytorch's
NeuralMemory when their wheels are installed (a row says why when a peer is missing or fails).
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
from codegen.triton_run import kernel_reason  # noqa: E402
from memdsl.checking import make_inputs  # noqa: E402

SHAPES = [(8, 2048, 16, 64), (2, 8192, 16, 128), (1, 32768, 16, 128)]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=50, return_mode="median")


def bf16_peak() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: a @ a)
    return 2 * 8192**3 / (ms * 1e-3)


RULES = [("ttt_linear", 16), ("gated_deltanet", 64), ("titans", 64), ("titans_linear", 16), ("atlas", 64)]


def timed_row(label, shape, backend, fwd, fwd_bwd, flops=None, peak=None) -> dict:
    row = {"rule": label, "shape": shape, "backend": backend}
    try:
        row["fwd_ms"] = bench(fwd)
        if fwd_bwd is not None:
            row["fwd_bwd_ms"] = bench(fwd_bwd)
        if flops:
            row["tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
            row["peak_fraction"] = row["tflops"] * 1e12 / peak
    except Exception as err:  # a row that failed says why; the script goes on
        row["error"] = repr(err)[:200]
    finally:
        torch.cuda.empty_cache()
    return row


def memdsl_rows(name, shape, chunk, peak, deadline):
    B, T, H, D = shape
    rule = memdsl.compile(str(ROOT / "rules" / f"{name}.mem"))
    tok, gates, params = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=torch.float32)
    tok = {n: t.cuda().to(torch.bfloat16) for n, t in tok.items()}
    gates = {n: g.cuda() for n, g in gates.items()}
    params = {n: p.cuda() for n, p in params.items()}
    torch_path = {"wy": "wy", "loop": "loop"}.get(rule.algorithm, "dual" if rule.spec.get("dual") else "chunk")
    sizes = {n: int(x) for n, x in rule.impl.sizes(k=tok["k"], v=tok["v"], q=tok["q"]).items()}
    why = rule.triton_reason() or kernel_reason(rule, sizes, chunk)  # e.g. ATLAS's per-position tiles at d = 64
    backends = ([] if why else ["triton"]) + [torch_path]
    flops = None
    try:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            rule(tok["q"].float(), tok["k"].float(), tok["v"].float(), gates, params, chunk=chunk, backend=torch_path)
        flops = fc.get_total_flops()
    except Exception:  # counting is a nicety; a failure leaves the column empty
        pass
    rows = [{"rule": name, "shape": shape, "backend": "triton", "error": f"no kernel: {why}"[:200]}] if why else []
    for backend in backends:
        if time.time() > deadline:
            rows.append({"rule": name, "shape": shape, "backend": backend, "error": "time budget spent"})
            continue

        def fwd(backend=backend):
            with torch.no_grad():
                rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=chunk, backend=backend)

        def fwd_bwd(backend=backend):
            leaves = {n: t.detach().requires_grad_() for n, t in tok.items()}
            y, _ = rule(leaves["q"], leaves["k"], leaves["v"], gates, params, chunk=chunk, backend=backend)
            y.float().sum().backward()
        rows.append(timed_row(f"memdsl {name} C={chunk}", shape, backend, fwd, fwd_bwd, flops, peak))
    return rows


def peer_rows(shape):
    B, T, H, D = shape
    rows = []
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = torch.nn.functional.normalize(k.float(), dim=-1).to(torch.bfloat16)

    def leaves(*xs):
        return [x.detach().requires_grad_() for x in xs]
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda"))
        beta = torch.rand(B, T, H, device="cuda", dtype=torch.bfloat16)

        def gdr_fwd_bwd():
            a, b, c = leaves(q, k, v)
            chunk_gated_delta_rule(a, b, c, g, beta)[0].float().sum().backward()
        rows.append(timed_row("fla chunk_gated_delta_rule", shape, "fla",
                              lambda: chunk_gated_delta_rule(q, k, v, g, beta), gdr_fwd_bwd))
    except Exception as err:
        rows.append({"rule": "fla chunk_gated_delta_rule", "shape": shape, "backend": "fla", "error": repr(err)[:200]})
    try:
        from fla.ops.ttt import chunk_ttt_linear
        w = torch.ones(H, D, device="cuda", dtype=torch.bfloat16)
        b = torch.zeros(H, D, device="cuda", dtype=torch.bfloat16)
        eta = torch.full((B, T, H, 1), 0.1, device="cuda", dtype=torch.bfloat16)

        def ttt_fwd():
            with torch.no_grad():
                chunk_ttt_linear(q, k, v, w, b, eta, chunk_size=16)

        def ttt_fwd_bwd():
            a, bb, c = leaves(q, k, v)
            chunk_ttt_linear(a, bb, c, w, b, eta, chunk_size=16)[0].float().sum().backward()
        rows.append(timed_row("fla chunk_ttt_linear", shape, "fla", ttt_fwd, ttt_fwd_bwd))
    except Exception as err:
        rows.append({"rule": "fla chunk_ttt_linear", "shape": shape, "backend": "fla", "error": repr(err)[:200]})
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
        mem = NeuralMemory(dim=H * D, heads=H, dim_head=D, chunk_size=64,
                           model=MemoryMLP(D, depth=2, expansion_factor=4.0)).cuda()
        x = torch.randn(B, T, H * D, device="cuda")

        def tp_fwd():
            with torch.no_grad():
                mem(x)

        def tp_fwd_bwd():
            mem(x.detach().requires_grad_())[0].sum().backward()
        rows.append(timed_row("titans-pytorch NeuralMemory C=64", shape, "titans-pytorch", tp_fwd, tp_fwd_bwd))
    except Exception as err:
        rows.append({"rule": "titans-pytorch NeuralMemory", "shape": shape, "backend": "titans-pytorch",
                     "error": repr(err)[:200]})
    return rows


def twod_cases(device: str, B: int = 16, H: int = 2, d: int = 4) -> list[tuple[str, str, object]]:
    """Hydra at the ETTh1 forecaster's shape (lookback 96, 7 variates, H heads of d, tile 16 x 8): one training
    step (forward + backward) of the exact wavefront, the torch tile program and the Triton tile kernels, as
    (label, backend, callable); on CPU under TRITON_INTERPRET=1 the same callables dry-run the benchmark."""
    from memdsl.twod import compile_2d
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    g = torch.Generator().manual_seed(0)
    toks = [torch.randn(B, 96, 7, H, d, generator=g).to(device) for _ in range(3)]
    gates = {n: (torch.rand(B, 96, 7, H, generator=g) * 0.6 + 0.05).to(device) for n in rule.spec1d["gates"]}
    cases = []
    for backend in ("wavefront", "tiles", "triton"):
        def step(backend=backend):
            leaves = [x.detach().requires_grad_() for x in toks]
            y, _ = rule(*leaves, gates, backend=backend, tile=(16, 8))
            y.square().mean().backward()
        cases.append((f"memdsl hydra 2-D tile 16x8 (T 96, V 7, d {d})", backend, step))
    return cases


def twod_rows(deadline: float, B: int = 16) -> list[dict]:
    """fwd+bwd medians of twod_cases on the GPU (the fwd column times the same step: one training step)."""
    rows = []
    for label, backend, step in twod_cases("cuda", B):
        if time.time() > deadline:
            rows.append({"rule": label, "shape": (B, 96, 7), "backend": backend, "error": "time budget spent"})
            continue
        rows.append(timed_row(label, (B, 96, 7), backend, step, None))
    return rows


def layer_rows(deadline: float, B: int = 8, T: int = 2048, d_model: int = 1024, heads: int = 16) -> list[dict]:
    """MemoryLayer training steps (forward + backward, every parameter's gradient), the rule call through
    the kernels (`auto`) and through the torch chunk program (what the layer ran before 99cb1ed), fp32 and
    under bf16 autocast."""
    from memdsl.nn import MemoryLayer
    rows = []
    for name, chunk in (("titans", 64), ("gated_deltanet", 64)):
        layer = MemoryLayer(str(ROOT / "rules" / f"{name}.mem"), d_model=d_model, n_heads=heads, chunk=chunk).cuda()
        x = torch.randn(B, T, d_model, device="cuda")
        for backend, amp in (("auto", False), ("chunk", False), ("auto", True)):
            label = f"MemoryLayer {name}" + (" (bf16 autocast)" if amp else "")
            if time.time() > deadline:
                rows.append({"rule": label, "shape": (B, T, d_model), "backend": backend,
                             "error": "time budget spent"})
                continue

            def step(backend=backend, amp=amp, layer=layer, x=x):
                layer.backend = backend
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    out, _, _ = layer(x)
                out.float().square().mean().backward()
                layer.zero_grad(set_to_none=True)
            rows.append(timed_row(label, (B, T, d_model), backend, step, None))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "gpu.json"))
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--twod", action="store_true", help="time only the 2-D rows (hydra: wavefront, torch tiles, "
                    "Triton tiles; one training step at the ETTh1 shape, batch 16 and 64)")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    if args.twod:
        rows = twod_rows(deadline, 16) + twod_rows(deadline, 64)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows, "device": torch.cuda.get_device_name()}, indent=1))
        print("| rule | B, T, V | backend | fwd+bwd ms |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['rule']} | {r['shape']} | {r['backend']} | {r.get('error') or format(r['fwd_ms'], '.2f')} |")
        return
    peak = bf16_peak()
    rows = []
    for shape in SHAPES:
        for name, chunk in RULES:
            rows += memdsl_rows(name, shape, chunk, peak, deadline)
        if time.time() < deadline:
            rows += peer_rows(shape)
    rows += layer_rows(deadline)  # fwd_ms of these rows is a whole training step
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
