"""Which chunk algorithm a rule gets, and why (MATH.md §1.3, §9.3).

* `linear`   — no gradient reads the memory (dot-product / Hebbian losses) and every state update
               is linear: the anchored chunk form is exact for any chunk size.
* `wy`       — one matrix memory read as `W @ x`, a loss whose output gradient is `c·(W x − u)`, plain
               GD and at most a keep factor applied before the gradient: the delta-rule family, whose
               exact chunk form is the WY/UT triangular solve.
* `anchored` — everything else: gradients at the chunk-start state (mini-batch GD). The chunk size
               is part of the model.
* `loop`     — the token-by-token recurrence, when a schedule asks for exact semantics of a rule
               that has no exact chunk form.
"""

from __future__ import annotations

import math

import sympy as sp

from .autodiff import ewise
from .ir import Graph
from .program import Program


def _nonlinear_parts(p: Program) -> list[str]:
    found = []
    if p.optim.kind == "muon":
        found.append("Newton–Schulz (muon) is nonlinear in the momentum")
    found += [f"`{r.kind}` retention is nonlinear in the state" for r in p.retain
              if r.kind in ("lq", "softmax", "elastic")]
    return found


def _grads_read_state(p: Program) -> bool:
    g, params = p.graph, [t.name for t in p.params]
    return any(g.depends_on(g.outputs[f"grad.{w}"], params) for w in params if f"grad.{w}" in g.outputs)


def _is_matvec_of(g: Graph, nid: int, w: str, x_role: tuple[str, ...]) -> int | None:
    """If `nid` is `W @ x` for param `w` with x not reading the memory, return x's node id."""
    n = g.node(nid)
    if n.op != "matvec":
        return None
    wid, xid = g.operands(nid)
    if g.input_name(wid) != w:
        return None
    params = [name for name, i in g.inputs.items() if g.node(i).attr("role") == "param"]
    return None if g.depends_on(xid, params) else xid


def _leaves(g: Graph, nid: int) -> list[int]:
    """The non-`ewise` nodes under the `ewise` node `nid`, in first-visit order (leaf i is symbol L{i})."""
    leaves: list[int] = []
    seen: set[int] = set()

    def go(n: int) -> None:
        if n in seen:
            return
        seen.add(n)
        if g.node(n).op != "ewise":
            leaves.append(n)
        for o in g.operands(n) if g.node(n).op == "ewise" else ():
            go(o)

    go(nid)
    return leaves


def _expanded(g: Graph, nid: int) -> tuple[sp.Expr, list[int]]:
    """The sympy expression of an `ewise` node with its `ewise` operands inlined, over non-ewise leaves.

    Each node is expanded once (a shared operand is one shared sympy subtree): substituting per use was
    quadratic in the nesting depth."""
    leaves = _leaves(g, nid)
    done: dict[int, sp.Expr] = {n: sp.Symbol(f"L{i}", real=True) for i, n in enumerate(leaves)}

    def go(n: int) -> sp.Expr:
        if n not in done:
            args = {sp.Symbol(f"x{i}", real=True): go(o) for i, o in enumerate(g.operands(n))}
            done[n] = g.node(n).attr("expr").xreplace(args)
        return done[n]

    return go(nid), leaves


def _surely_not_affine(g: Graph, nid: int, leaves: list[int], y_leaf: int) -> bool:
    """A numeric witness that the `ewise` node `nid` is not affine in its leaf `y_leaf`: f(0) + f(1) !=
    2 f(1/2) at one point of the other leaves (and sizes), at 30 digits, node by node. It only stops early;
    what it cannot judge goes to the symbolic test, which costs seconds on a deeply nested loss (sympy
    differentiates the whole expanded tree)."""
    def value_at(t: str) -> complex:
        done: dict[int, sp.Expr] = {}

        def go(n: int) -> sp.Expr:
            if n not in done:
                node = g.node(n)
                if node.op != "ewise":
                    done[n] = sp.Float(t if n == y_leaf else 0.3 + (0.37 * leaves.index(n)) % 0.6, 30)
                else:
                    e = node.attr("expr").xreplace({sp.Symbol(f"x{i}", real=True): go(o)
                                                    for i, o in enumerate(g.operands(n))})
                    done[n] = sp.N(e.xreplace({s: sp.Integer(3) for s in e.free_symbols}), 30)
            return done[n]

        return complex(go(nid))

    try:
        f = [value_at(t) for t in ("0", "0.5", "1")]
    except Exception:  # anything sympy or mpmath cannot evaluate here: the symbolic test decides
        return False
    if not all(math.isfinite(abs(v)) for v in f):
        return False
    return abs(f[0] + f[2] - 2 * f[1]) > 1e-15 * sum(abs(v) for v in f)  # roundoff at 30 digits: ~1e-28


