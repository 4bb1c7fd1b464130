"""The tile IR behind the Triton kernels: every adjoint rule, and the generated backward of every
covered rule's chunk graph, against torch.autograd (float64, evaluated in torch, no Triton)."""

from __future__ import annotations

import pytest
import sympy as sp
import torch

import memdsl
from codegen.module import factor_outputs
from codegen.tile_eval import evaluate
from codegen.tile_grad import backward
from codegen.tile_ir import TileGraph, X
from codegen.triton_gen import _graph, _Layout
from memdsl.driver import load
from tests.test_triton import COVERED


def _check_adjoints(graph: TileGraph, inputs: dict[str, torch.Tensor], outputs: list[int], atol=1e-9):
    """Seed every output with a random cotangent; compare generated adjoints with autograd."""
    gen = torch.Generator().manual_seed(7)
    seeds, cots = [], {}
    for i, out in enumerate(outputs):
        name = f"seed{i}"
        cots[name] = torch.randn(graph.shape(out), generator=gen, dtype=torch.float64)
        seeds.append((out, graph.input(name, graph.shape(out))))
    wrt = [i for n, i in graph.inputs.items() if i not in graph.boolean and not n.startswith("seed")]
    adj = backward(graph, seeds, wrt)
    leaves = {n: (x.clone().requires_grad_() if x.dtype == torch.float64 else x) for n, x in inputs.items()}
    values = evaluate(graph, {**leaves, **cots})
    loss = sum((values[o] * cots[f"seed{i}"]).sum() for i, o in enumerate(outputs))
    names = [graph.nodes[i].attrs[0] for i in wrt]
    auto = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    for name, i, a in zip(names, wrt, auto, strict=True):
        expected = torch.zeros(graph.shape(i), dtype=torch.float64) if a is None else a
        got = values[adj[i]].expand(graph.shape(i))
        assert torch.allclose(got, expected, atol=atol, rtol=1e-7), name
        assert not torch.isnan(got).any(), name


def test_every_adjoint_rule_matches_autograd():
    g = TileGraph()
    a, b = g.input("a", (5, 3)), g.input("b", (3, 4))
    row, col = g.input("row", (1, 4)), g.input("col", (5, 1))
    mask = g.input("mask", (5, 4), boolean=True)
    d = g.dot(a, b)                                        # dot
    e = g.ew(sp.tanh(X[0]) * X[1] + sp.Piecewise((X[0] ** 2, X[0] > 0), (-X[0], True)), d, row)  # ew, broadcast
    f = g.where(mask, e, g.ew(sp.exp(X[0]), col))          # where, both branches
    h = g.cumsum(g.trans(f), axis=1)                       # trans, cumsum
    k = g.cumsum(h, axis=0, reverse=True)                  # reversed cumsum
    s = g.sum(g.expand(col, (5, 4)), axis=1)               # expand, sum
    sq = g.input("sq", (4, 4))
    strict = g.input("strict", (4, 4), boolean=True)
    inv = g.dot(g.trinv(g.ew(0.3 * X[0], sq), strict), g.trans(row))  # trinv
    gen = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(g.shape(i), generator=gen, dtype=torch.float64) for n, i in g.inputs.items()
              if i not in g.boolean}
    inputs["mask"] = torch.rand(5, 4, generator=gen) > 0.4
    inputs["strict"] = torch.ones(4, 4).tril(-1).bool()
    _check_adjoints(g, inputs, [k, s, g.sum(f, axis=0), inv])


