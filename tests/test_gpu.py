"""GPU-only checks at realistic shapes (`pytest -m gpu`; run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, rel_rms

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TRITON_RULES = ["titans", "titans_linear", "ttt_linear", "ttt_mlp", "yaad", "linear_attention"]


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
    y_ref, s_ref = rule(*(cast[n].float() for n in ("q", "k", "v")), gates, params, chunk=16, backend="dual")
    assert not torch.isnan(y).any()
    assert rel_rms(y.float(), y_ref) <= tol
    for key in s_ref:
        assert rel_rms(state[key], s_ref[key]) <= tol, key


@pytest.mark.parametrize("name", ["titans", "gated_deltanet", "atlas"])
def test_torch_paths_run_on_cuda(name):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=1, T=67, H=2, D=16, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    y, _ = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=16, backend="chunk")
    y_cpu, _ = rule(*(tok[n].cpu() for n in ("q", "k", "v")), {n: g.cpu() for n, g in gates.items()},
                    {n: p.cpu() for n, p in params.items()}, chunk=16, backend="chunk")
    assert rel_rms(y.cpu(), y_cpu) < 1e-4
