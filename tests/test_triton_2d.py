"""Generated Triton kernels of the 2-D rules against the torch tile program (CPU: TRITON_INTERPRET=1).

The kernels (codegen/triton_2d.py) run in fp32; the reference is `Runtime2D.tiles`
(backend "tiles") in float64 with the same inputs. Outputs, final state and the gradients of every
input — q, k, v, every gate, the initial memory (`params`) and the carried-in state — under random
cotangents, relative RMS ≤ 1e-5; odd T not a multiple of the tile, V below the tile's variates, several
variate chunks (the last one partial), a tile length that is not a power of two (padded rows), a
bidirectional rule (two launches), and a rule with a vector parameter and outer constants at a width
that is not a power of two (padded columns).
"""

from __future__ import annotations

import pytest
import torch

from memdsl.checking import rel_rms
from memdsl.twod import compile_2d
from tests.conftest import ROOT

TOL = 1e-5

LN_RULE = """
memory ln2d {
  axes time, variate
  param W : [d, d] init normal(std = 0.3)
  param b : [d] init normal(std = 0.3)
  outer ln_w : [d] init ones
  outer ln_b : [d] init zeros
  model M(x) = x + layernorm(W @ x + b, ln_w, ln_b)
  gate eta : scalar sigmoid
  gate dt  : scalar softplus
  gate dv  : scalar softplus
  loss sum((M(k) - v)^2)
  optim gd(lr = eta)
  retain time decay(exp(-dt))
  retain variate decay((1 - exp(-dt)) * exp(-dv))
  read M(q)
}
"""


def _inputs(rule, B, T, V, H, d, seed=0):
    """float64 leaves: tokens, activated gates (0.05-0.65, the range the layers give), the initial memory
    and a carried-in state for every direction; outer constants when the rule has them."""
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(B, T, V, H, d, generator=g, dtype=torch.float64) * 0.7 for _ in range(3)]
    gates = {n: torch.rand(B, T, V, H, generator=g, dtype=torch.float64) * 0.6 + 0.05
             for n in sorted(rule.spec1d["gates"])}
    sz = rule.sizes(toks[1], toks[2], toks[0])
    shapes = rule.module.shapes(sz)
    params = {t.name: torch.randn(H, *shapes[t.name], generator=g, dtype=torch.float64) * 0.3
              for t in rule.program.params}
    params.update({o: 1 + torch.randn(H, *shapes[o], generator=g, dtype=torch.float64) * 0.2
                   for o in rule.spec1d["outers"]})
    prefixes = ["A", "Ab"] if rule.program.axes.bidirectional else ["A"]
    state = {f"{pre}.{t.name}": torch.randn(B, H, V, *shapes[t.name], generator=g, dtype=torch.float64) * 0.3
             for pre in prefixes for t in rule.program.params}
    return toks, gates, params, state


def _run(rule, inputs, dtype, device="cpu", **kw):
    """Outputs, final state and the gradient of a fixed random functional of both w.r.t. every input (on CPU)."""
    toks, gates, params, state = inputs
    leaves = [x.to(dtype=dtype, device=device).requires_grad_()
              for x in [*toks, *gates.values(), *params.values(), *state.values()]]
    nt, ng, npar = len(toks), len(gates), len(params)
    tk = leaves[:nt]
    gs = dict(zip(gates, leaves[nt:nt + ng], strict=True))
    ps = dict(zip(params, leaves[nt + ng:nt + ng + npar], strict=True))
    st = dict(zip(state, leaves[nt + ng + npar:], strict=True))
    y, out = rule(*tk, gs, ps, st, **kw)
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device))
                      .sum() for s in out.values())
    names = [*"qkv", *gates, *params, *state]
    grads = [x.cpu() for x in torch.autograd.grad(loss, leaves)]
    return y.detach().cpu(), {k: s.detach().cpu() for k, s in out.items()}, dict(zip(names, grads, strict=True))


