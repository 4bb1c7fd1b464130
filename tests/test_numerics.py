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
from tests.conftest import RULE_IDS, RULES

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
