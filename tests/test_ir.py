"""IR invariants: verify after every pass, hash-consing, the printer, classification."""

from __future__ import annotations

import pytest
import sympy as sp

import memdsl
from memdsl.ir import Graph, VerifyError, print_function, verify
from memdsl.passes import PASS_NAMES
from tests.conftest import RULE_IDS, RULES

EXPECTED_ALGORITHM = {
    "deltanet": "wy", "gated_deltanet": "wy", "linear_attention": "linear",
    "titans": "anchored", "titans_linear": "anchored", "ttt_linear": "anchored", "ttt_mlp": "anchored",
    "atlas": "anchored", "omeganet": "anchored", "moneta": "anchored", "yaad": "anchored",
    "memora": "anchored", "deep_transformer": "anchored", "dot": "anchored",
}


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_verify_after_every_pass(path):
    program = memdsl.load(str(path), check=True)  # check=True runs verify() after each pass
    assert program.passes_run == PASS_NAMES


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_algorithm_choice(path):
    assert memdsl.load(str(path)).algorithm == EXPECTED_ALGORITHM[path.stem]


def test_every_shipped_rule_has_an_expected_algorithm():
    assert {p.stem for p in RULES} == set(EXPECTED_ALGORITHM)


def test_semantics_override():
    src = (RULES[0].parent / "deltanet.mem").read_text().replace("chunk 64", "chunk 64\n  semantics anchored")
    assert memdsl.load(src).algorithm == "anchored"
    src = (RULES[0].parent / "titans.mem").read_text().replace("chunk 16", "chunk 16\n  semantics exact")
    program = memdsl.load(src)
    assert program.algorithm == "loop" and "exact semantics" in program.algorithm_reason


def test_hash_consing_shares_identical_nodes():
    g = Graph()
    x = g.add_input("x", (sp.Symbol("d"),), "token")
    assert g.add("exp", [x]) == g.add("exp", [x])
    assert g.add("exp", [x]) != g.add("tanh", [x])


def test_verify_rejects_a_cycle_and_a_wrong_shape():
    g = Graph()
    d = sp.Symbol("d")
    x = g.add_input("x", (d,), "token")
    y = g.add("exp", [x])
    g.g.add_edge(y, x, key=0)
    with pytest.raises(VerifyError, match="cycle"):
        verify(g)
    g = Graph()
    x = g.add_input("x", (d,), "token")
    y = g.add("exp", [x])
    g.g.nodes[y]["node"] = g.node(y).__class__("exp", "f32", (d, d))
    with pytest.raises(VerifyError, match="shape"):
        verify(g)


def test_printer_reads_like_a_jaxpr():
    g = Graph()
    d = sp.Symbol("d")
    w = g.add_input("W", (d, d), "param")
    x = g.add_input("x", (d,), "token")
    y = g.add("matvec", [w, x])
    g.outputs["y"] = g.add("sum", [g.add("pow", [y, g.const(2)])])
    text = print_function(g, g.outputs, "f")
    assert text.splitlines()[0] == "f = { lambda W:f32[d,d] x:f32[d]. let"
    assert "a:f32[d] = matvec W x" in text
    assert "b:f32[d] = pow a 2" in text
    assert text.endswith("in (y=c) }")
