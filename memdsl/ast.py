"""The abstract syntax of a `.mem` file: frozen dataclasses, spans excluded from equality.

Spans are kept out of `==` so that a printed-and-reparsed file compares equal to the original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from .errors import Span


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)


# ---- expressions -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Num:
    value: Fraction
    text: str = field(compare=False)  # the literal as written, for messages only; code uses `value`
    span: Span | None = _span()


@dataclass(frozen=True)
class Name:
    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[tuple[str, Expr], ...] = ()
    span: Span | None = _span()
    key_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)  # one per keyword

    def kwarg(self, key: str) -> Expr | None:
        return next((v for k, v in self.kwargs if k == key), None)

    def key_span(self, key: str) -> Span | None:
        keys = [k for k, _ in self.kwargs]
        return self.key_spans[keys.index(key)] if key in keys and len(self.key_spans) == len(keys) else None


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / @ ^ and the comparisons
    left: Expr
    right: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Neg:
    operand: Expr
    span: Span | None = _span()


Expr = Num | Name | Call | BinOp | Neg


# ---- memory statements -------------------------------------------------------------------------

@dataclass(frozen=True)
class Dim:
    name: str
    value: Expr | None = None  # a derived size such as `dim D = 1 + d + d^2`
    span: Span | None = _span()


@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple[Expr, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Param:
    """A fast weight: part of the memory state, updated by the inner optimizer."""

    name: str
    shape: tuple[Expr, ...]
    init: Expr | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Outer:
    """A constant of the inner loop, learned by the outer loop (LayerNorm weights, Taylor coefficients)."""

    name: str
    shape: tuple[Expr, ...]
    init: Expr | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Gate:
    """A per-token value the layer computes from its input; `shape` is () for a scalar gate."""

    name: str
    shape: tuple[Expr, ...]
    activation: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Fn:
    name: str
    params: tuple[str, ...]
    body: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Model:
    name: str
    arg: str
    body: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Loss:
    expr: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Window:
    size: Expr
    weight: str | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Optim:
    call: Call
    span: Span | None = _span()


@dataclass(frozen=True)
class Retain:
    calls: tuple[Call, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Read:
    expr: Expr
    order: str = "after"  # read after (default) or before the token's write
    span: Span | None = _span()


@dataclass(frozen=True)
class Axes:
    """`axes time, variate [bidirectional]`: a 2-D rule (memdsl/twod.py); names are checked there."""

    names: tuple[str, ...]
    bidirectional: bool = False
    span: Span | None = _span()


@dataclass(frozen=True)
class AxisRetain:
    """`retain time decay(...)`: the retention along one axis of a 2-D rule."""

    axis: str
    calls: tuple[Call, ...]
    span: Span | None = _span()


Stmt = Dim | Input | Param | Outer | Gate | Fn | Model | Loss | Window | Optim | Retain | Read | Axes | AxisRetain


@dataclass(frozen=True)
class Memory:
    name: str
    stmts: tuple[Stmt, ...]
    span: Span | None = _span()


# ---- schedule ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    size: int
    span: Span | None = _span()


@dataclass(frozen=True)
class GlobalMem:
    chunk: int
    span: Span | None = _span()


@dataclass(frozen=True)
class LocalMem:
    chunk: int
    reset: int
    span: Span | None = _span()


@dataclass(frozen=True)
class QKProjection:
    on: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class Tile:
    time: int
    variate: int
    span: Span | None = _span()


@dataclass(frozen=True)
class Semantics:
    mode: str
    span: Span | None = _span()


SchedStmt = Chunk | GlobalMem | LocalMem | QKProjection | Tile | Semantics


@dataclass(frozen=True)
class Schedule:
    stmts: tuple[SchedStmt, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class RuleFile:
    memory: Memory
    schedule: Schedule | None = None