def _check(rule, B, T, V, H, d, tile):
    inputs = _inputs(rule, B, T, V, H, d)
    y, state, grads = _run(rule, inputs, torch.float32, backend="triton", tile=tile)
    y0, state0, grads0 = _run(rule, inputs, torch.float64, backend="tiles", tile=tile)
    assert not y.isnan().any()
    assert rel_rms(y, y0) <= TOL
    assert state.keys() == state0.keys()
    for k in state0:
        assert rel_rms(state[k], state0[k]) <= TOL, k
    for k in grads0:
        assert grads0[k].abs().max() > 0, k  # every gradient is exercised
        assert rel_rms(grads[k], grads0[k]) <= TOL, (k, rel_rms(grads[k], grads0[k]))


@pytest.mark.parametrize("name, tile, T, V", [
    ("hydra", (4, 4), 11, 3),      # ragged last tile, V < the tile's variates
    ("hydra", (3, 8), 7, 5),       # tile length 3 (padded to 4 rows), variates padded 5 -> 8
    ("chimera", (4, 4), 9, 3),     # bidirectional: two launches
    ("mamba2d", (8, 2), 13, 2),
    ("hydra", (4, 2), 6, 5),       # three variate chunks, the last one partial: rows passed between chunks
    ("chimera", (3, 2), 5, 3),     # two chunks, both directions
])
def test_kernels_match_the_torch_tiles(name, tile, T, V):
    rule = compile_2d(str(ROOT / "rules" / f"{name}.mem"))
    _check(rule, 2, T, V, 2, 4, tile)


def test_vector_param_outer_constants_and_padded_width():
    rule = compile_2d(LN_RULE)
    _check(rule, 1, 6, 3, 2, 3, (4, 4))


def test_an_exact_scan_runs_in_a_smaller_kernel_tile():
    """scan2d's result does not depend on the tile: a tile past the kernels' cells runs in a smaller one."""
    from codegen.triton_2d import kernel_tile
    rule = compile_2d(str(ROOT / "rules" / "mamba2d.mem"))
    assert kernel_tile(rule, (32, 8), 96, 7) == (16, 8)
    assert kernel_tile(rule, (64, 32), 96, 20) == (4, 32)
    inputs = _inputs(rule, 1, 9, 3, 1, 4)
    y, state, grads = _run(rule, inputs, torch.float32, backend="triton", tile=(64, 64))  # runs as 32 x 4
    y0, state0, grads0 = _run(rule, inputs, torch.float64, backend="wavefront")
    assert rel_rms(y, y0) <= TOL
    for k in grads0:
        assert rel_rms(grads[k], grads0[k]) <= TOL, k


def test_tile_1x1_kernel_is_the_exact_recurrence():
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    inputs = _inputs(rule, 1, 5, 1, 1, 4)
    y, state, grads = _run(rule, inputs, torch.float32, backend="triton", tile=(1, 1))
    y0, state0, grads0 = _run(rule, inputs, torch.float64, backend="wavefront")
    assert rel_rms(y, y0) <= TOL
    for k in grads0:
        assert rel_rms(grads[k], grads0[k]) <= TOL, k


