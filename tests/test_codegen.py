"""Code printers and emitters cover every op: no rule can reach an op a backend cannot spell."""

from __future__ import annotations

import pytest
import sympy as sp

import memdsl
from codegen.sympy_print import torch_code, torch_lambda, triton_code
from codegen.torch_emit import emit_function
from memdsl.ops import ELEMENTWISE, OPS, sympy_form
from tests.conftest import RULE_IDS, RULES


@pytest.mark.parametrize("op", sorted(ELEMENTWISE - {"ewise"}))
def test_every_elementwise_op_and_its_derivatives_print_for_torch_and_triton(op):
    n = OPS[op].arity
    syms = [sp.Symbol(f"x{i}", real=True) for i in range(n)]
    attrs = {"cmp": "le"} if op == "select" else {}
    form = sympy_form(op, syms, attrs)
    for expr in [form, *(sp.diff(form, s).replace(sp.DiracDelta, lambda *a: 0) for s in syms)]:
        assert torch_code(expr) and triton_code(expr)
        torch_lambda(expr, n)  # compiles


def test_printers_reject_foreign_symbols():
    with pytest.raises(ValueError, match="unexpected symbol"):
        torch_code(sp.Symbol("__import__"))


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_every_graph_output_of_every_rule_emits(path):
    program = memdsl.load(str(path))
    outputs = list(program.graph.outputs)
    source = emit_function(program.graph, "f", outputs)
    compile(source, "<emitted>", "exec")
