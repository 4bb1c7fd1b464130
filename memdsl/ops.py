"""The op table: every IR primitive in one stanza.

Each op declares its arity, kind, shape rule, sympy form (elementwise ops: the derivative comes
from sympy), torch spelling and Triton spelling. Ops sympy cannot differentiate the way we want
(matrix ops, reductions, structure) carry an explicit `vjp` rule written in terms of other ops.

Shapes are per token and per head: `()` is a scalar, `(d,)` a vector, `(m, n)` a matrix whose
entries are sympy expressions in the rule's symbolic sizes. Backends add the batch, head and time
axes in front.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import sympy as sp

Shape = tuple[sp.Expr, ...]


class Kind(Enum):
    SOURCE = "source"          # inputs and constants
    ELEMENTWISE = "elementwise"  # broadcasts scalars against one tensor shape
    REDUCE = "reduce"          # tensor -> scalar
    LINALG = "linalg"          # matrix-vector products and outer products
    STRUCT = "struct"          # concat, slice, kron, reshape, broadcast


class OpShapeError(Exception):
    """Raised by a shape rule; the IR builder turns it into a positioned `ShapeError`."""


def same(a: sp.Expr, b: sp.Expr) -> bool:
    return sp.expand(a - b) == 0


def fmt_shape(shape: Shape) -> str:
    return "[" + ",".join(str(s).replace(" ", "") for s in shape) + "]"


# ---- shape rules -------------------------------------------------------------------------------

def _broadcast(shapes: tuple[Shape, ...], attrs: dict) -> Shape:
    tensor_shapes = [s for s in shapes if s != ()]
    if not tensor_shapes:
        return ()
    out = tensor_shapes[0]
    for s in tensor_shapes[1:]:
        if len(s) != len(out) or not all(same(a, b) for a, b in zip(s, out, strict=True)):
            raise OpShapeError(f"{fmt_shape(out)} and {fmt_shape(s)} do not match")
    return out


def _reduce(shapes, attrs) -> Shape:
    return ()


def _matvec(shapes, attrs) -> Shape:
    w, x = shapes
    if len(w) != 2 or len(x) != 1:
        raise OpShapeError(f"`@` needs a matrix and a vector, got {fmt_shape(w)} and {fmt_shape(x)}")
    if not same(w[1], x[0]):
        raise OpShapeError(f"the matrix is {fmt_shape(w)} but the vector is {fmt_shape(x)}")
    return (w[0],)


def _matvec_t(shapes, attrs) -> Shape:
    w, g = shapes
    if len(w) != 2 or len(g) != 1 or not same(w[0], g[0]):
        raise OpShapeError(f"transposed product of {fmt_shape(w)} and {fmt_shape(g)}")
    return (w[1],)


def _outer(shapes, attrs) -> Shape:
    a, b = shapes
    if len(a) != 1 or len(b) != 1:
        raise OpShapeError(f"outer product of {fmt_shape(a)} and {fmt_shape(b)}")
    return (a[0], b[0])


def _concat(shapes, attrs) -> Shape:
    if any(len(s) != 1 for s in shapes):
        raise OpShapeError("concat joins vectors: " + ", ".join(fmt_shape(s) for s in shapes))
    return (sp.expand(sum(s[0] for s in shapes)),)


def _slice(shapes, attrs) -> Shape:
    (x,) = shapes
    return (sp.expand(attrs["stop"] - attrs["start"]),)


def _kron(shapes, attrs) -> Shape:
    a, b = shapes
    if len(a) != 1 or len(b) != 1:
        raise OpShapeError(f"kron joins vectors, got {fmt_shape(a)} and {fmt_shape(b)}")
    return (sp.expand(a[0] * b[0]),)


def _unflatten(shapes, attrs) -> Shape:
    (x,) = shapes
    return (attrs["rows"], attrs["cols"])


def _flatten(shapes, attrs) -> Shape:
    (x,) = shapes
    return (sp.expand(x[0] * x[1]),)


def _given(shapes, attrs) -> Shape:
    return tuple(attrs["shape"])


# ---- sympy forms of elementwise ops --------------------------------------------------------------

def _sigmoid(a):
    return 1 / (1 + sp.exp(-a))


def _gelu(a):
    return a * (1 + sp.erf(a / sp.sqrt(2))) / 2


def _huber(a, delta):
    return sp.Piecewise((a**2 / 2, sp.Abs(a) <= delta), (delta * (sp.Abs(a) - delta / 2), True))


_CMP = {"le": sp.Le, "lt": sp.Lt, "ge": sp.Ge, "gt": sp.Gt, "eq": sp.Eq, "ne": sp.Ne}


def _select(a, b, x, y, cmp):
    return sp.Piecewise((x, _CMP[cmp](a, b)), (y, True))


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None  # None: variadic
    kind: Kind
    shape: Callable[[tuple[Shape, ...], dict], Shape]
    torch: str         # format string over operands {0}, {1}, ... and attributes {attr}
    triton: str | None  # None: no direct Triton spelling (lowered through sympy or a template)
    sympy: Callable[..., sp.Expr] | None = None
    vjp: Callable[..., tuple[Any, ...]] | None = None  # (builder, node_id, cotangent) -> per-operand
    doc: str = ""


OPS: dict[str, OpDef] = {}


def op(name, arity, kind, shape, torch, triton, sympy=None, doc=""):
    OPS[name] = OpDef(name, arity, kind, shape, torch, triton, sympy, None, doc)


def vjp_rule(name: str):
    """Attach an explicit reverse-mode rule to a non-elementwise op (see autodiff.py)."""
    def register(fn):
        OPS[name] = OPS[name].__class__(**{**OPS[name].__dict__, "vjp": fn})
        return fn
    return register


# sources
op("input", 0, Kind.SOURCE, _given, "{name}", "{name}", doc="a named input: param, outer, token, gate")
op("const", 0, Kind.SOURCE, _given, "{value}", "{value}", doc="a number or a symbolic size, broadcast")

# elementwise, unary
E = Kind.ELEMENTWISE
op("neg", 1, E, _broadcast, "(-{0})", "(-{0})", lambda a: -a)
op("exp", 1, E, _broadcast, "torch.exp({0})", "tl.exp({0})", sp.exp)
op("log", 1, E, _broadcast, "torch.log({0})", "tl.log({0})", sp.log)
op("sqrt", 1, E, _broadcast, "torch.sqrt({0})", "tl.sqrt({0})", sp.sqrt)
op("abs", 1, E, _broadcast, "torch.abs({0})", "tl.abs({0})", sp.Abs)
op("sign", 1, E, _broadcast, "torch.sign({0})", None, sp.sign)
op("tanh", 1, E, _broadcast, "torch.tanh({0})", None, sp.tanh)
op("sigmoid", 1, E, _broadcast, "torch.sigmoid({0})", "tl.sigmoid({0})", _sigmoid)
op("silu", 1, E, _broadcast, "torch.nn.functional.silu({0})", None, lambda a: a * _sigmoid(a))
op("gelu", 1, E, _broadcast, "torch.nn.functional.gelu({0})", None, _gelu)
op("relu", 1, E, _broadcast, "torch.relu({0})", None, lambda a: sp.Piecewise((a, a > 0), (0, True)))
op("elu", 1, E, _broadcast, "torch.nn.functional.elu({0})", None,
   lambda a: sp.Piecewise((a, a > 0), (sp.exp(a) - 1, True)))
op("softplus", 1, E, _broadcast, "torch.nn.functional.softplus({0})", None, lambda a: sp.log(1 + sp.exp(a)))
# elementwise, binary and ternary
op("add", 2, E, _broadcast, "({0} + {1})", "({0} + {1})", lambda a, b: a + b)
op("sub", 2, E, _broadcast, "({0} - {1})", "({0} - {1})", lambda a, b: a - b)
op("mul", 2, E, _broadcast, "({0} * {1})", "({0} * {1})", lambda a, b: a * b)
op("div", 2, E, _broadcast, "({0} / {1})", "({0} / {1})", lambda a, b: a / b)
op("pow", 2, E, _broadcast, "torch.pow({0}, {1})", None, lambda a, b: a**b)
op("maximum", 2, E, _broadcast, "torch.maximum({0}, {1})", "tl.maximum({0}, {1})",
   lambda a, b: sp.Piecewise((a, a >= b), (b, True)))
op("minimum", 2, E, _broadcast, "torch.minimum({0}, {1})", "tl.minimum({0}, {1})",
   lambda a, b: sp.Piecewise((a, a <= b), (b, True)))
op("huber", 2, E, _broadcast, "_huber({0}, {1})", None, _huber,
   doc="½a² where |a| ≤ δ, else δ(|a| − δ/2)")
op("select", 4, E, _broadcast, "torch.where({0} {cmp_py} {1}, {2}, {3})", "tl.where({0} {cmp_py} {1}, {2}, {3})",
   _select, doc="x if (a cmp b) else y")
op("ewise", None, E, _broadcast, "{expr}", "{expr}", doc="a fused elementwise sympy expression over x0, x1, ...")

# reductions
op("sum", 1, Kind.REDUCE, _reduce, "{0}.sum(-1)", "tl.sum({0}, axis=0)")
op("norm", 1, Kind.REDUCE, _reduce, "torch.linalg.vector_norm({0}, dim=-1)", "tl.sqrt(tl.sum({0} * {0}, axis=0))")

# linear algebra
L = Kind.LINALG
op("matvec", 2, L, _matvec, "torch.einsum('...mn,...n->...m', {0}, {1})", "tl.sum({0} * {1}[None, :], axis=1)")
op("matvec_t", 2, L, _matvec_t, "torch.einsum('...mn,...m->...n', {0}, {1})", "tl.sum({0} * {1}[:, None], axis=0)")
op("outer", 2, Kind.LINALG, _outer, "({0}.unsqueeze(-1) * {1}.unsqueeze(-2))", "({0}[:, None] * {1}[None, :])")

# structure
S = Kind.STRUCT
op("broadcast", 1, S, _given, "{0}.expand({shape})", "tl.broadcast_to({0}, {shape})")
op("concat", None, S, _concat, "torch.cat([{args}], dim=-1)", None)
op("slice", 1, S, _slice, "{0}[..., {start}:{stop}]", None)
op("kron", 2, S, _kron, "({0}.unsqueeze(-1) * {1}.unsqueeze(-2)).flatten(-2)", None)
op("unflatten", 1, S, _unflatten, "{0}.unflatten(-1, ({rows}, {cols}))", None)
op("flatten", 1, S, _flatten, "{0}.flatten(-2)", None)

ELEMENTWISE = frozenset(n for n, d in OPS.items() if d.kind is Kind.ELEMENTWISE)
LINEAR_IN_FIRST = frozenset({"matvec", "matvec_t", "outer"})


def sympy_form(name: str, operands: list[sp.Expr], attrs: dict) -> sp.Expr:
    """The sympy expression of an elementwise op applied to sympy operands."""
    d = OPS[name]
    if name == "ewise":
        expr = attrs["expr"]
        return expr.subs({sp.Symbol(f"x{i}", real=True): o for i, o in enumerate(operands)}, simultaneous=True)
    if name == "select":
        return _select(*operands, cmp=attrs["cmp"])
    assert d.sympy is not None, name
    return d.sympy(*operands)


# ---- explicit reverse-mode rules (elementwise ops get theirs from sympy) ------------------------
# Each takes (graph, node id, cotangent id) and returns one cotangent id (or None) per operand.

def _ops_of(g, nid):
    return g.operands(nid), g.node(nid)


@vjp_rule("sum")
def _vjp_sum(g, nid, ct):
    (x,), _ = _ops_of(g, nid)
    return (g.add("broadcast", [ct], shape=g.node(x).shape),)


@vjp_rule("norm")
def _vjp_norm(g, nid, ct):
    (x,), _ = _ops_of(g, nid)
    x0, x1, x2 = sp.symbols("x0 x1 x2", real=True)
    return (g.add("ewise", [x, nid, ct], expr=x2 * x0 / x1),)


@vjp_rule("matvec")
def _vjp_matvec(g, nid, ct):
    (w, x), _ = _ops_of(g, nid)
    return g.add("outer", [ct, x]), g.add("matvec_t", [w, ct])


@vjp_rule("matvec_t")
def _vjp_matvec_t(g, nid, ct):
    (w, v), _ = _ops_of(g, nid)
    return g.add("outer", [v, ct]), g.add("matvec", [w, ct])


@vjp_rule("outer")
def _vjp_outer(g, nid, ct):
    (a, b), _ = _ops_of(g, nid)
    return g.add("matvec", [ct, b]), g.add("matvec_t", [ct, a])


@vjp_rule("broadcast")
def _vjp_broadcast(g, nid, ct):
    (x,), _ = _ops_of(g, nid)
    return (g.add("sum", [ct]) if g.node(x).shape == () else ct,)


@vjp_rule("concat")
def _vjp_concat(g, nid, ct):
    parts, _ = _ops_of(g, nid)
    out, start = [], sp.Integer(0)
    for p in parts:
        stop = sp.expand(start + g.node(p).shape[0])
        out.append(g.add("slice", [ct], start=start, stop=stop))
        start = stop
    return tuple(out)


@vjp_rule("slice")
def _vjp_slice(g, nid, ct):
    (x,), node = _ops_of(g, nid)
    n, start, stop = g.node(x).shape[0], node.attr("start"), node.attr("stop")
    pieces = [g.add("broadcast", [g.const(0)], shape=(sp.expand(start),))] if start != 0 else []
    pieces.append(ct)
    if sp.expand(n - stop) != 0:
        pieces.append(g.add("broadcast", [g.const(0)], shape=(sp.expand(n - stop),)))
    return (g.add("concat", pieces) if len(pieces) > 1 else ct,)


@vjp_rule("kron")
def _vjp_kron(g, nid, ct):
    (a, b), _ = _ops_of(g, nid)
    grid = g.add("unflatten", [ct], rows=g.node(a).shape[0], cols=g.node(b).shape[0])
    return g.add("matvec", [grid, b]), g.add("matvec_t", [grid, a])


@vjp_rule("unflatten")
def _vjp_unflatten(g, nid, ct):
    return (g.add("flatten", [ct]),)


@vjp_rule("flatten")
def _vjp_flatten(g, nid, ct):
    (x,), _ = _ops_of(g, nid)
    rows, cols = g.node(x).shape
    return (g.add("unflatten", [ct], rows=rows, cols=cols),)
