"""Numerics: gradient clipping of the inner update (every backend, against a hand-written oracle),
long sequences without NaN/Inf on every shipped rule, and the `check_finite` mode."""

from __future__ import annotations

import re

import pytest
import torch

import memdsl
from codegen.module import generate
from codegen.triton_gen import supported
from memdsl.api import CompiledRule
from memdsl.checking import compare_runs, make_inputs, run_with_grads
from memdsl.driver import load
from memdsl.errors import ValueRangeError
from memdsl.twod import compile_2d
from tests.conftest import ROOT, RULE_2D_IDS, RULE_IDS, RULES, RULES_2D

CLIP_RULES = ["deltanet", "titans", "titans_linear", "ttt_linear", "omeganet", "atlas", "moneta", "memora",
              "linear_attention"]


def with_clip(text: str, clip: str = "0.05") -> str:
    return re.sub(r"optim (\w+)\(", rf"optim \1(clip = {clip}, ", text, count=1)


def in_memory(source: str) -> CompiledRule:
    """Compile without the disk cache: these rules exist only in the test."""
    return CompiledRule(generate(load(source)), "test")


def worst(errs: dict[str, tuple[float, float]]) -> float:
    return max(rel for _, rel in errs.values())


def test_clipped_delta_rule_matches_a_hand_written_loop():
    # W_t = W_{t-1} - beta_t g_t min(1, c / |g_t|),  g_t = (W_{t-1} k_t - v_t) k_t^T  (loss ½|Wk - v|²)
    rule = in_memory(with_clip(open("rules/deltanet.mem").read(), "0.1"))
    tok, gates, params = make_inputs(rule, B=2, T=11, H=2, D=4)
    y, state = rule(tok["q"], tok["k"], tok["v"], gates, params, backend="loop")
    W = params["W"].unsqueeze(0).expand(2, -1, -1, -1).clone()   # [B, H, d, d]
    ys, clipped = [], 0
    for t in range(11):
        q, k, v, beta = (tok["q"][:, t], tok["k"][:, t], tok["v"][:, t], gates["beta"][:, t])
        g = (torch.einsum("bhij,bhj->bhi", W, k) - v).unsqueeze(-1) * k.unsqueeze(-2)
        norm = g.flatten(2).norm(dim=-1)[..., None, None]
        clipped += int((norm > 0.1).sum())
        W = W - beta[..., None, None] * g * torch.clamp(0.1 / norm, max=1.0)
        ys.append(torch.einsum("bhij,bhj->bhi", W, q))
    assert clipped > 0  # the bound is active, so the test sees the clipping
    torch.testing.assert_close(y, torch.stack(ys, dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state["A.W"], W, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", CLIP_RULES)
def test_clip_agrees_across_backends(name):
    rule = in_memory(with_clip(open(f"rules/{name}.mem").read()))
    plain = in_memory(open(f"rules/{name}.mem").read())
    assert rule.spec["clip"] == 0.05 and rule.algorithm != "wy"  # clipping is not linear in the state
    tok, gates, params = make_inputs(rule, B=1, T=9, H=2, D=3)
    exact = run_with_grads(rule, tok, gates, params, backend="loop")
    assert not torch.allclose(exact[0], run_with_grads(plain, tok, gates, params, backend="loop")[0])
    assert worst(compare_runs(run_with_grads(rule, tok, gates, params, backend="chunk", chunk=1), exact)) < 1e-8
    anchored = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=4)
    assert worst(compare_runs(run_with_grads(rule, tok, gates, params, backend="chunk", chunk=4), anchored)) < 1e-8
    if rule.spec["dual"]:
        assert worst(compare_runs(run_with_grads(rule, tok, gates, params, backend="dual", chunk=4),
                                  anchored)) < 1e-8


def test_a_large_clip_changes_nothing():
    src = open("rules/titans.mem").read()
    rule, plain = in_memory(with_clip(src, "1e6")), in_memory(src)
    tok, gates, params = make_inputs(rule, B=1, T=7, H=1, D=3)
    a, b = run_with_grads(rule, tok, gates, params), run_with_grads(plain, tok, gates, params)
    assert worst(compare_runs(a, b)) < 1e-12


def test_clip_is_printed_and_refused_by_triton():
    program = load(with_clip(open("rules/titans_linear.mem").read(), "2.5"))
    rule = CompiledRule(generate(program), "test")
    assert "clip=2.5" in rule.module.SUMMARY
    assert supported(program, rule.spec) == "gradient clipping (optim clip)"


@pytest.mark.parametrize("value", ["0", "theta", "-1", "1 + 1"])
def test_bad_clip_values_are_positioned_errors(value):
    src = with_clip(open("rules/titans.mem").read(), value)
    with pytest.raises(ValueRangeError) as err:
        load(src)
    line = src.splitlines()[err.value.span.line - 1]
    assert "`clip` must be a positive number" in err.value.message
    assert line[err.value.span.col - 1:].startswith(value.split()[0])  # the caret is on the value


@pytest.mark.slow
@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_long_sequences_stay_finite(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, B=1, T=65536, H=1, D=8, dtype=torch.float32)
    with torch.no_grad():
        y, state = rule(tok["q"], tok["k"], tok["v"], gates, params)  # the rule's own chunk algorithm
    assert y.shape[1] == 65536 and torch.isfinite(y).all()
    assert all(torch.isfinite(s).all() for s in state.values())


@pytest.mark.slow
@pytest.mark.parametrize("path", RULES_2D, ids=RULE_2D_IDS)
def test_long_sequences_stay_finite_in_2d(path):
    """65,536 time steps x 9 variates: two variate tiles at the shipped tile width 8, so the variate carry
    between tiles runs as well. Inputs as MemoryLayer makes them (unit q, k), activated gates in [0.05, 0.35]."""
    rule = compile_2d(str(path))
    T, V = 65536, 9
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, V, 1, 8, generator=gen) for _ in range(3))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    gates = {n: 0.05 + 0.3 * torch.rand(1, T, V, 1, generator=gen) for n in sorted(rule.spec1d["gates"])}
    with torch.no_grad():
        y, state = rule(q, k, v, gates)  # the rule's own algorithm (scan2d or anchored2d tiles)
    assert tuple(y.shape[1:3]) == (T, V) and torch.isfinite(y).all()
    assert state and all(torch.isfinite(s).all() for s in state.values())


