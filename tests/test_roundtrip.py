"""print → parse round trips: shipped rules, and random expressions from a Hypothesis strategy."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memdsl import ast as A
from memdsl.format import format_expr, format_rule
from memdsl.parse import parse
from tests.conftest import RULE_IDS, RULES


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_shipped_rules_round_trip(path):
    tree = parse(path.read_text(), str(path))
    text = format_rule(tree)
    assert parse(text) == tree
    assert format_rule(parse(text)) == text  # printing is a fixed point


names = st.sampled_from(["x", "k", "v", "W1", "alpha", "d", "gamma_2"]).map(A.Name)
# literals are decimals, so every parsed number is an integer over 2^a 5^b
numbers = st.one_of(st.integers(0, 10**6), st.builds(lambda n, k: Fraction(n, 10**k), st.integers(0, 10**6),
                                                     st.integers(0, 12)),
                    st.sampled_from([Fraction(1, 10**6), Fraction(3, 2), Fraction(1, 1024)]))
nums = numbers.map(lambda v: A.Num(Fraction(v), str(v)))


def _extend(children):
    binops = st.builds(A.BinOp, st.sampled_from(["+", "-", "*", "/", "@", "^"]), children, children)
    calls = st.builds(lambda f, args: A.Call(f, tuple(args)), st.sampled_from(["gelu", "sum", "huber", "f"]),
                      st.lists(children, min_size=1, max_size=3))
    return st.one_of(binops, calls, st.builds(A.Neg, children))


exprs = st.recursive(st.one_of(names, nums), _extend, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(exprs)
def test_expression_round_trip(e):
    src = f"memory m {{ loss {format_expr(e)} }}"
    tree = parse(src)
    assert tree.memory.stmts[0].expr == e


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(RULES), min_size=1, max_size=1), st.integers(0, 3))
def test_comments_and_whitespace_do_not_matter(paths, pad):
    text = paths[0].read_text()
    noisy = "\n".join(line + " " * pad + "   # note" for line in text.splitlines())
    assert parse(noisy) == parse(text)
