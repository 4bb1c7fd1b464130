"""GPU-only checks at realistic shapes (`pytest -m gpu`; run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, rel_rms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TRITON_RULES = ["titans", "titans_linear", "ttt_linear", "ttt_mlp", "yaad", "linear_attention", "deltanet",
                "gated_deltanet"]


def _reference(rule) -> str:
    return "wy" if rule.algorithm == "wy" else "dual"


def _cuda(d):
    return {n: t.cuda() for n, t in d.items()}


@pytest.mark.parametrize("name", TRITON_RULES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_kernel_matches_torch_at_realistic_shapes(name, dtype, tol):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=2, T=2048 + 37, H=4, D=64, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    cast = {n: t.to(dtype) for n, t in tok.items()}
    y, state = rule(cast["q"], cast["k"], cast["v"], gates, params, chunk=16, backend="triton")
    y_ref, s_ref = rule(*(cast[n].float() for n in ("q", "k", "v")), gates, params, chunk=16,
                        backend=_reference(rule))
    assert not torch.isnan(y).any()
    assert rel_rms(y.float(), y_ref) <= tol
    for key in s_ref:
        assert rel_rms(state[key], s_ref[key]) <= tol, key


@pytest.mark.parametrize("name", TRITON_RULES)
def test_generated_backward_matches_torch_at_realistic_shapes(name):
    from memdsl.checking import run_with_grads
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=2, T=1024 + 37, H=4, D=64, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    y, s, g = run_with_grads(rule, tok, gates, params, backend="triton", chunk=16)
    y_ref, s_ref, g_ref = run_with_grads(rule, tok, gates, params, backend=_reference(rule), chunk=16)
    for key in g_ref:
        assert not torch.isnan(g[key]).any(), key
        assert rel_rms(g[key], g_ref[key]) <= 1e-4, key  # TF32-free fp32 on both sides; long sums


def test_packed_sequences_on_gpu():
    rule = memdsl.compile("rules/gated_deltanet.mem")
    tok, gates, params = make_inputs(rule, B=1, T=3000, H=4, D=64, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    cu = torch.tensor([0, 1000, 1017, 3000], device="cuda")
    y, s = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=64, backend="triton", cu_seqlens=cu)
    y_ref, s_ref = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=64, backend="wy", cu_seqlens=cu)
    assert rel_rms(y, y_ref) <= 1e-5
    assert all(rel_rms(s[n], s_ref[n]) <= 1e-5 for n in s_ref)


@pytest.mark.parametrize("name", ["titans", "gated_deltanet", "atlas"])
def test_torch_paths_run_on_cuda(name):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=1, T=67, H=2, D=16, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    y, _ = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=16, backend="chunk")
    y_cpu, _ = rule(*(tok[n].cpu() for n in ("q", "k", "v")), {n: g.cpu() for n, g in gates.items()},
                    {n: p.cpu() for n, p in params.items()}, chunk=16, backend="chunk")
    assert rel_rms(y.cpu(), y_cpu) < 1e-4