@pytest.mark.parametrize("name, backend", [("titans", "auto"), ("deltanet", "auto"), ("omeganet", "chunk"),
                                           ("memora", "auto"), ("ttt_linear", "loop")])
def test_check_finite_computes_the_same_thing(name, backend):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, B=1, T=37, H=2, D=3)
    y0, s0 = rule(tok["q"], tok["k"], tok["v"], gates, params, backend=backend, chunk=8)
    y1, s1 = rule(tok["q"], tok["k"], tok["v"], gates, params, backend=backend, chunk=8, check_finite=True)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    assert s0.keys() == s1.keys() and all(torch.allclose(s0[n], s1[n], rtol=1e-12, atol=1e-12) for n in s0)


def test_check_finite_names_the_first_chunk_that_overflows():
    rule = memdsl.compile("rules/titans_linear.mem")
    tok, gates, params = make_inputs(rule, B=1, T=400, H=1, D=4, dtype=torch.float32)
    gates["theta"] = gates["theta"] * 1e4  # a learning rate that makes the memory diverge
    with pytest.raises(FloatingPointError) as err:
        rule(tok["q"], tok["k"], tok["v"], gates, params, check_finite=True)
    m = re.search(r"is not finite after chunk (\d+) of 25 \(tokens (\d+)\.\.(\d+), chunk size 16\)", str(err.value))
    assert m and type(err.value).__name__ == "NonFiniteError", str(err.value)
    s, e = int(m.group(2)), int(m.group(3)) + 1

    def finite_upto(t):  # one plain call over the first t tokens
        y, state = rule(tok["q"][:, :t], tok["k"][:, :t], tok["v"][:, :t], {n: g[:, :t] for n, g in gates.items()},
                        params)
        return bool(torch.isfinite(y).all()) and all(torch.isfinite(x).all() for x in state.values())
    assert int(m.group(1)) == s // 16 and finite_upto(s) and not finite_upto(e)


