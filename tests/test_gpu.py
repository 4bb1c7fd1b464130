"""GPU-only checks at realistic shapes (`pytest -m gpu`; run by benchmarks/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, rel_rms, run_with_grads
from tests.helpers import autograd_node_names
from tests.test_triton import inputs, reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# every shipped rule the kernels cover; ATLAS's per-position tiles fit at d = 16 only (kernel_reason)
TRITON_RULES = ["titans", "titans_linear", "ttt_linear", "ttt_mlp", "yaad", "linear_attention", "deltanet",
                "gated_deltanet", "deep_transformer", "omeganet", "dot", "moneta", "memora", "atlas"]


def _width(rule, chunk: int = 16) -> int:
    """d_head = 64 for the dual-form and WY kernels; 16 for the per-position-state kernels (ATLAS's tiles do
    not fit at 64, and Memora's softmax logits are so conditioned at 64 that fp32 — torch's and the
    kernel's alike — drifts 1e-4..1e-3 from float64 within three chunks, measured at T = 48 and 64, which
    makes a 4x-of-torch's-error criterion a coin toss)."""
    from codegen.triton_run import kernel_reason
    probe = torch.empty(1, 1, 1, 64)
    sizes = {n: int(v) for n, v in rule.impl.sizes(k=probe, v=probe, q=probe).items()}
    if reference(rule) == "chunk" or kernel_reason(rule, sizes, chunk) is not None:
        return 16
    # a state tile past 2^15 fp32 elements (128 KB: polynomial features' [2d, pad(1 + d + d^2)] at d = 64) is
    # accepted by kernel_reason (Triton's 2^20 limit) but not known to compile or fit on a GPU: not at 64 here
    biggest = max(t[0, 0].numel() for t in rule.init_state(1, 1, d=64).values())
    return 64 if biggest <= 1 << 15 else 16


def _cuda(d):
    return {n: t.cuda() for n, t in d.items()}


@pytest.mark.parametrize("name", TRITON_RULES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-3)])
def test_kernel_matches_torch_at_realistic_shapes(name, dtype, tol):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = inputs(rule, B=2, T=2048 + 37, H=4, D=_width(rule), dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    cast = {n: t.to(dtype) for n, t in tok.items()}
    y, state = rule(cast["q"], cast["k"], cast["v"], gates, params, chunk=16, backend="triton")
    as_ref = [cast[n].float() for n in ("q", "k", "v")]
    y_ref, s_ref = rule(*as_ref, gates, params, chunk=16, backend=reference(rule))
    assert not torch.isnan(y).any()
    pairs = [("y", y.float(), y_ref)] + [(key, state[key], s_ref[key]) for key in s_ref]
    if dtype == torch.bfloat16:
        assert all(rel_rms(got, ref) <= tol for _, got, ref in pairs), name
        return
    # fp32: within 1e-5 of float64, or within 4x the torch fp32 path's own error where the rule is
    # ill-conditioned in fp32 (tests/test_triton.py: Newton-Schulz, lq, softmax logits, poly windows)
    y64, s64 = rule(*(x.double() for x in as_ref), {n: g.double() for n, g in gates.items()},
                    {n: p.double() for n, p in params.items()}, chunk=16, backend=reference(rule))
    exact = {"y": y64, **s64}
    for key, got, ref in pairs:
        assert rel_rms(got, exact[key]) <= max(tol, 4 * rel_rms(ref, exact[key])), key


@pytest.mark.parametrize("name", TRITON_RULES)
def test_generated_backward_matches_torch_at_realistic_shapes(name):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = inputs(rule, B=2, T=1024 + 37, H=4, D=_width(rule), dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    _, _, g = run_with_grads(rule, tok, gates, params, backend="triton", chunk=16)
    _, _, g_ref = run_with_grads(rule, tok, gates, params, backend=reference(rule), chunk=16)
    _, _, g64 = run_with_grads(rule, *({n: t.double() for n, t in d.items()} for d in (tok, gates, params)),
                               backend=reference(rule), chunk=16)
    for key in g_ref:
        assert not torch.isnan(g[key]).any(), key
        # TF32-free fp32 on both sides, long sums: 1e-4 of float64, or 4x the torch fp32 path's own error
        assert rel_rms(g[key], g64[key]) <= max(1e-4, 4 * rel_rms(g_ref[key], g64[key])), key


def test_packed_sequences_on_gpu():
    rule = memdsl.compile("rules/gated_deltanet.mem")
    tok, gates, params = make_inputs(rule, B=1, T=3000, H=4, D=64, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    cu = torch.tensor([0, 1000, 1017, 3000], device="cuda")
    y, s = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=64, backend="triton", cu_seqlens=cu)
    y_ref, s_ref = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=64, backend="wy", cu_seqlens=cu)
    assert rel_rms(y, y_ref) <= 1e-5
    assert all(rel_rms(s[n], s_ref[n]) <= 1e-5 for n in s_ref)


@pytest.mark.parametrize("name", ["titans", "gated_deltanet"])
def test_memory_layer_trains_through_the_kernels_on_cuda(name):
    """MemoryLayer's rule call goes through the compiled rule's dispatch: the Triton kernels on CUDA (one
    autograd node for the whole sequence), equal to the layer on the torch chunk program; padded rows too."""
    from memdsl.nn import MemoryLayer
    torch.manual_seed(0)
    layer = MemoryLayer(f"rules/{name}.mem", d_model=256, n_heads=4, chunk=16).cuda()
    x = torch.randn(2, 1000, 256, device="cuda")
    mask = torch.ones(2, 1000, dtype=torch.long, device="cuda")
    mask[1, :333] = 0
    y, _, _ = layer(x, attention_mask=mask)
    assert "TritonChunkBackward" in autograd_node_names(y)
    layer.backend = "chunk"
    y_ref, _, _ = layer(x, attention_mask=mask)
    assert rel_rms(y, y_ref) <= 1e-4


@pytest.mark.parametrize("name", ["titans", "gated_deltanet", "atlas"])
def test_torch_paths_run_on_cuda(name):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=1, T=67, H=2, D=16, dtype=torch.float32)
    tok, gates, params = _cuda(tok), _cuda(gates), _cuda(params)
    y, _ = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=16, backend="chunk")
    y_cpu, _ = rule(*(tok[n].cpu() for n in ("q", "k", "v")), {n: g.cpu() for n, g in gates.items()},
                    {n: p.cpu() for n, p in params.items()}, chunk=16, backend="chunk")
    assert rel_rms(y.cpu(), y_cpu) < 1e-4


