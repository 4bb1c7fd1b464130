"""The pipeline: one straight list of named passes from text to a classified Program.

`memdsl passes` lists them; `memdsl ir FILE --after NAME` prints the IR after any of them; tests
run `verify` after every pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp

from .autodiff import differentiate, ewise
from .errors import DependencyError
from .ir import Graph, verify
from .ops import ELEMENTWISE, sympy_form
from .program import Program


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Program], Program]
    doc: str


# ---- graph rewriting helpers -------------------------------------------------------------------

def _copy_inputs(old: Graph, new: Graph) -> dict[int, int]:
    mapping = {}
    for name, nid in old.inputs.items():
        n = old.node(nid)
        mapping[nid] = new.add_input(name, n.shape, n.attr("role"), n.dtype)
    return mapping


def _rebuild(old: Graph, keep: Callable[[int], bool] | None = None) -> Graph:
    """Copy `old` node by node into a fresh graph (what is not reachable from outputs is dropped)."""
    new = Graph()
    mapping = _copy_inputs(old, new)
    for nid in old.topo(old.outputs.values()):
        if nid in mapping:
            continue
        n = old.node(nid)
        mapping[nid] = new.add(n.op, [mapping[o] for o in old.operands(nid)], n.dtype, **dict(n.attrs))
    new.outputs = {k: mapping[v] for k, v in old.outputs.items()}
    return new


# ---- passes ------------------------------------------------------------------------------------

def verify_pass(p: Program) -> Program:
    verify(p.graph)
    return p


def autodiff_pass(p: Program) -> Program:
    differentiate(p.graph, {n: t.role for n, t in p.tensors.items()})
    return p


def check_updates(p: Program) -> None:
    """Every param must get a gradient that is not identically zero, and the read must still use the
    memory (both checked once folded by fuse: `0 * M(q)` mentions the model but reads nothing)."""
    for t in p.params:
        grad = p.graph.outputs.get(f"grad.{t.name}")
        if grad is None or _is_zero(p.graph, grad):
            raise DependencyError(f"the loss gradient with respect to `{t.name}` is identically zero, so "
                                  f"{t.name} would never be updated", t.span,
                                  f"make the loss depend on {t.name} through the model")
    read = p.graph.outputs.get("read")
    if read is not None and not p.graph.depends_on(read, [t.name for t in p.params]):
        raise DependencyError("the read does not use the memory once simplified (it is a constant)", p.read_span,
                              "read through the model, e.g. `read M(q)`")


def _is_zero(g: Graph, nid: int, memo: dict[int, bool] | None = None) -> bool:
    """Whether a node is identically zero: a zero constant, a product or reshaping of a zero, or a fused
    expression that vanishes once its zero operands are set to 0 (`-x0` of a zero broadcast: a constant loss
    whose gradient did not fold to a constant)."""
    memo = {} if memo is None else memo
    if nid not in memo:
        n = g.node(nid)
        ops = g.operands(nid)
        if n.op == "const":
            memo[nid] = n.attr("value") == 0
        elif n.op in ("broadcast", "outer", "matvec", "matvec_t", "kron", "sum", "slice", "flatten", "unflatten"):
            memo[nid] = any(_is_zero(g, o, memo) for o in ops)
        elif n.op == "concat":
            memo[nid] = all(_is_zero(g, o, memo) for o in ops)
        elif n.op == "ewise":
            zeros = {sp.Symbol(f"x{i}", real=True): sp.Integer(0) for i, o in enumerate(ops) if _is_zero(g, o, memo)}
            memo[nid] = n.attr("expr").xreplace(zeros) == 0
        else:
            memo[nid] = False
    return memo[nid]


def dce_pass(p: Program) -> Program:
    p.graph = _rebuild(p.graph)
    return p


def _leaf_symbol(nid: int) -> sp.Symbol:
    return sp.Symbol(f"L{nid}", real=True)


def fuse_pass(p: Program) -> Program:
    """Fuse chains of elementwise ops into single `ewise` nodes carrying one sympy expression.

    An elementwise node is folded into its user when that user is elementwise and is its only
    user (so nothing is computed twice). What remains prints as one readable formula per fused
    region, and the code printers emit each region as one expression.
    """
    old = p.graph
    out_ids = set(old.outputs.values())
    order = old.topo(old.outputs.values())

    def inlinable(nid: int) -> bool:
        users = old.users(nid)
        return (old.node(nid).op in ELEMENTWISE and nid not in out_ids and len(users) == 1
                and old.node(users[0]).op in ELEMENTWISE
                and len(old.g.in_edges(nid)) > 0)

    new = Graph()
    mapping = _copy_inputs(old, new)
    # Each region leaf (an old node id) has one symbol for the whole pass, so an inlined expression is
    # reused as it is: renaming it per user would substitute into the whole nest once per level
    # (quadratic in the nesting depth; 30 s for a 50-deep `tanh(...)` read). Each emitted region is
    # renamed to x0..x{n-1} once, with xreplace (structural, no matching).
    exprs: dict[int, tuple[sp.Expr, list[int]]] = {}

    def leaf_expr(o: int, leaves: list[int]) -> sp.Expr:
        if o in exprs:
            e, sub_leaves = exprs[o]
            leaves.extend(leaf for leaf in sub_leaves if leaf not in leaves)
            return e
        if o not in leaves:
            leaves.append(o)
        return _leaf_symbol(o)

    for nid in order:
        if nid in mapping:
            continue
        n = old.node(nid)
        if n.op in ELEMENTWISE:
            leaves: list[int] = []
            args = [leaf_expr(o, leaves) for o in old.operands(nid)]
            expr = sympy_form(n.op, args, dict(n.attrs))
            if inlinable(nid):
                exprs[nid] = (expr, leaves)
                continue
            expr = expr.xreplace({_leaf_symbol(leaf): sp.Symbol(f"x{j}", real=True) for j, leaf in enumerate(leaves)})
            mapping[nid] = ewise(new, expr, [mapping[leaf] for leaf in leaves], n.shape)
        else:
            mapping[nid] = new.add(n.op, [mapping[o] for o in old.operands(nid)], n.dtype, **dict(n.attrs))
    new.outputs = {k: mapping[v] for k, v in old.outputs.items()}
    p.graph = new
    check_updates(p)
    return p


def classify_pass(p: Program) -> Program:
    from .classify import classify
    p.algorithm, p.algorithm_reason = classify(p)
    return p


PIPELINE: list[Pass] = [
    Pass("build", lambda p: p, "resolve names, check shapes, build the IR (loss, read, model, hyper-parameters)"),
    Pass("verify", verify_pass, "check graph invariants: acyclic, known ops, arities, shapes"),
    Pass("autodiff", autodiff_pass, "reverse mode: d loss / d (params, k, v, gates, outers); read VJP"),
    Pass("fuse", fuse_pass, "fuse elementwise chains into single sympy expressions"),
    Pass("dce", dce_pass, "drop nodes no output needs"),
    Pass("classify", classify_pass, "choose the chunk algorithm: linear, WY (exact) or anchored"),
]
PASS_NAMES = [p.name for p in PIPELINE]


def run_pipeline(p: Program, stop_after: str | None = None, check: bool = False) -> Program:
    for ps in PIPELINE:
        p = ps.run(p)
        p.passes_run.append(ps.name)
        if check:
            verify(p.graph)
        if ps.name == stop_after:
            break
    return p
