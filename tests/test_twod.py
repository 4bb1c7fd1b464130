"""2-D rules (time × variate): the exact wavefront, the tiled program and the anchored token oracle agree
where the semantics says they must, forward and every gradient, in float64.

Oracle hierarchy (DESIGN.md, for two axes):
* scan2d rules (Chimera, 2-D Mamba-2): the tiled 2-D scan == the exact wavefront for every tile;
* anchored2d rules (Hydra): the tiled program == the token-serial anchored loop for every tile, and
  == the exact wavefront at tile 1 × 1 (and not at larger tiles: the tile is part of the model);
* a hand-written double loop pins the recurrence itself, and bidirectional == forward + reversed forward.
"""

from __future__ import annotations

import pytest
import torch

from memdsl.twod import compile_2d
from tests.conftest import ROOT, RULES_2D

B, T, V, H, D = 2, 9, 5, 2, 3
TILES = [(1, 1), (2, 3), (4, 2), (5, 5), (64, 64)]


def _inputs(rule, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = [torch.randn(B, T, V, H, D, generator=g, dtype=torch.float64).requires_grad_() for _ in range(3)]
    # gates arrive activated (the layer applies sigmoid/softplus): positive values in the range they take
    gates = {n: (torch.rand(B, T, V, H, generator=g, dtype=torch.float64) * 0.6 + 0.05).requires_grad_()
             for n in sorted(rule.spec1d["gates"])}
    return toks, gates


def _run(rule, toks, gates, **kw):
    """Outputs, final state and the gradients of a fixed random functional of both w.r.t. every input."""
    y, state = rule(*toks, gates, **kw)
    g = torch.Generator().manual_seed(1)
    # cotangents drawn in float64 whatever the dtype, so float32 and float64 runs get the same ones
    loss = (y * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)).sum()
    loss = loss + sum((s * torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype)).sum()
                      for s in state.values())
    inputs = [*toks, *gates.values()]
    grads = torch.autograd.grad(loss, inputs)
    return y.detach(), {k: s.detach() for k, s in state.items()}, grads


def _close(a, b, tol=1e-9):
    ya, sa, ga = a
    yb, sb, gb = b
    assert torch.allclose(ya, yb, atol=tol, rtol=tol), (ya - yb).abs().max()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.allclose(sa[k], sb[k], atol=tol, rtol=tol), (k, (sa[k] - sb[k]).abs().max())
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, atol=tol, rtol=tol), (x - y).abs().max()


def test_the_2d_rules_are_classified():
    names = {p.stem: compile_2d(str(p)).algorithm for p in RULES_2D}
    assert names == {"chimera": "scan2d", "mamba2d": "scan2d", "hydra": "anchored2d"}


@pytest.mark.parametrize("name", ["chimera", "mamba2d"])
def test_scan2d_is_exact_for_every_tile(name):
    rule = compile_2d(str(ROOT / "rules" / f"{name}.mem"))
    toks, gates = _inputs(rule)
    exact = _run(rule, toks, gates, backend="wavefront")
    for tile in TILES:
        _close(_run(rule, toks, gates, backend="tiles", tile=tile), exact)


@pytest.mark.parametrize("tile", [(1, 1), (2, 3), (4, 2), (3, 5)])
def test_hydra_tiles_match_the_anchored_token_loop(tile):
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    toks, gates = _inputs(rule)
    _close(_run(rule, toks, gates, backend="tiles", tile=tile),
           _run(rule, toks, gates, backend="anchored_loop", tile=tile))


def test_hydra_tile_1x1_is_exact_and_larger_tiles_are_not():
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    toks, gates = _inputs(rule)
    exact = _run(rule, toks, gates, backend="wavefront")
    _close(_run(rule, toks, gates, backend="tiles", tile=(1, 1)), exact)
    y_tiled = _run(rule, toks, gates, backend="tiles", tile=(4, 3))[0]
    assert (y_tiled - exact[0]).abs().max() > 1e-6  # the anchor differs: tiles are a different model


def test_the_recurrence_by_hand():
    """mamba2d against a plain double loop over cells, written from the rule's header."""
    rule = compile_2d(str(ROOT / "rules" / "mamba2d.mem"))
    (q, k, v), gates = _inputs(rule)
    y, _ = rule(q, k, v, gates, backend="tiles", tile=(4, 2))
    dt, dv = gates["dt"], gates["dv"]
    W = {}
    for t in range(T):
        for u in range(V):
            kt, kv = torch.exp(-dt[:, t, u]), (1 - torch.exp(-dt[:, t, u])) * torch.exp(-dv[:, t, u])
            prev_t = W[(t - 1, u)] if t else torch.zeros(B, H, D, D, dtype=q.dtype)
            prev_v = W[(t, u - 1)] if u else torch.zeros(B, H, D, D, dtype=q.dtype)
            step = dt[:, t, u, :, None, None] * v[:, t, u, :, :, None] * k[:, t, u, :, None, :]
            W[(t, u)] = kt[..., None, None] * prev_t + kv[..., None, None] * prev_v + step
            want = (W[(t, u)] @ q[:, t, u, :, :, None])[..., 0]
            assert torch.allclose(y[:, t, u], want, atol=1e-10), (t, u)