def test_per_position_state_ops_match_autograd():
    """The ops of state_tiles and muon_tiles: a state flattened to a row (reshape), per-position states
    [r, m*n] times a vector (kron_da, kron_db), a row softmax whose shift (gmax) has no adjoint, the
    position-major <-> channel-major permutes and per-row matrix products (bmm)."""
    g = TileGraph()
    w, x, xm = g.input("w", (5, 12)), g.input("x", (5, 4)), g.input("xm", (1, 3))
    flat = g.reshape(g.input("st", (3, 4)), (1, 12))
    ones = g.expand(g.const(1.0), (1, 4))
    states = g.ew(X[0] * X[1], w, flat)
    e = g.ew(sp.exp(X[0] - X[1]), states, g.kron(g.gmax(states, 4), ones))
    soft = g.ew(X[0] / X[1], e, g.kron(g.kron_da(e, ones, 3), ones))
    outs = [g.kron_da(soft, x, 3), g.kron_db(states, xm, 4), g.reshape(g.sum(states, axis=0), (3, 4))]
    outs += [g.permute(states, (5, 3, 4), (1, 0, 2)), g.permute(states, (5, 3, 4), (2, 0, 1))]  # channel-major
    for ta in (False, True):  # per-row matrix products (Muon's Newton–Schulz), either side stored transposed
        for tb in (False, True):
            m, k = (4, 3) if ta else (3, 4)  # states' rows are 3 x 4 matrices
            outs.append(g.bmm(states, g.input(f"b{ta:d}{tb:d}", (1, k * 2)), m, k, 2, ta, tb))
    gen = torch.Generator().manual_seed(2)
    inputs = {n: torch.randn(g.shape(i), generator=gen, dtype=torch.float64) for n, i in g.inputs.items()}
    values = evaluate(g, inputs)
    rows = (inputs["w"] * inputs["st"].reshape(1, 12)).reshape(5, 3, 4).softmax(-1)
    assert torch.allclose(values[outs[0]], torch.einsum("rmn,rn->rm", rows, inputs["x"]))
    w3 = values[states].reshape(5, 3, 4)
    assert torch.allclose(values[outs[4]], w3.permute(2, 0, 1).reshape(4, 15))
    assert torch.allclose(values[outs[5]], (w3 @ inputs["b00"].reshape(4, 2)).reshape(5, 6))
    assert torch.allclose(values[outs[8]], (w3.mT @ inputs["b11"].reshape(2, 3).mT).reshape(5, 8))
    _check_adjoints(g, inputs, outs)


def test_constants_fold_and_unused_operands_drop():
    g = TileGraph()
    a = g.input("a", (2, 2))
    assert g.mul(g.const(1.0), a) == a
    assert g.add2(a, g.const(0.0)) == a
    assert g.nodes[g.ew(X[0] * 2 + 0 * X[1], a, g.input("b", (2, 1)))].args == (a,)
    assert g.trans(g.trans(a)) == a


@pytest.mark.parametrize("path", COVERED, ids=[p.stem for p in COVERED])
def test_generated_chunk_backward_matches_autograd(path):
    """The backward kernels print exactly this adjoint graph: checking it in float64 pins the math,
    a ragged chunk (padded rows) included."""
    rule = memdsl.compile(str(path))
    program = load(rule.module.RULE_SOURCE)
    factor_outputs(program)
    C, T_valid = 6, 4
    sizes = rule.impl.sizes(sizes={"d": 4})
    layout = _Layout(program, rule.spec, {n: int(v) for n, v in sizes.items()})
    graph = _graph(program, rule.spec, layout, C)
    gen = torch.Generator().manual_seed(1)
    inputs = {}
    for name, i in graph.inputs.items():
        shape = graph.shape(i)
        if name in graph.mask_defs:  # index masks (padding, concat placement) are built by the evaluator
            continue
        if name in ("keep", "mu"):
            inputs[name] = 0.6 + 0.4 * torch.rand(shape, generator=gen, dtype=torch.float64)
        elif name in ("lr", "scale") or name.startswith("tok_") and shape[1] == 1:
            inputs[name] = 0.05 + 0.3 * torch.rand(shape, generator=gen, dtype=torch.float64)
        elif name not in ("lower", "strict", "shift", "valid", "is_last", "hist_valid", "first", "later"):
            inputs[name] = 0.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = torch.arange(C)
    inputs["lower"] = rows[:, None] >= rows[None, :]
    inputs["strict"] = rows[:, None] > rows[None, :]
    inputs["shift"] = rows[:, None] == rows[None, :] + 1  # the sub-diagonal: decays in linear space (trinv)
    inputs["valid"] = (rows < T_valid)[:, None]
    inputs["is_last"] = (rows == T_valid - 1)[:, None]
    inputs["first"] = (rows == 0)[:, None]  # a lag token's own segment, and the rows after it
    inputs["later"] = ((rows > 0) & (rows < T_valid))[:, None]
    if "hist_valid" in graph.inputs:  # window history: the first history row is before the sequence
        hh = graph.shape(graph.inputs["hist_valid"])[0]
        inputs["hist_valid"] = (torch.arange(hh) >= 1)[:, None]
    inputs = {n: x for n, x in inputs.items() if n in graph.inputs}
    for name in list(inputs):  # padded rows hold what the kernel loads there: zeros, lr 0, keep 1
        if inputs[name].dtype == torch.float64 and inputs[name].shape[0] == C and name != "lower":
            inputs[name][T_valid:] = 1.0 if name in ("keep", "mu") else 0.0
    _check_adjoints(graph, inputs, list(graph.outputs.values()), atol=1e-8)


