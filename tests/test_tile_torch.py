"""The torch-printed tile programs (backend="tiles", codegen/tile_torch.py) against the torch chunk program.

Every rule the Triton slice covers: output, final state and every gradient (q, k, v, gates, outer
constants, initial state) under random cotangents, a ragged last chunk, fp32 (the criterion of
test_triton: within 1e-5 of float64, or 4x the torch fp32 path's own error); odd widths and chunks
(no power-of-two limits here); reads before write and at the chunk start; packed sequences; and the
generated functions themselves in float64 to ~1e-10 (the launcher computes in fp32, so float64 is
driven here directly through the kernels' calling convention).
"""

from __future__ import annotations

import pytest
import torch

import memdsl
from codegen.tile_torch_kernel import Unsupported, kernel_for
from codegen.triton_launch import HYPER_NAMES, _state_keys
from memdsl.checking import make_inputs, rel_rms
from tests.conftest import RULES

SUPPORTED = {"atlas", "titans", "titans_linear", "ttt_linear", "ttt_mlp", "yaad", "linear_attention", "deltanet",
             "gated_deltanet", "deep_transformer", "omeganet", "dot"}
COVERED = [p for p in RULES if p.stem in SUPPORTED]
FP32_LOOSE = {"dot": 1e-4}  # windowed polynomial features reach |y| ~ 1e5 (see test_triton)


def _sizes(rule, D: int) -> dict[str, int]:
    return {n: int(x) for n, x in rule.impl.sizes(sizes={"d": D}).items()}


def test_coverage_is_what_it_says():
    """The tile programs run the Triton slice's anchored and WY graphs; the per-position state graphs
    (state_tiles.py: moneta, memora) bind inputs this driver does not prepare, and say so."""
    covered = {p.stem for p in RULES if memdsl.compile(str(p)).tiles_reason(None, _sizes(memdsl.compile(str(p)), 16),
                                                                            16) is None}
    assert covered == SUPPORTED
    for name in ("moneta", "memora"):
        rule = memdsl.compile(f"rules/{name}.mem")
        why = rule.tiles_reason(None, _sizes(rule, 16), 16)
        assert why
        tok, gates, params = make_inputs(rule, T=4, D=16, dtype=torch.float32)
        with pytest.raises(ValueError, match="no tile program"):
            rule(tok["q"], tok["k"], tok["v"], gates, params, backend="tiles")


def reference(rule) -> str:
    """The torch chunk program the tile graphs come from: the exact WY algorithm, the dual form, or (Muon)
    the anchored chunk program."""
    return "wy" if rule.algorithm == "wy" else "dual" if rule.spec["dual"] else "chunk"


