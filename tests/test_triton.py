"""Generated Triton kernels against the torch chunk program (CPU: TRITON_INTERPRET=1, small shapes).

Forward outputs and final state in fp32 (relative RMS ≤ 1e-5) and with bf16 inputs (≤ 5e-3),
odd T (a ragged last chunk), NaN-poisoned outputs; gradients through the autograd.Function.
"""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, rel_rms, run_with_grads
from tests.conftest import RULES

SUPPORTED = {"titans", "titans_linear", "ttt_linear", "ttt_mlp", "yaad", "linear_attention"}
COVERED = [p for p in RULES if p.stem in SUPPORTED]


def test_the_kernel_slice_covers_what_it_says():
    covered = {p.stem for p in RULES if memdsl.compile(str(p)).triton_reason() is None}
    assert covered == SUPPORTED
    reason = memdsl.compile("rules/atlas.mem").triton_reason()
    assert reason and "dual" in reason


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
@pytest.mark.parametrize("path", COVERED, ids=[p.stem for p in COVERED])
def test_kernel_forward_equals_torch_chunk_program(path, dtype, tol):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, B=2, T=37, H=2, D=16, dtype=torch.float32)
    y_ref, s_ref = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=16, backend="dual")
    cast = {n: t.to(dtype) for n, t in tok.items()}
    y, state = rule(cast["q"], cast["k"], cast["v"], gates, params, chunk=16, backend="triton")
    assert y.dtype == dtype and not torch.isnan(y).any()
    if dtype == torch.bfloat16:  # the reference sees the same rounded inputs
        y_ref, s_ref = rule(*(cast[n].float() for n in ("q", "k", "v")), gates, params, chunk=16, backend="dual")
    assert rel_rms(y.float(), y_ref) <= tol
    for key in s_ref:
        assert rel_rms(state[key], s_ref[key]) <= tol, key


@pytest.mark.parametrize("path", COVERED, ids=[p.stem for p in COVERED])
def test_kernel_gradients_equal_torch(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, B=1, T=21, H=2, D=16, dtype=torch.float32)
    y_ref, s_ref, g_ref = run_with_grads(rule, tok, gates, params, backend="dual", chunk=16)
    y, s, g = run_with_grads(rule, tok, gates, params, backend="triton", chunk=16)
    assert rel_rms(y, y_ref) <= 1e-5
    for key in g_ref:
        if g_ref[key].abs().sum() > 0:
            assert rel_rms(g[key], g_ref[key]) <= 1e-5, key


def test_unsupported_rule_says_why():
    rule = memdsl.compile("rules/moneta.mem")
    tok, gates, params = make_inputs(rule, T=4, D=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="no Triton kernel yet"):
        rule(tok["q"], tok["k"], tok["v"], gates, params, backend="triton")