def test_dispatch_and_refusals():
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    toks, gates, _, _ = _inputs(rule, 1, 5, 3, 1, 4)
    exact = compile_2d(str(ROOT / "rules" / "hydra.mem"), semantics="exact")
    with pytest.raises(ValueError, match="wavefront"):
        exact(*toks, gates, backend="triton")
    channels = compile_2d(LN_RULE.replace("gate eta : scalar sigmoid", "gate eta : [d] sigmoid"))
    ch_gates = {**gates, "eta": torch.rand(1, 5, 3, 1, 4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="per-channel"):
        channels(*toks, ch_gates, backend="triton", tile=(4, 4))
    sz = rule.sizes(toks[1], toks[2], toks[0])
    assert rule.triton_reason(sz, 5, 3, (4, 4)) is None
    assert rule.triton_reason(sz, 5, 9, (4, 2)) is None
    assert rule.triton_reason(sz, 96, 7, (16, 8)) is None
    # hydra's tile is part of its model: past the kernels' 128 cells there is no kernel (torch tiles run)
    assert "128 cells" in rule.triton_reason(sz, 96, 7, (32, 8))
    long_toks, long_gates, _, _ = _inputs(rule, 1, 40, 3, 1, 4)
    with pytest.raises(ValueError, match="128 cells"):  # 40 x 3 cells, padded to 64 x 4
        rule(*long_toks, long_gates, backend="triton", tile=(64, 4))
    # auto on CPU tensors is the torch tile program
    y_auto, _ = rule(*toks, gates, tile=(4, 4))
    y_tiles, _ = rule(*toks, gates, backend="tiles", tile=(4, 4))
    assert torch.equal(y_auto, y_tiles)


def _graph_for(rule, sz, tile):
    from codegen.tile2d_tiles import build_tile2d_graph
    from codegen.triton_2d import _program, _sizes_and_shapes
    program = _program(rule)
    sym, shapes = _sizes_and_shapes(program, sz)
    return build_tile2d_graph(program, rule.spec1d, shapes, sym, *tile), shapes


@pytest.mark.parametrize("name", ["hydra", "chimera"])
def test_tile_graph_and_its_adjoint_in_float64(name):
    """The math of both kernels, before printing: the tile graph driven tile by tile by the tile evaluator ==
    the torch tile program (one direction), and the graph's reverse mode (tile_grad) == autograd through the
    evaluated graph, float64."""
    from codegen.tile2d_tiles import mask_values
    from codegen.tile_eval import evaluate
    rule = compile_2d(str(ROOT / "rules" / f"{name}.mem"))
    B, T, V, H, d, tile, (Tp, Vp) = 1, 7, 3, 1, 4, (3, 4), (4, 4)
    (toks, gates, params, state) = _inputs(rule, B, T, V, H, d)
    sz = rule.sizes(toks[1], toks[2], toks[0])
    tok = {n: x.permute(0, 3, 1, 2, *range(4, x.dim())) for n, x in zip("qkv", toks, strict=True)}
    tok.update({n: g.permute(0, 3, 1, 2) for n, g in gates.items()})
    hyp = rule.hyper(tok, {}, sz)
    top = {p: w.unsqueeze(0) for p, w in params.items()}
    left = {p: state[f"A.{p}"] for p in params}
    y0, last0 = rule.runtime.tiles(tok, hyp["kt"], hyp["kv"], hyp["lr"], {}, sz, left, top, tile)
    graph, _ = _graph_for(rule, sz, (Tp, Vp))

    def cells(x, t0):  # [T, V, w] of (b, h) = (0, 0) -> the tile's rows r = v * Tp + t, zero outside the grid
        out = torch.zeros(Vp, Tp, x.shape[-1], dtype=torch.float64)
        part = x[t0:t0 + tile[0]].transpose(0, 1)
        out[:part.shape[0], :part.shape[1]] = part
        return out.reshape(Vp * Tp, -1)

    cur = {p: torch.zeros(Vp, w[0, 0, 0].numel(), dtype=torch.float64) for p, w in left.items()}
    for p in cur:
        cur[p][:V] = left[p][0, 0].reshape(V, -1)
    ys = []
    for t0 in range(0, T, tile[0]):
        inputs = {f"tok_{n}": cells(x[0, 0] if x.dim() == 5 else x[0, 0, ..., None], t0) for n, x in tok.items()}
        inputs.update({n: cells(hyp[n][0, 0, ..., :1] if n == "lr" else hyp[n][0, 0, ..., None], t0)
                       for n in ("kt", "kv", "lr")})
        inputs.update({f"L_{p}": cur[p] for p in cur})
        inputs.update({f"T_{p}": top[p][0, 0].reshape(1, -1) for p in top})
        inputs.update(mask_values(Tp, Vp, tile[0], T - t0, V))
        values = evaluate(graph, inputs)
        ys.append(values[graph.outputs["y"]].reshape(Vp, Tp, -1).transpose(0, 1)[:min(tile[0], T - t0), :V])
        cur = {p: values[graph.outputs[f"C_{p}"]] for p in cur}
    assert torch.allclose(torch.cat(ys), y0[0, 0], atol=1e-10, rtol=1e-10)
    for p in cur:
        assert torch.allclose(cur[p][:V], last0[p][0, 0].reshape(V, -1), atol=1e-10, rtol=1e-10)

    _adjoint_matches_autograd(graph, inputs)  # the last tile's


def _adjoint_matches_autograd(graph, inputs):
    """tile_grad's reverse mode of the graph == autograd through the evaluated graph (float64), for every
    non-mask input, under random cotangents on every output."""
    from codegen.tile_eval import evaluate
    from codegen.tile_grad import backward
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()
              if x.dtype != torch.bool and n in graph.inputs}
    values = evaluate(graph, {**inputs, **leaves})
    g = torch.Generator().manual_seed(2)
    outs = list(graph.outputs)
    cot = {o: torch.randn(values[graph.outputs[o]].shape, generator=g, dtype=torch.float64) for o in outs}
    loss = sum((values[graph.outputs[o]] * cot[o]).sum() for o in outs)
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True), strict=True))
    seeds = [(graph.outputs[o], graph.input(f"d{o}", graph.shape(graph.outputs[o]))) for o in outs]
    adj = backward(graph, seeds, [graph.inputs[n] for n in leaves])
    values = evaluate(graph, {**inputs, **{f"d{o}": cot[o] for o in outs}})
    assert any(e is not None and e.abs().max() > 0 for e in expected.values())
    for n in leaves:
        want = expected[n] if expected[n] is not None else torch.zeros_like(inputs[n])
        assert torch.allclose(values[adj[graph.inputs[n]]].expand_as(want), want, atol=1e-10, rtol=1e-9), n