def test_bidirectional_is_forward_plus_reversed_forward():
    text = (ROOT / "rules" / "chimera.mem").read_text()
    both, forward = compile_2d(text), compile_2d(text.replace("variate bidirectional", "variate"))
    assert forward.program.axes.bidirectional is False
    (q, k, v), gates = _inputs(both)
    y, state = both(q, k, v, gates, tile=(4, 2))
    y_f, s_f = forward(q, k, v, gates, tile=(4, 2))
    y_b, s_b = forward(q.flip(2), k.flip(2), v.flip(2), {n: g.flip(2) for n, g in gates.items()}, tile=(4, 2))
    assert torch.allclose(y, y_f + y_b.flip(2), atol=1e-10)
    assert torch.allclose(state["Ab.W"], s_b["A.W"], atol=1e-10)


@pytest.mark.parametrize(("name", "tile"), [("chimera", (3, 2)), ("hydra", (3, 2))])
def test_state_carries_across_calls(name, tile):
    """Two calls (T = 6 then 3) equal one call over T = 9 when the split falls on a tile boundary."""
    rule = compile_2d(str(ROOT / "rules" / f"{name}.mem"))
    (q, k, v), gates = _inputs(rule)
    y, state = rule(q, k, v, gates, tile=tile)
    first = rule(q[:, :6], k[:, :6], v[:, :6], {n: g[:, :6] for n, g in gates.items()}, tile=tile)
    second = rule(q[:, 6:], k[:, 6:], v[:, 6:], {n: g[:, 6:] for n, g in gates.items()},
                  state=first[1], tile=tile)
    assert torch.allclose(torch.cat([first[0], second[0]], dim=1), y, atol=1e-10)
    for key in state:
        assert torch.allclose(second[1][key], state[key], atol=1e-10)


def test_float32_tiles_track_float64():
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    (q, k, v), gates = _inputs(rule)
    y64, _ = rule(q, k, v, gates)
    y32, _ = rule(q.float(), k.float(), v.float(), {n: g.float() for n, g in gates.items()})
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), y64, atol=1e-4, rtol=1e-4)


def test_bad_calls_say_what_is_wrong():
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    (q, k, v), gates = _inputs(rule)
    with pytest.raises(ValueError, match=r"\[B, T, V, H, D\]"):
        rule(q[:, :, 0], k, v, gates)
    with pytest.raises(ValueError, match="takes gates"):
        rule(q, k, v, {"eta": gates["eta"]})
    with pytest.raises(ValueError, match="unknown params"):
        rule(q, k, v, gates, {"A.W1": q})
    with pytest.raises(ValueError, match="backend"):
        rule(q, k, v, gates, backend="chunk")
    with pytest.raises(ValueError, match="1-D"):
        compile_2d(str(ROOT / "rules" / "titans.mem"))


def test_memdsl_compile_refuses_a_1d_option_on_a_2d_rule():
    """memdsl.compile returns the Rule2D (tests/test_module_2d.py); a 1-D chunk would be silently dropped."""
    import memdsl
    assert memdsl.compile(str(ROOT / "rules" / "chimera.mem")).algorithm == "scan2d"
    with pytest.raises(ValueError, match="2-D.*chunk is a 1-D option"):
        memdsl.compile(str(ROOT / "rules" / "chimera.mem"), chunk=16)


ETTH1 = ROOT.parent / "shared" / "data" / "ltsf" / "ETTh1.csv.gz"


@pytest.mark.skipif(not ETTH1.exists(), reason="needs ../shared/data/ltsf/ETTh1.csv.gz")
def test_forecast_example_beats_the_naive_forecast():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "06_forecast.py"), "--rule", "mamba2d",
                          "--steps", "4", "--batch", "4", "--test-limit", "64"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.rstrip().endswith("ok")


@pytest.mark.parametrize("tile", [(4, 5), (3, 2)])
def test_float32_tiles_and_every_gradient_track_the_float64_oracle(tile):
    """float32 tiles against the float64 anchored loop, outputs and every input gradient: one variate chunk
    (the boundary row above is the initial memory, one source column) and several."""
    rule = compile_2d(str(ROOT / "rules" / "hydra.mem"))
    toks, gates = _inputs(rule, seed=3)
    want = _run(rule, toks, gates, backend="anchored_loop", tile=tile)
    toks32 = [x.detach().float().requires_grad_() for x in toks]
    gates32 = {n: g.detach().float().requires_grad_() for n, g in gates.items()}
    got = _run(rule, toks32, gates32, backend="tiles", tile=tile)
    assert got[0].dtype == torch.float32
    for a, b in [(got[0], want[0]), *zip(got[1].values(), want[1].values(), strict=True),
                 *zip(got[2], want[2], strict=True)]:
        err = (a.double() - b).norm() / b.norm()
        assert err < 1e-5, err
