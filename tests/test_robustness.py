"""Inputs that once crashed or hung the compiler: each now compiles or gets a positioned MemDSLError."""

from __future__ import annotations

import pytest

import memdsl
from memdsl.errors import DependencyError, MemDSLError, MemSyntaxError, ValueRangeError

BASE = "memory m {{\n  param W : [d, d]\n  model M(x) = W @ x\n  loss {loss}\n  optim gd(lr = 1)\n  read M(q)\n}}\n"


def rule_with_loss(loss: str) -> str:
    return BASE.format(loss=loss)


@pytest.mark.parametrize("loss", ["sum((M(k) - v)^2) * 0", "sum((M(k) - v)^2) * (1 - 1)",
                                  "sum(abs(M(k) - v)) * 0"])
def test_identically_zero_gradient_is_a_dependency_error(loss):
    with pytest.raises(DependencyError) as err:
        memdsl.load(rule_with_loss(loss))
    assert "never be updated" in err.value.message


@pytest.mark.parametrize("loss", ["sum((M(k) - v)^2) * " + "1 ^ " * 300 + "1",
                                  "sum((M(k) - v)^2)" + " + 1" * 800])
def test_deep_expressions_are_errors_not_crashes(loss):
    try:
        memdsl.load(rule_with_loss(loss))
    except ValueRangeError as err:
        assert "nested too deeply" in err.message
    # compiling is fine too; what matters is that nothing else escapes


@pytest.mark.parametrize("loss, message", [("sum((M(k) - v)^2) * 2 ^ 1e30", "too large"),
                                           ("sum((M(k) - v)^2) / 0", "division by zero"),
                                           ("sum((M(k) - v)^2) * 0 ^ -1", "negative power")])
def test_bad_constants_are_caught_with_a_position(loss, message):
    with pytest.raises(ValueRangeError) as err:
        memdsl.load(rule_with_loss(loss))
    assert message in err.value.message and err.value.span is not None


def test_unclosed_brace_points_at_the_end_of_the_file():
    src = rule_with_loss("sum((M(k) - v)^2)").rstrip().rstrip("}") + "\n\n"
    with pytest.raises(MemSyntaxError) as err:
        memdsl.load(src)
    assert err.value.span is not None and err.value.span.line == 6


def test_empty_file_says_what_a_rule_file_is():
    with pytest.raises(MemSyntaxError, match="no `memory` block"):
        memdsl.load("# nothing here\n\n")


def test_unknown_keyword_points_at_the_keyword():
    src = rule_with_loss("sum((M(k) - v)^2)").replace("gd(lr = 1)", "gd(lr = 1, decay = 0.9)")
    with pytest.raises(MemDSLError) as err:
        memdsl.load(src)
    assert err.value.span.col == src.splitlines()[4].index("decay") + 1


def test_undeclared_gate_suggests_declaring_it():
    src = rule_with_loss("sum((M(k) - v)^2)").replace("gd(lr = 1)", "gd(lr = beta)")
    with pytest.raises(MemDSLError) as err:
        memdsl.load(src)
    assert "gate beta : scalar sigmoid" in err.value.hint