@pytest.mark.parametrize("where", ["k", "gate", "param"])
def test_check_finite_names_a_bad_input(where):
    rule = memdsl.compile("rules/titans.mem")
    tok, gates, params = make_inputs(rule, B=2, T=20, H=2, D=3)
    target = {"k": tok["k"], "gate": gates["eta"], "param": params["W1"]}[where]
    target.view(-1)[target.numel() // 2] = float("inf")
    with pytest.raises(FloatingPointError, match={"k": r"input k is not finite: 0 NaN and 1 Inf",
                                                  "gate": r"input gate eta is not finite",
                                                  "param": r"input params\['W1'\] is not finite"}[where]):
        rule(tok["q"], tok["k"], tok["v"], gates, params, check_finite=True)


def _saturated(gates, mode, seed=1):
    """Gates at exactly 0 and 1: what float32 sigmoids give past |x| ≈ 17 (keeps of 0, decays of 1)."""
    gen = torch.Generator().manual_seed(seed)
    return {n: {"zeros": torch.zeros_like(g), "ones": torch.ones_like(g),
                "mixed": (torch.rand(g.shape, generator=gen) > 0.5).to(g.dtype)}[mode] for n, g in gates.items()}


def _assert_runs_close(got, ref, what):
    for name, (a, b) in {"y": (got[0], ref[0]), **{f"state.{k}": (got[1][k], ref[1][k]) for k in ref[1]},
                         **{f"grad.{k}": (got[2][k], ref[2][k]) for k in ref[2]}}.items():
        assert torch.isfinite(b).all() and torch.isfinite(a).all(), f"{what}: {name} is not finite"
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9 * max(b.abs().max().item(), 1.0),
                                   msg=lambda m, name=name: f"{what}: {name}: {m}")


@pytest.mark.parametrize("path, mode", [(p, "mixed") for p in RULES] + [(ROOT / "rules" / "moneta.mem", "zeros")],
                         ids=[f"{i}-mixed" for i in RULE_IDS] + ["moneta-zeros"])
def test_saturated_gates_keep_every_gradient(path, mode):
    # Regression: chunk products were exp(cumsum(log(clamp(keep, 1e-30)))), so a keep of exactly 0 lost its
    # gradient (d alpha was 0 instead of -A); and the lq projection of a zero state had NaN gradients.
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, B=1, T=12, H=1, D=3)
    gates = _saturated(gates, mode)
    ref = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=4)
    _assert_runs_close(run_with_grads(rule, tok, gates, params, backend="chunk", chunk=4), ref, "chunk")
    if rule.spec["dual"]:
        _assert_runs_close(run_with_grads(rule, tok, gates, params, backend="dual", chunk=4), ref, "dual")
    if rule.algorithm == "wy":
        _assert_runs_close(run_with_grads(rule, tok, gates, params, backend="wy", chunk=4),
                           run_with_grads(rule, tok, gates, params, backend="loop"), "wy")


@pytest.mark.parametrize("name, retain", [("titans_linear", "retain decay(alpha - 0.5)"),
                                          ("gated_deltanet", "retain decay(alpha - 0.5, grad_at = decayed)")])
def test_negative_keeps_are_multiplied_not_clamped(name, retain):
    # Regression: a keep <= 0 was clamped to 1e-30 inside the chunk products; the loop multiplies by it
    src = re.sub(r"retain .*", retain, open(f"rules/{name}.mem").read())
    rule = in_memory(src)
    tok, gates, params = make_inputs(rule, B=1, T=12, H=1, D=3)
    ref = run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=4)
    _assert_runs_close(run_with_grads(rule, tok, gates, params, backend="chunk", chunk=4), ref, "chunk")
    if rule.algorithm == "wy":
        _assert_runs_close(run_with_grads(rule, tok, gates, params, backend="wy", chunk=4),
                           run_with_grads(rule, tok, gates, params, backend="loop"), "wy")