def _delta_form(p: Program) -> str | None:
    """None if the rule is a (gated) delta rule; otherwise the reason it is not."""
    if p.optim.kind != "gd":
        return f"the optimizer is `{p.optim.kind}`"
    if p.optim.scale is not None:
        return "the step has a position scale"
    if p.optim.clip is not None:
        return "the gradient is clipped (nonlinear in the state)"
    if any(r.kind != "decay" for r in p.retain):
        return "a retention other than `decay`"
    if any(r.grad_at != "decayed" for r in p.retain):
        return "the gradient is taken before the decay (grad_at = anchor)"
    if p.window != 1:
        return "an Omega window"
    if p.read_order != "after":
        return "the read comes before the write"
    g = p.graph
    if any(len(g.node(g.outputs[r.value("keep")]).shape) for r in p.retain):
        return "a per-channel keep factor"
    params = p.params
    if len(params) != 1 or len(params[0].shape) != 2:
        return "the memory is not a single matrix"
    w = params[0].name
    if _is_matvec_of(g, g.outputs["model"], w, ()) is None:
        return f"the model is not linear in {w} (`{w} @ x`)"
    if _is_matvec_of(g, g.outputs["read"], w, ()) is None:
        return "the read is not `W @ x`"
    grad = g.outputs[f"grad.{w}"]
    if g.node(grad).op != "outer":
        return "the loss gradient is not an outer product"
    gy, _ = g.operands(grad)
    if g.node(gy).op != "ewise":
        return "the loss gradient's output factor is not elementwise"
    leaves = _leaves(g, gy)
    ys = [i for i, o in enumerate(leaves) if g.node(o).op == "matvec" and g.input_name(g.operands(o)[0]) == w]
    if len(ys) != 1:
        return "the loss does not read the memory exactly once"
    if any(g.depends_on(o, [w]) for i, o in enumerate(leaves) if i != ys[0]):
        return "the loss reads the memory's output through a reduction (a norm or a sum)"
    if _surely_not_affine(g, gy, leaves, leaves[ys[0]]):
        return "the loss is not quadratic in the memory's output"
    expr, leaves = _expanded(g, gy)
    y = sp.Symbol(f"L{ys[0]}", real=True)
    slope = sp.diff(expr, y)
    if y in slope.free_symbols:
        return "the loss is not quadratic in the memory's output"
    vector_leaves = {sp.Symbol(f"L{i}", real=True) for i, o in enumerate(leaves) if g.node(o).shape != ()}
    if slope.free_symbols & vector_leaves:
        return "the loss curvature is not a per-token scalar"
    if len(g.node(g.outputs[p.optim.lr]).shape):
        return "a per-channel learning rate"
    if p.window_weight is not None:
        return "a window weight"
    _add_delta_outputs(p, expr, leaves, y, slope)
    return None


def _add_delta_outputs(p: Program, expr: sp.Expr, leaves: list[int], y: sp.Symbol, slope: sp.Expr) -> None:
    """Outputs the WY backend reads: with e = dloss/dy = slope*y + offset, the rule is
    W_t = a W_{t-1} - lr (slope (a W_{t-1} key) + offset) key^T, read W @ query."""
    g = p.graph
    w = p.params[0].name
    to_x = {sp.Symbol(f"L{i}", real=True): sp.Symbol(f"x{i}", real=True) for i in range(len(leaves))}
    g.outputs["wy.slope"] = ewise(g, slope.subs(to_x, simultaneous=True), leaves, ())
    g.outputs["wy.offset"] = ewise(g, expr.subs(y, 0).subs(to_x, simultaneous=True), leaves,
                                   g.node(g.outputs["read"]).shape)
    g.outputs["wy.key"] = g.operands(g.outputs[f"grad.{w}"])[1]
    g.outputs["wy.query"] = g.operands(g.outputs["read"])[1]


def classify(p: Program) -> tuple[str, str]:
    if p.axes is not None:  # a 2-D rule: scan2d / anchored2d / wavefront (memdsl/twod.py)
        from .twod import classify_2d
        return classify_2d(p)
    nonlinear = _nonlinear_parts(p)
    wanted = p.schedule.semantics
    if p.optim.scale is not None:
        nonlinear.append("the step has a position scale (it depends on the place in the chunk)")
    if not nonlinear and not _grads_read_state(p):
        if wanted == "anchored":
            return "anchored", "asked for by the schedule (it equals the exact rule here)"
        return "linear", ("no gradient reads the memory and every update is linear, "
                          "so the chunk form is exact for any chunk size")
    reason = nonlinear[0] if nonlinear else _delta_form(p)
    if reason is None:
        if wanted == "anchored":
            return "anchored", "asked for by the schedule: mini-batch GD instead of the exact delta rule"
        return "wy", "a (gated) delta rule: linear in its state, exact chunks by the WY/UT transform"
    if wanted == "exact":
        return "loop", f"exact semantics were asked for and {reason}: token-by-token recurrence"
    return "anchored", f"{reason}: gradients at the chunk-start state (mini-batch GD, chunk is semantic)"