@pytest.mark.parametrize("name, tile, V", [("hydra", (16, 8), 7), ("hydra", (16, 4), 7), ("chimera", (32, 8), 7),
                                           ("mamba2d", (32, 8), 7)])
def test_2d_kernels_match_the_torch_tiles_at_the_etth1_shape(name, tile, V):
    """The 2-D rules' Triton kernels (tests/test_triton_2d.py) at the forecaster's shape: lookback 96, 7
    variates, 2 heads of 4, batch 16; one variate chunk (8) and two (4): outputs, final state, every gradient,
    within 1e-5 of float64 or 4x the torch fp32 tile program's own error."""
    check_2d_at_etth1(name, tile, V, "cuda")


def check_2d_at_etth1(name, tile, V, device, B=16, H=2):
    """The body of the test above (a device argument, so that it can be dry-run on CPU under the interpreter)."""
    from memdsl.twod import compile_2d
    from tests.test_triton_2d import _inputs, _run
    rule = compile_2d(f"rules/{name}.mem")
    inputs = _inputs(rule, B, 96, V, H, 4)
    got = _run(rule, inputs, torch.float32, device, backend="triton", tile=tile)
    f32 = _run(rule, inputs, torch.float32, device, backend="tiles", tile=tile)
    f64 = _run(rule, inputs, torch.float64, device, backend="tiles", tile=tile)
    assert not got[0].isnan().any()
    pairs = [("y", got[0], f32[0], f64[0])] + [(k, got[1][k], f32[1][k], f64[1][k]) for k in f64[1]]
    pairs += [(f"d{k}", got[2][k], f32[2][k], f64[2][k]) for k in f64[2]]
    for key, a, ref, exact in pairs:
        assert rel_rms(a, exact) <= max(1e-5, 4 * rel_rms(ref, exact)), key