@pytest.mark.parametrize("name", ["hydra", "chimera"])
def test_the_several_chunk_graph_adjoint_in_float64(name):
    """The graph of a tile with a row above ([Tp, F]) and a last-row output, its adjoint against autograd."""
    from codegen.tile2d_tiles import build_tile2d_graph, mask_values
    from codegen.triton_2d import _program, _sizes_and_shapes
    rule = compile_2d(str(ROOT / "rules" / f"{name}.mem"))
    probe = torch.zeros(1, 1, 1, 1, 4)
    program = _program(rule)
    sym, shapes = _sizes_and_shapes(program, rule.sizes(probe, probe, probe))
    Tp, Vp = 4, 4
    graph = build_tile2d_graph(program, rule.spec1d, shapes, sym, Tp, Vp, rows=True)
    g = torch.Generator().manual_seed(3)
    inputs = mask_values(Tp, Vp, 3, 3, 3, Vc=3)  # a 3 x 3 tile in 4 x 4 padded cells, the last one of both axes
    for n, i in graph.inputs.items():
        if n not in inputs and not n.startswith("d"):
            shape = graph.shape(i)
            positive = n in ("kt", "kv", "lr") or n in rule.spec1d["gates"] or n.startswith("tok_") and \
                n[4:] in rule.spec1d["gates"]
            x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.6 + 0.05 if positive else \
                torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
            inputs[n] = x
    _adjoint_matches_autograd(graph, inputs)