@pytest.mark.parametrize("C", [4, 16])
def test_decay_coefficients_are_plain_products_with_exact_gradients(C):
    """D_ij = prod_{j<l<=i} keep_l and abar_i = prod_{l<=i} keep_l, scalar (trinv) and per channel (bmm
    doubling), against torch's cumulative products, values and gradients, with keeps of exactly 0 and below
    0. The log-space form these replace gave d/dkeep = 0 at a zero keep and clamped negative keeps to 1e-30."""
    from codegen.chunk_tiles import decay_coefficients
    from codegen.state_tiles import channel_decays
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(C, 3, generator=gen, dtype=torch.float64)
    keep[1, 0] = keep[C - 1, 1] = keep[2, 2] = 0.0
    keep[C // 2, 0] = -0.7

    def reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [C, w] -> D [w, C, C], abar [C, w]
        i, j = torch.arange(C)[:, None], torch.arange(C)[None, :]
        rows = [torch.stack([x[j0 + 1:i0 + 1, c].prod() if j0 <= i0 else x.new_zeros(()) for i0 in range(C)
                             for j0 in range(C)]).reshape(C, C) for c in range(x.shape[1])]
        return torch.stack(rows) * (i >= j), x.cumprod(0)

    bools = {"shift": torch.arange(C)[:, None] == torch.arange(C)[None, :] + 1,
             "strict": torch.arange(C)[:, None] > torch.arange(C)[None, :], "first": (torch.arange(C) == 0)[:, None]}
    for width in (1, 3):
        g = TileGraph()
        for name, value in bools.items():
            g.input(name, tuple(value.shape), boolean=True)
        k = g.input("keep", (C, width))
        D, abar = decay_coefficients(g, k, C) if width == 1 else channel_decays(g, k, C)
        x = keep[:, :width].clone().requires_grad_()
        values = evaluate(g, {**bools, "keep": x})
        D_ref, abar_ref = reference(keep[:, :width])
        assert torch.allclose(values[D].reshape(width, C, C), D_ref, atol=1e-15)
        assert torch.allclose(values[abar], abar_ref, atol=1e-15)
        ct_d, ct_a = torch.randn(D_ref.shape, generator=gen, dtype=torch.float64), torch.randn(C, width, generator=gen,
                                                                                               dtype=torch.float64)
        (got,) = torch.autograd.grad((values[D].reshape(D_ref.shape) * ct_d).sum() + (values[abar] * ct_a).sum(), x)
        xr = keep[:, :width].clone().requires_grad_()
        D_r, abar_r = reference(xr)
        (want,) = torch.autograd.grad((D_r * ct_d).sum() + (abar_r * ct_a).sum(), xr)
        assert torch.allclose(got, want, atol=1e-12) and want[1, 0] != 0  # a zero keep's own gradient
        _check_adjoints(g, {**bools, "keep": keep[:, :width].clone()}, [D, abar])