def run(rule, backend, tok, gates, params, state, seed=5, **kw):
    """y, final state and the gradients of a random functional of both w.r.t. every input."""
    leaves = {n: t.clone().requires_grad_() for n, t in {**tok, **gates, **params}.items()}
    s0 = {n: t.clone().requires_grad_() for n, t in state.items()}
    y, s = rule(leaves["q"], leaves["k"], leaves["v"], {n: leaves[n] for n in gates},
                {n: leaves[n] for n in params}, s0, backend=backend, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    for n in sorted(s0):
        loss = loss + (s[n] * torch.randn(s[n].shape, generator=gen, dtype=torch.float64).to(s[n].dtype)).sum()
    names = [*leaves, *(f"state.{n}" for n in s0)]
    grads = torch.autograd.grad(loss, [*leaves.values(), *s0.values()], allow_unused=True)
    return y.detach(), {n: t.detach() for n, t in s.items()}, {
        n: g if g is not None else torch.zeros_like(x) for n, g, x in zip(names, grads, [*leaves.values(),
                                                                                         *s0.values()], strict=True)}


def inputs(rule, B, T, H, D, dtype=torch.float32):
    tok, gates, params = make_inputs(rule, B=B, T=T, H=H, D=D, dtype=dtype)
    # a memory large enough that the state matters next to the residual path
    state = {n: 10 * t for n, t in rule.init_state(B, H, d=D, generator=torch.Generator().manual_seed(3),
                                                  dtype=dtype).items()}
    return tok, gates, params, state


def check(rule, got, ref32, ref64, loose: float):
    pairs = [("y", got[0], ref32[0], ref64[0])]
    pairs += [(f"state {n}", got[1][n], ref32[1][n], ref64[1][n]) for n in ref32[1]]
    pairs += [(f"grad {n}", got[2][n], ref32[2][n], ref64[2][n]) for n in ref32[2]]
    assert set(got[1]) == set(ref32[1]) and set(got[2]) == set(ref32[2])
    for name, a, b, c in pairs:
        assert not torch.isnan(a).any(), name
        if c.abs().sum() == 0:
            assert a.abs().sum() == 0, name
            continue
        assert rel_rms(a, c) <= max(loose, 4 * rel_rms(b, c)), (name, rel_rms(a, c), rel_rms(b, c))


@pytest.mark.parametrize("T", [37, 32])  # 3 chunks of 16, the last ragged; 2 full chunks (the full-chunk variant)
@pytest.mark.parametrize("path", COVERED, ids=[p.stem for p in COVERED])
def test_tiles_equal_torch_chunk_program(path, T):
    rule = memdsl.compile(str(path))
    tok, gates, params, state = inputs(rule, B=2, T=T, H=2, D=16)
    got = run(rule, "tiles", tok, gates, params, state, chunk=16)
    ref32 = run(rule, reference(rule), tok, gates, params, state, chunk=16)
    as64 = [{n: t.double() for n, t in d.items()} for d in (tok, gates, params, state)]
    ref64 = run(rule, reference(rule), *as64, chunk=16)
    check(rule, got, ref32, ref64, FP32_LOOSE.get(path.stem, 1e-5))


@pytest.mark.parametrize("name, D, C, T", [("titans", 24, 5, 23), ("ttt_mlp", 12, 7, 19), ("deltanet", 24, 5, 23),
                                           ("yaad", 10, 3, 11), ("omeganet", 16, 6, 23), ("titans_linear", 16, 16, 32)])
def test_odd_widths_and_chunks(name, D, C, T):
    """Widths and chunks that are not powers of two (padded tiles, masked columns); T a multiple of C runs
    the full-chunk variant. Polynomial features (omeganet) need a power-of-two width (kron)."""
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params, state = inputs(rule, B=1, T=T, H=2, D=D)
    got = run(rule, "tiles", tok, gates, params, state, chunk=C)
    ref32 = run(rule, reference(rule), tok, gates, params, state, chunk=C)
    ref64 = run(rule, reference(rule), *[{n: t.double() for n, t in d.items()} for d in (tok, gates, params, state)],
                chunk=C)
    check(rule, got, ref32, ref64, 1e-5)


WINDOWED = "memory m {{\n  param W : [d, d] init zeros\n  model M(x) = W @ x\n  gate g0 : scalar sigmoid\n" \
    "  loss sum((M(k) - v)^2)\n  optim {optim}\n  window 3{weight}\n  read M(q)\n}}\n"


@pytest.mark.parametrize("weight", ["", " weight g0"])
@pytest.mark.parametrize("optim", ["gd(lr = g0)", "momentum(lr = g0, decay = g0)"])
def test_omega_windows_with_and_without_a_weight(optim, weight):
    """An unweighted window's weight is the constant 1, whose transpose the printer once wrote as
    `1.0.transpose(...)` (an AttributeError at the first call of any rule with `window c` and no weight)."""
    rule = memdsl.compile(WINDOWED.format(optim=optim, weight=weight))
    tok, gates, params, state = inputs(rule, B=1, T=23, H=2, D=16)
    got = run(rule, "tiles", tok, gates, params, state, chunk=8)
    ref32 = run(rule, reference(rule), tok, gates, params, state, chunk=8)
    ref64 = run(rule, reference(rule), *[{n: t.double() for n, t in d.items()} for d in (tok, gates, params, state)],
                chunk=8)
    check(rule, got, ref32, ref64, 1e-5)


@pytest.mark.parametrize("read_order", ["before", "chunk_start"])
def test_read_orders(read_order):
    rule = memdsl.compile("rules/titans.mem")
    tok, gates, params, state = inputs(rule, B=1, T=21, H=2, D=16)
    got = run(rule, "tiles", tok, gates, params, state, chunk=8, read_order=read_order)
    ref32 = run(rule, "dual", tok, gates, params, state, chunk=8, read_order=read_order)
    ref64 = run(rule, "dual", *[{n: t.double() for n, t in d.items()} for d in (tok, gates, params, state)], chunk=8,
                read_order=read_order)
    check(rule, got, ref32, ref64, 1e-5)


def test_packed_sequences_run_one_call_each():
    rule = memdsl.compile("rules/ttt_linear.mem")
    cu = torch.tensor([0, 21, 21, 30, 47])
    tok, gates, params = make_inputs(rule, B=1, T=47, H=2, D=16, dtype=torch.float32)
    state = rule.init_state(4, 2, d=16, generator=torch.Generator().manual_seed(3))
    got = run(rule, "tiles", tok, gates, params, state, chunk=16, cu_seqlens=cu)
    ref = run(rule, "dual", tok, gates, params, state, chunk=16, cu_seqlens=cu)
    pairs = [(got[0], ref[0]), *((got[1][n], ref[1][n]) for n in ref[1]), *((got[2][n], ref[2][n]) for n in ref[2])]
    for a, b in pairs:
        assert rel_rms(a, b) <= 1e-5


def _hyper64(rule, gates, T, chunk, like):
    """lr, mu, keep, scale as [B, T, H] in the dtype of the inputs (triton_launch._hyper computes in fp32)."""
    spec, rt = rule.spec, rule.impl.runtime
    bht = {n: g.transpose(1, 2) for n, g in gates.items()}
    hyp = rt.hyper_values(bht, {}, None, T, chunk, like)
    keep, _ = rt.keep_rate(hyp)
    values = {"lr": hyp[spec["lr"]], "mu": hyp[spec["decay"]] if spec["decay"] else None, "keep": keep,
              "scale": hyp[spec["scale"]] if spec["scale"] else None}
    return [(values[n] if values[n] is not None else like[..., :1] * 0)[..., 0].transpose(1, 2) for n in HYPER_NAMES]


@pytest.mark.parametrize("name", ["titans", "deltanet"])
def test_generated_functions_in_float64(name):
    """The kernels' calling convention with float64 buffers: forward (y, final state) against the torch chunk
    program, and backward (q, k, v, gate and initial-state gradients, the hyper-parameters' chained through
    their sigmoid formulas by autograd) against torch autograd over it, to ~1e-10."""
    rule = memdsl.compile(f"rules/{name}.mem")
    B, T, H, D, C = 2, 37, 2, 16, 16
    tok, gates, params, state = inputs(rule, B, T, H, D, dtype=torch.float64)
    assert not rule.spec["outers"]
    sizes = {n: int(x) for n, x in rule.impl.sizes(sizes={"d": D}).items()}
    fwd, bwd = (kernel_for(rule, sizes, C, d) for d in ("fwd", "bwd"))
    keys = _state_keys(rule.spec)
    NC = -(-T // C)
    g = {n: t.clone().requires_grad_() for n, t in gates.items()}
    hyper = _hyper64(rule, g, T, C, tok["q"].transpose(1, 2))
    y = torch.full((B, T, H, D), float("nan"), dtype=torch.float64)
    new = [state[k].clone() for k in keys]
    saved = [state[k].new_empty(B, H, NC, *state[k].shape[2:]) for k in keys]
    gate_args = [gates[n].contiguous() for n in rule.spec["gates"]]
    hyper_args = [h.detach().contiguous() for h in hyper]
    fwd[(B * H,)](tok["q"], tok["k"], tok["v"], *hyper_args, *gate_args, y, *new, *saved, None, T, H, NC, C=C,
                  VARLEN=False, SAVE=True)
    leaves = {n: t.clone().requires_grad_() for n, t in {**tok, **state}.items()}
    y_ref, s_ref = rule(leaves["q"], leaves["k"], leaves["v"], g, params, {k: leaves[k] for k in keys}, chunk=C,
                        backend=reference(rule))
    assert rel_rms(y, y_ref) <= 1e-10
    for k, s in zip(keys, new, strict=True):
        assert rel_rms(s, s_ref[k]) <= 1e-10, k
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    dstate = [torch.randn(s.shape, generator=gen, dtype=torch.float64) for s in new]
    loss = (y_ref * dy).sum() + sum((s_ref[k] * d).sum() for k, d in zip(keys, dstate, strict=True))
    names = ["q", "k", "v", *keys]
    refs = dict(zip([*names, *g], torch.autograd.grad(loss, [*(leaves[n] for n in names), *g.values()]), strict=True))
    dq, dk, dv = (torch.zeros_like(tok[n]) for n in ("q", "k", "v"))
    dhyper = [torch.zeros_like(h) for h in hyper_args]
    dgates = [torch.zeros_like(t) for t in gate_args]
    dst = [d.clone() for d in dstate]
    bwd[(B * H,)](tok["q"], tok["k"], tok["v"], *hyper_args, *gate_args, *saved, dy, *dst, dq, dk, dv, *dhyper,
                  *dgates, None, T, H, NC, C=C, VARLEN=False)
    for n, got in (("q", dq), ("k", dk), ("v", dv), *zip(keys, dst, strict=True)):
        assert rel_rms(got, refs[n]) <= 1e-10, n
    used = [i for i, h in enumerate(hyper) if h.requires_grad]
    chained = torch.autograd.grad([hyper[i] for i in used], list(g.values()), grad_outputs=[dhyper[i] for i in used],
                                  allow_unused=True)
    for (n, direct), via_hyper in zip(zip(rule.spec["gates"], dgates, strict=True), chained, strict=True):
        total = direct + (via_hyper if via_hyper is not None else 0)
        assert rel_rms(total, refs[n]) <= 1e-10, n


def test_unknown_tile_op_is_unsupported():
    """A tile op without a torch spelling is Unsupported (the rule falls back to the torch chunk path)."""
    assert memdsl.compile("rules/titans.mem").tiles_reason() is None
    from codegen.tile_ir import Tile, TileGraph
    from codegen.tile_torch import _statement
    g = TileGraph()
    a = g.input("a", (4, 4))
    b = g.add(Tile("mystery", (a,), (4, 4)))
    with pytest.raises(Unsupported, match="mystery"):
        _statement(g, b, lambda j: f"t{j}")


def test_auto_takes_tiles_for_cpu_training_at_small_chunks(monkeypatch):
    """memdsl.api.TILES_UP_TO_CHUNK: CPU calls that need a gradient run the tile programs (TritonChunk's
    backward) at chunks up to it; larger chunks, float64, no-grad and uncovered rules stay on the torch chunk
    path; 0 turns the switch off."""
    import memdsl.api
    rule = memdsl.compile("rules/titans.mem")
    tok, gates, params, state = inputs(rule, B=1, T=20, H=2, D=16)
    q = tok["q"].clone().requires_grad_()

    def grad_fn(q, backend="auto", **kw):
        y, _ = rule(q, tok["k"], tok["v"], gates, params, **kw, backend=backend)
        return type(y.grad_fn).__name__ if y.grad_fn is not None else None
    monkeypatch.setattr(memdsl.api, "TILES_UP_TO_CHUNK", 16)
    assert "TritonChunk" in grad_fn(q)  # the rule's own chunk, 16
    assert "TritonChunk" in grad_fn(q, chunk=8)
    assert "TritonChunk" not in grad_fn(q, chunk=32)
    assert "TritonChunk" not in grad_fn(q.detach().double().requires_grad_())
    with torch.no_grad():
        assert grad_fn(q) is None
    monkeypatch.setattr(memdsl.api, "TILES_UP_TO_CHUNK", 0)
    assert "TritonChunk" not in grad_fn(q)
    assert "TritonChunk" in grad_fn(q, backend="tiles")
    memora = memdsl.compile("rules/memora.mem")
    mt, mg, mp = make_inputs(memora, T=8, D=16, dtype=torch.float32)
    y, _ = memora(mt["q"].requires_grad_(), mt["k"], mt["v"], mg, mp)
    assert "TritonChunk" not in type(y.grad_fn).__name__


def test_printed_rule_says_which_cpu_program_runs():
    import memdsl.api
    assert f"CPU training (backend='auto'): tile programs at chunk ≤ {memdsl.api.TILES_UP_TO_CHUNK}, else torch " \
        "chunk program; backend='tiles' covered" in repr(memdsl.compile("rules/titans.mem"))
    assert "backend='tiles' not covered: tile input" in repr(memdsl.compile("rules/moneta.mem"))


def test_decay_coefficients_as_cumulative_products():
    """trinv of a sub-diagonal (chunk_tiles.decay_coefficients) prints as a cumulative product down the
    columns, not a triangular solve: it equals the solve's inverse, with keeps of exactly 0 and negative ones
    (no logs, no clamping)."""
    from codegen.chunk_tiles import decay_coefficients
    from codegen.tile_ir import TileGraph
    from codegen.tile_torch import print_program
    from codegen.tile_torch_kernel import _compile
    C, NC = 7, 3
    g = TileGraph()
    keep = g.input("keep", (C, 1))
    D, abar = decay_coefficients(g, keep, C)
    src = print_program(g, {}, {"keep"}, {"D": D, "abar": abar}, False, "decay")
    assert "cumprod" in src and "solve_triangular" not in src
    ii = torch.arange(C)
    keeps = torch.rand(1, 1, NC, C, 1, dtype=torch.float64) * 2 - 0.5
    keeps[..., 0, 3, 0] = 0.0
    I = {"keep": keeps, "shift": ii[:, None] == ii[None, :] + 1, "strict": ii[:, None] > ii[None, :],
         "first": (ii == 0)[:, None]}
    out = _compile(src, "decay", "test-decay")(I, 1, 1, NC, torch.float64)
    sub = torch.diag_embed(-keeps[..., 1:, 0], offset=-1)
    want = torch.linalg.inv(torch.eye(C, dtype=torch.float64) + sub)
    assert (out["D"] - want).abs().max() <= 1e-12
    assert (out["D"][:, :, 0, 3:, :3] == 0).all()  # the zero keep at row 3 stops every product through it
    assert (out["abar"] - want @ (keeps * (ii == 0)[:, None])).abs().max() <= 1e-12


@pytest.mark.parametrize("q_is_dot", [True, False])
def test_transposed_accumulation_keeps_the_layout(q_is_dot):
    """p - (q + a @ b)^T, with the addmm read only through its transpose, prints as GEMMs accumulated into
    p's layout (q^T: one more GEMM when q is a product, else one add): the result is contiguous, and equals
    the tile evaluator's."""
    from codegen.tile_eval import evaluate
    from codegen.tile_ir import TileGraph
    from codegen.tile_torch import print_program
    from codegen.tile_torch_kernel import _compile
    g = TileGraph()
    a, b, c, d, m = (g.input(n, s) for n, s in (("a", (5, 3)), ("b", (3, 6)), ("c", (5, 4)), ("d", (4, 6)),
                                                 ("m", (6, 5))))
    q = g.dot(c, d) if q_is_dot else g.input("q", (5, 6))
    p = g.mul(m, m)
    out = g.sub(p, g.trans(g.add2(q, g.dot(a, b))))
    chunked = {"a", "b", "c", "d", "m", "q"} & set(g.inputs)
    src = print_program(g, {}, chunked, {"out": out}, False, "f")
    assert src.count("_addmm(") == (2 if q_is_dot else 1) and ("torch.add(" in src) != q_is_dot
    gen = torch.Generator().manual_seed(3)
    vals = {n: torch.randn(g.shape(i), generator=gen, dtype=torch.float64) for n, i in g.inputs.items()}
    got = _compile(src, "f", f"test-trans-{q_is_dot}")({n: v.reshape(1, 1, 1, *v.shape) for n, v in vals.items()},
                                                       1, 1, 1, torch.float64)["out"][0, 0, 0]
    assert got.is_contiguous()
    assert (got - evaluate(g, vals)[out]).abs().max() <= 1e-12


def test_subdiagonal_of_a_product_as_row_products():
    """sum(where(shift, where(strict, -(x @ y), 0), 0), -1) (trinv's adjoint, read on the sub-diagonal)
    prints as a row-wise product with y's columns shifted down one row, no C×C×C GEMM; equals the evaluator."""
    from codegen.tile_eval import evaluate
    from codegen.tile_ir import TileGraph, X
    from codegen.tile_torch import print_program
    from codegen.tile_torch_kernel import _compile
    C, K = 6, 4
    g = TileGraph()
    x, y = g.input("x", (C, K)), g.input("y", (K, C))
    shift, strict = g.input("shift", (C, C), boolean=True), g.input("strict", (C, C), boolean=True)
    zero = g.const(0.0)
    out = g.sum(g.where(shift, g.where(strict, g.ew(-X[0], g.dot(x, y)), zero), zero), 1)
    src = print_program(g, {}, {"x", "y"}, {"out": out}, False, "f")
    assert "matmul" not in src and "pad(" in src
    ii = torch.arange(C)
    gen = torch.Generator().manual_seed(4)
    vals = {"x": torch.randn(C, K, generator=gen, dtype=torch.float64),
            "y": torch.randn(K, C, generator=gen, dtype=torch.float64),
            "shift": ii[:, None] == ii[None, :] + 1, "strict": ii[:, None] > ii[None, :]}
    I = {n: v.reshape(1, 1, 1, *v.shape) if n in "xy" else v for n, v in vals.items()}
    got = _compile(src, "f", "test-subdiag")(I, 1, 1, 1, torch.float64)["out"][0, 0, 0]
    assert (got - evaluate(g, vals)[out]).abs().max() <= 1e-12


def test_hoisted_expressions_fold_common_factors():
    """gelu'' as sympy differentiates it (two exponentials, three constants) is hoisted with the common factor
    pulled out and the constants folded: fewer ops, the same values; an expression that does not shrink is
    kept as it is."""
    import sympy as sp

    from codegen.tile_ir import X
    from codegen.tile_torch_fusion import _fewer_passes, _Named
    x, y = X[0], X[1]
    g = sp.exp(-x**2 / 2)
    e = y * (2 * sp.sqrt(2) * g / sp.sqrt(sp.pi) - sp.sqrt(2) / sp.sqrt(sp.pi) * x**2 * g)
    f = _fewer_passes(e)
    assert sp.count_ops(f) < sp.count_ops(e) and len(f.atoms(sp.exp)) == 1
    a, b = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    ns = {"torch": torch, "a": a, "b": b}
    want, got = (eval(_Named(["a", "b"]).doprint(z), ns) for z in (e, f))
    assert (want - got).abs().max() <= 1e-14
    assert _fewer_passes(x * y + X[2]) == x * y + X[2]


def test_inplace_printing_equals_the_plain_printer():
    """Full-sequence expressions printed to write into their own temporaries (`_InPlace`) give the plain
    printer's values, never write into an operand (named tensors, a column and a setup tile broadcast against
    full ones), and a hoisted expression's repeated x² is one temporary (gelu'' of the titans backward)."""
    import re

    import sympy as sp

    from codegen.tile_ir import X
    from codegen.tile_torch_fusion import INPLACE_HELPERS, _InPlace, _Named
    from codegen.torch_activations import TorchGelu
    a, b, c, d = X[:4]
    exprs = [a * b, 2 - a, -a, a - b, -a - b, 3 * a * b + c - 1, a / b, 1 / a, a * b / (c * d), (a * b) ** 2,
             sp.exp(-a**2 / 2) * (2 - a**2) * c, sp.exp(a) + sp.exp(b), a * b + c * d - a, TorchGelu(a * b) * c,
             sp.tanh(a * b) - a, a**2 + b**2, c * d, d * a, 0.5 * a * d + b,
             c**2 * a, sp.exp(c) * a + c]  # a fresh column times a full tile: out of place
    gen = torch.Generator().manual_seed(11)
    full = (2, 3, 4, 5, 6)
    vals = {"a": torch.rand(full, generator=gen, dtype=torch.float64) + 0.5,
            "b": torch.rand(full, generator=gen, dtype=torch.float64) + 0.5,
            "c": torch.rand(2, 3, 4, 5, 1, generator=gen, dtype=torch.float64) + 0.5,  # a column
            "d": torch.rand(5, 6, generator=gen, dtype=torch.float64) + 0.5}  # a setup tile
    names = list(vals)
    for e in exprs:
        before = {n: v.clone() for n, v in vals.items()}
        ns = {"torch": torch, **INPLACE_HELPERS, **vals}
        text = _InPlace(names).doprint(e)
        got, want = eval(text, ns), eval(_Named(names).doprint(e), ns)
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (e, text)
        assert all(torch.equal(vals[n], before[n]) for n in vals), (e, text)
    rule = memdsl.compile("rules/titans.mem")
    src = kernel_for(rule, _sizes(rule, 16), 16, "bwd").source(True)
    hoisted = [ln.strip() for ln in src.splitlines() if ln.startswith("    h")]
    assert sum(bool(re.fullmatch(r"h\d+ = torch.square\(t\d+\)", ln)) for ln in hoisted) == 1, hoisted
    assert sum(ln.count("exp") for ln in hoisted) == 1, hoisted


@pytest.mark.parametrize("T", [37, 32])
@pytest.mark.parametrize("wrt", [("q", "k", "v"), ("theta", "alpha"), ("v",)])
def test_backward_computes_only_the_gradients_asked_for(wrt, T):
    """The forward tells its backward which inputs require a gradient; the backward prints only those results
    (and the state cotangents): with no gate asking, the decay products' adjoints — the state inner products in
    the loop — are not computed. The gradients that are asked for equal the torch chunk program's."""
    rule = memdsl.compile("rules/titans.mem")
    tok, gates, params, state = inputs(rule, B=2, T=T, H=2, D=16)
    got, ref = ({n: t.clone().requires_grad_(n in wrt) for n, t in {**tok, **gates}.items()} for _ in range(2))
    for leaves, backend in ((got, "tiles"), (ref, "dual")):
        y, s = rule(leaves["q"], leaves["k"], leaves["v"], {n: leaves[n] for n in gates}, params, dict(state),
                    chunk=16, backend=backend)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
        ((y * w).sum() + sum(x.square().sum() for x in s.values())).backward()
    for n in wrt:
        assert rel_rms(got[n].grad, ref[n].grad) <= 1e-5, n
    bwd = kernel_for(rule, _sizes(rule, 16), 16, "bwd")
    # theta and alpha reach the kernel as their own (direct) inputs and through lr = theta, keep = 1 - alpha
    want = frozenset(f"tok_{n}" for n in wrt) | ({"lr", "keep"} if "theta" in wrt else set())
    assert (T % 16 != 0, True, True, want) in bwd._sources
    inner = ".sum((-2, -1), keepdim=True)"  # <state, cotangent>: the decay products' adjoints
    assert (inner in bwd.source(T % 16 != 0, stash=True, wrt=want)) == ("theta" in wrt)
    assert inner in bwd.source(T % 16 != 0, stash=True)


@pytest.mark.parametrize("chunk", [1, 3])
def test_initial_memory_gradient_alone(chunk):
    """Only the learned initial memory needs a gradient (a frozen model's memory fine-tuned; TNT stage two):
    every result comes back, and at chunk 1 the gates' direct terms are constant tiles, which the printer
    once returned as Python floats (`'tok_theta': 0.0`) and the driver crashed on."""
    rule = memdsl.compile("rules/titans.mem")
    tok, gates, params = make_inputs(rule, B=2, T=7, H=2, D=4, dtype=torch.float32)
    grads = {}
    for backend in ("tiles", "chunk"):
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        y, state = rule(tok["q"], tok["k"], tok["v"], gates, p, chunk=chunk, backend=backend)
        (y.sin().sum() + sum(s.square().sum() for s in state.values())).backward()
        grads[backend] = {n: t.grad for n, t in p.items()}
    assert grads["tiles"].keys() == grads["chunk"].keys() == {"W1", "W2"}
    for n in grads["chunk"]:
        assert rel_rms(grads["tiles"][n], grads["chunk"][n]) < 1e-5, n
