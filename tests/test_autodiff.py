"""Symbolic gradients checked three ways: sympy at points == torch.autograd == finite differences."""

from __future__ import annotations

import math

import pytest
import sympy as sp
import torch

import memdsl
from codegen.torch_ir import evaluate
from memdsl.autodiff import vjp
from memdsl.ir import Graph
from memdsl.ops import ELEMENTWISE, OPS, sympy_form
from tests.conftest import RULE_IDS, RULES
from tests.helpers import random_env, rel_rms, sizes_for

UNARY = sorted(n for n in ELEMENTWISE if OPS[n].arity == 1)
BINARY = sorted(n for n in ELEMENTWISE if OPS[n].arity == 2)
# points away from kinks (|x| = δ, x = 0) where one-sided derivatives differ
POINTS = [-1.7, -0.6, 0.45, 1.3, 2.2]


def _point_grad(op: str, args: list[float], attrs: dict) -> list[float]:
    """Derivatives three ways at one point; returns max abs disagreement over the arguments."""
    n = len(args)
    g = Graph()
    ins = [g.add_input(f"a{i}", (), "param") for i in range(n)]
    out = g.add(op, ins, **attrs)
    grads = vjp(g, out, g.const(1), ins)
    syms = [sp.Symbol(f"x{i}", real=True) for i in range(n)]
    form = sympy_form(op, syms, attrs)
    errs = []
    for i, a_in in enumerate(ins):
        # 1. sympy: the derivative rule itself, evaluated at the point
        point = dict(zip(syms, args, strict=True))
        sym_d = float(sp.diff(form, syms[i]).replace(sp.DiracDelta, lambda *a: 0).subs(point))
        # 2. the gradient IR, evaluated by the torch backend
        g.outputs = {"grad": grads[a_in]} if a_in in grads else {}
        ir_d = 0.0
        if g.outputs:
            env = {f"a{j}": torch.tensor(v, dtype=torch.float64) for j, v in enumerate(args)}
            ir_d = float(evaluate(g, ["grad"], env, {})["grad"])
        # 3. torch.autograd on the op's forward, and central differences
        g.outputs = {"y": out}
        xs = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in args]
        y = evaluate(g, ["y"], {f"a{j}": x for j, x in enumerate(xs)}, {})["y"]
        auto_d = float(torch.autograd.grad(y, xs[i], allow_unused=True)[0] or 0.0)
        h = 1e-6
        plus = [v + h * (j == i) for j, v in enumerate(args)]
        minus = [v - h * (j == i) for j, v in enumerate(args)]
        f = lambda vals: float(form.subs(dict(zip(syms, vals, strict=False))))  # noqa: E731
        fd = (f(plus) - f(minus)) / (2 * h)
        errs.append((sym_d, ir_d, auto_d, fd))
    return errs


@pytest.mark.parametrize("op", UNARY)
def test_unary_op_derivative_three_ways(op):
    for x in POINTS:
        if op == "log" or op == "sqrt":
            x = abs(x)
        for sym_d, ir_d, auto_d, fd in _point_grad(op, [x], {}):
            assert math.isclose(ir_d, sym_d, rel_tol=1e-12, abs_tol=1e-12), (op, x)
            assert math.isclose(auto_d, sym_d, rel_tol=1e-9, abs_tol=1e-9), (op, x, auto_d, sym_d)
            assert math.isclose(fd, sym_d, rel_tol=1e-6, abs_tol=1e-6), (op, x, fd, sym_d)


@pytest.mark.parametrize("op", BINARY)
def test_binary_op_derivative_three_ways(op):
    for a, b in [(0.7, 1.9), (-1.3, 0.4), (2.1, 0.8), (-0.35, -1.6)]:
        if op == "pow":
            a = abs(a)
        if op == "huber":
            b = abs(b)
        for sym_d, ir_d, auto_d, fd in _point_grad(op, [a, b], {}):
            assert math.isclose(ir_d, sym_d, rel_tol=1e-12, abs_tol=1e-12), (op, a, b)
            assert math.isclose(auto_d, sym_d, rel_tol=1e-9, abs_tol=1e-9), (op, a, b)
            assert math.isclose(fd, sym_d, rel_tol=1e-6, abs_tol=1e-6), (op, a, b)


@pytest.mark.parametrize("cmp", ["le", "lt", "ge", "gt"])
def test_select_derivative_three_ways(cmp):
    for args in ([0.3, 0.9, 1.7, -2.2], [1.4, 0.2, -0.6, 0.8]):
        for sym_d, ir_d, auto_d, fd in _point_grad("select", args, {"cmp": cmp}):
            assert math.isclose(ir_d, sym_d, abs_tol=1e-12)
            assert math.isclose(auto_d, sym_d, abs_tol=1e-9)
            assert math.isclose(fd, sym_d, abs_tol=1e-6)


def test_huber_gradient_is_piecewise():
    x0, x1 = sp.symbols("x0 x1", real=True)
    d = sp.diff(sympy_form("huber", [x0, x1], {}), x0)
    assert d.has(sp.Piecewise)
    assert float(d.subs({x0: 0.3, x1: 1.0})) == pytest.approx(0.3)
    assert float(d.subs({x0: -3.0, x1: 1.0})) == pytest.approx(-1.0)


def _loss_and_grads(program, sizes, env):
    names = [k for k in program.graph.outputs if k.startswith("grad.")]
    return evaluate(program.graph, ["loss", *names], env, sizes), names


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_rule_gradients_match_autograd_and_finite_differences(path):
    torch.manual_seed(0)
    program = memdsl.load(str(path), check=True)
    sizes = sizes_for(program)
    env = random_env(program, sizes)
    leaves = {k: v.clone().requires_grad_() for k, v in env.items()}
    out, names = _loss_and_grads(program, sizes, leaves)
    wrt = [n.split(".", 1)[1] for n in names]
    auto = torch.autograd.grad(out["loss"].sum(), [leaves[n] for n in wrt])
    for n, a in zip(names, auto, strict=True):
        assert rel_rms(out[n], a) < 1e-12, n
    # central differences along a random direction, in float64
    h = 1e-6
    direction = {n: torch.randn_like(env[n]) for n in wrt}
    plus = {**env, **{n: env[n] + h * direction[n] for n in wrt}}
    minus = {**env, **{n: env[n] - h * direction[n] for n in wrt}}
    fd = (evaluate(program.graph, ["loss"], plus, sizes)["loss"]
          - evaluate(program.graph, ["loss"], minus, sizes)["loss"]) / (2 * h)
    dot = sum((out[f"grad.{n}"] * direction[n]).reshape(2, -1).sum(1) for n in wrt)
    assert rel_rms(dot, fd) < 1e-6


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_read_vjp_matches_autograd(path):
    program = memdsl.load(str(path), check=True)
    sizes = sizes_for(program)
    env = random_env(program, sizes, seed=1)
    leaves = {k: v.clone().requires_grad_() for k, v in env.items()}
    names = [k for k in program.graph.outputs if k.startswith("vjp.read.")]
    out = evaluate(program.graph, ["read", *names], leaves, sizes)
    wrt = [n.split(".", 2)[2] for n in names]
    auto = torch.autograd.grad((out["read"] * env["ct_read"]).sum(), [leaves[n] for n in wrt])
    assert "vjp.read.q" in names
    for n, a in zip(names, auto, strict=True):
        assert rel_rms(out[n], a) < 1e-12, n