def test_auto_falls_back_to_the_torch_tiles_when_a_kernel_fails(monkeypatch):
    """On a device where Triton cannot compile or launch the 2-D kernels (say, out of shared memory), `auto`
    warns once, runs the torch tiles (the same function) for both directions and does not try the kernels
    again at these sizes; backend="triton" raises. No GPU here: auto's choice and the launch are replaced."""
    from triton.runtime.errors import OutOfResources

    from codegen import triton_2d
    from memdsl import twod
    rule = compile_2d(str(ROOT / "rules" / "chimera.mem"))  # bidirectional: two kernel calls per call
    inputs = _inputs(rule, 1, 7, 3, 2, 4)
    want = _run(rule, inputs, torch.float32, backend="tiles")
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        raise OutOfResources(262144, 232448, "shared memory")
    monkeypatch.setattr(triton_2d, "tiles", failing)
    monkeypatch.setattr(twod.Rule2D, "_backend", lambda self, backend, *a: twod.Rule2D.AUTO if backend == "auto"
                        else backend)
    with pytest.warns(RuntimeWarning, match="failed here.*OutOfResources"):
        got = _run(rule, inputs, torch.float32)
    assert len(calls) == 1  # the second direction did not try the kernels again
    assert torch.equal(got[0], want[0]) and all(torch.equal(got[2][k], want[2][k]) for k in want[2])
    _run(rule, inputs, torch.float32)
    assert len(calls) == 1
    with pytest.raises(OutOfResources):
        _run(rule, inputs, torch.float32, backend="triton")


@pytest.mark.parametrize("source, tile, T, V", [
    ("hydra", (4, 2), 9, 5),    # several variate chunks: the kernels' row buffers
    ("chimera", (4, 4), 9, 3),  # bidirectional: two backward kernels fail, one warning
    (LN_RULE, (4, 4), 7, 3),    # outer constants: their gradients come back summed over the batch
])
def test_auto_falls_back_when_the_backward_kernel_fails(monkeypatch, source, tile, T, V):
    """The backward kernels are compiled at the first backward, after the forward kernels ran. When Triton
    cannot run one here (out of shared memory, say), `auto` warns once, recomputes that backward on the torch
    tiles from the kernels' own inputs (the gradients equal the torch tiles') and runs the torch tiles at
    these sizes from then on; backend="triton" raises. No GPU: auto's choice is replaced, the forward kernels
    run in Triton's interpreter and the backward kernels fail as the device would."""
    from triton.runtime.errors import OutOfResources

    from codegen import triton_2d
    from memdsl import twod
    rule = compile_2d(str(ROOT / "rules" / f"{source}.mem") if source.isidentifier() else source)
    monkeypatch.setattr(rule, "_kernel_failures", {}, raising=False)  # compiled rules are shared per process
    inputs = _inputs(rule, 1, T, V, 2, 4)
    want = _run(rule, inputs, torch.float32, backend="tiles", tile=tile)
    kernel_for, built = triton_2d.kernel_for, []

    class Failing:
        def __getitem__(self, grid):
            def run(*a, **kw):
                raise OutOfResources(262144, 232448, "shared memory")
            return run

    def kernels(rule, sz, padded, direction, rows=False):
        built.append(direction)
        return Failing() if direction == "bwd" else kernel_for(rule, sz, padded, direction, rows)
    monkeypatch.setattr(triton_2d, "kernel_for", kernels)
    monkeypatch.setattr(twod.Rule2D, "_backend", lambda self, backend, *a: twod.Rule2D.AUTO if backend == "auto"
                        else backend)
    with pytest.warns(RuntimeWarning, match="failed here.*OutOfResources") as caught:
        got = _run(rule, inputs, torch.float32, tile=tile)
    assert len([w for w in caught if "failed here" in str(w.message)]) == 1
    assert "fwd" in built and "bwd" in built
    assert rel_rms(got[0], want[0]) <= TOL
    for k in want[1]:
        assert rel_rms(got[1][k], want[1][k]) <= TOL, k
    for k in want[2]:
        assert want[2][k].abs().max() > 0, k
        assert rel_rms(got[2][k], want[2][k]) <= TOL, (k, rel_rms(got[2][k], want[2][k]))
    n = len(built)
    _run(rule, inputs, torch.float32, tile=tile)  # remembered: the torch tiles, no kernel built again
    assert len(built) == n
    with pytest.raises(OutOfResources):
        _run(rule, inputs, torch.float32, backend="triton", tile=tile)
