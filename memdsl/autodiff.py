"""Reverse-mode differentiation over the IR.

Elementwise ops are differentiated by sympy from their declared forms (Piecewise included, so
Huber's gradient comes out as a Piecewise); everything else uses the op's explicit `vjp` rule.
The result is more IR in the same graph, so every later pass and backend treats gradients like
any other computation.
"""

from __future__ import annotations

from collections.abc import Iterable

import networkx as nx
import sympy as sp

from .ir import Graph
from .ops import OPS, Kind, sympy_form


def _symbols(n: int) -> list[sp.Symbol]:
    return [sp.Symbol(f"x{i}", real=True) for i in range(n)]


def _clean(expr: sp.Expr) -> sp.Expr:
    """Drop distributional terms (d sign/dx) and tidy up.

    Deliberately not `sympy.simplify`: it may rewrite into functions (cosh, erfc, ...) that the
    code printers have no spelling for; these rewrites only regroup what is already there.
    """
    expr = expr.replace(sp.DiracDelta, lambda *a: sp.Integer(0))
    return sp.factor_terms(sp.piecewise_fold(expr))


def ewise(g: Graph, expr: sp.Expr, operands: list[int], shape: tuple | None = None) -> int:
    """Add a fused elementwise node for `expr` over symbols x0..x{n-1} bound to `operands`.

    Unused operands are dropped and scalar constants are folded into the expression, so the
    printed node shows only what it reads.
    """
    full = shape if shape is not None else next((g.node(o).shape for o in operands if g.node(o).shape), ())
    operands = [_unbroadcast(g, o, operands) for o in operands]
    syms = _symbols(len(operands))
    subs = {}
    for s, o in zip(syms, operands, strict=True):
        n = g.node(o)
        if n.op == "const" and n.shape == ():
            subs[s] = n.attr("value")
    expr = expr.subs(subs, simultaneous=True)
    used = [i for i, s in enumerate(syms) if s in expr.free_symbols]
    new_syms = _symbols(len(used))
    expr = expr.subs({syms[i]: new_syms[j] for j, i in enumerate(used)}, simultaneous=True)
    ops = [operands[i] for i in used]
    if expr.is_Symbol and len(ops) == 1 and g.node(ops[0]).shape == full:
        return ops[0]
    out = g.add("ewise", ops, expr=expr) if ops else g.const(expr)
    if g.node(out).shape != full:  # everything vector-shaped folded away: keep the shape
        out = g.add("broadcast", [out], shape=full)
    return out


def _unbroadcast(g: Graph, o: int, operands: list[int]) -> int:
    """A broadcast scalar next to a vector of the same shape can stay a scalar inside `ewise`."""
    n = g.node(o)
    if n.op == "broadcast":
        (src,) = g.operands(o)
        if g.node(src).shape == () and any(g.node(x).shape == n.shape and x != o for x in operands):
            return src
    return o


def _elementwise_vjp(g: Graph, nid: int, ct: int, wanted: list[bool]) -> list[int | None]:
    node = g.node(nid)
    operands = list(g.operands(nid))
    syms = _symbols(len(operands) + 1)
    form = sympy_form(node.op, syms[:-1], dict(node.attrs))
    out: list[int | None] = []
    for i, o in enumerate(operands):
        if not wanted[i]:
            out.append(None)
            continue
        d = _clean(sp.diff(form, syms[i]))
        if d == 0:
            out.append(None)
            continue
        grad = ewise(g, syms[-1] * d, [*operands, ct], node.shape)
        if g.node(o).shape == () and node.shape != ():
            grad = g.add("sum", [grad])  # a scalar broadcast forward sums its cotangent back
        out.append(grad)
    return out


def vjp(g: Graph, root: int, ct: int, wrt: Iterable[int]) -> dict[int, int]:
    """Cotangents of the inputs `wrt` for output `root` with incoming cotangent `ct` (adds to `g`)."""
    wrt = set(wrt)
    live = set()
    for w in wrt:
        live |= nx.descendants(g.g, w) | {w}
    cts: dict[int, list[int]] = {root: [ct]}
    grads: dict[int, int] = {}
    for nid in reversed(g.topo([root])):
        if nid not in cts or nid not in live:
            continue
        total = cts.pop(nid)[0] if len(cts[nid]) == 1 else _sum(g, cts.pop(nid))
        node = g.node(nid)
        if node.op == "input":
            if nid in wrt:
                grads[nid] = total
            continue
        if node.kind is Kind.SOURCE:
            continue
        operands = g.operands(nid)
        wanted = [o in live for o in operands]
        if node.kind is Kind.ELEMENTWISE:
            parts = _elementwise_vjp(g, nid, total, wanted)
        else:
            rule = OPS[node.op].vjp
            assert rule is not None, f"op {node.op} has no vjp rule"
            parts = list(rule(g, nid, total))
        for o, p, w in zip(operands, parts, wanted, strict=True):
            if w and p is not None:
                cts.setdefault(o, []).append(p)
    return grads


def _sum(g: Graph, terms: list[int]) -> int:
    acc = terms[0]
    for t in terms[1:]:
        acc = g.add("add", [acc, t])
    return acc


GRAD_ROLES = ("param", "token", "gate", "outer")


def differentiate(g: Graph, roles: dict[str, str]) -> None:
    """Add the gradient outputs every backend needs:

    * `grad.<x>`: d loss / d x for every param, token input, gate and outer constant the loss reads;
    * `vjp.read.<x>`: the read's vector-Jacobian product with cotangent input `ct_read`.
    """
    wrt = [g.inputs[n] for n, r in roles.items() if r in GRAD_ROLES and n in g.inputs]
    names = {g.inputs[n]: n for n in roles if n in g.inputs}
    for nid, grad in sorted(vjp(g, g.outputs["loss"], g.const(1), wrt).items()):
        g.outputs[f"grad.{names[nid]}"] = grad
    read = g.outputs["read"]
    ct = g.add_input("ct_read", g.node(read).shape, "cotangent")
    for nid, grad in sorted(vjp(g, read, ct, wrt).items()):
        g.outputs[f"vjp.read.{names[nid]}"] = grad
