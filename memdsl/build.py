"""AST → Program: name resolution, shape checking and IR construction, with positioned errors.

Everything a rule file says is checked here before any code exists: names, shapes, arities,
what depends on what, and which combinations of optimizer and retention are supported.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import sympy as sp

from . import ast as A
from .errors import (
    ArityError,
    DependencyError,
    DuplicateNameError,
    MemDSLError,
    MissingClauseError,
    ScheduleError,
    ShapeError,
    Span,
    UnknownNameError,
    UnsupportedError,
    ValueRangeError,
)
from .ir import Graph
from .ops import OpShapeError, fmt_shape
from .program import Init, LocalSpec, OptimSpec, Program, RetainSpec, ScheduleSpec, TensorSpec

TOKEN_INPUTS = ("q", "k", "v")
ACTIVATIONS = ("sigmoid", "softplus", "exp", "identity", "tanh", "silu")
INITS = {"zeros": (), "ones": (), "eye": (), "normal": ("std",), "taylor": ("degree",)}
MAX_SIZE = 1 << 20
MAX_POLY_DEGREE = 4
MAX_WINDOW = 4096
MAX_CHUNK = 1 << 16
MAX_NS_STEPS = 20

UNARY = {"exp": "exp", "log": "log", "sqrt": "sqrt", "abs": "abs", "sign": "sign", "tanh": "tanh",
         "sigmoid": "sigmoid", "silu": "silu", "gelu": "gelu", "relu": "relu", "elu": "elu",
         "softplus": "softplus"}
BUILTINS = (*UNARY, "elu1", "max", "min", "huber", "where", "sum", "mean", "norm", "sqnorm", "dot",
            "layernorm", "rmsnorm", "l2norm", "concat", "kron", "poly")
_CMP_OPS = {"<=": "le", "<": "lt", ">=": "ge", ">": "gt", "==": "eq", "!=": "ne"}


def _suggest(name: str, candidates) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


@dataclass
class _Value:
    nid: int
    span: Span | None


class _Scope:
    """Names visible while building one expression: node ids, callable functions, sizes."""

    def __init__(self, values: dict[str, int], fns: dict[str, A.Fn | A.Model], dims: dict[str, sp.Expr],
                 where: str):
        self.values, self.fns, self.dims, self.where = values, fns, dims, where


class Builder:
    def __init__(self, rule: A.RuleFile, source: str, path: str):
        self.rule, self.source, self.path = rule, source, path
        self.mem = rule.memory
        self.g = Graph()
        self.dims: dict[str, sp.Expr] = {"d": sp.Symbol("d", positive=True, integer=True)}
        self.dim_decl: dict[str, sp.Expr | None] = {"d": None}
        self.tensors: dict[str, TensorSpec] = {}
        self.fns: dict[str, A.Fn | A.Model] = {}
        self.declared: dict[str, Span | None] = {n: None for n in ("d", *TOKEN_INPUTS, "pos")}
        self._calls: list[str] = []
        self._channel: sp.Expr | None = None
        self._model_arg_shape: tuple[sp.Expr, ...] | None = None

    # ---- helpers -------------------------------------------------------------------------------
    def _declare(self, name: str, span: Span | None) -> None:
        if name in BUILTINS:
            raise DuplicateNameError(f"`{name}` is a built-in function", span, "choose another name")
        if name in self.declared:
            prev = self.declared[name]
            where = f" (first declared on line {prev.line})" if prev else " (it is built in)"
            raise DuplicateNameError(f"`{name}` is declared twice{where}", span, "rename one of them")
        self.declared[name] = span

    def _one(self, kind, what: str, required: bool = True):
        found = [s for s in self.mem.stmts if isinstance(s, kind)]
        if len(found) > 1:
            raise DuplicateNameError(f"more than one `{what}` clause", found[1].span, "keep exactly one")
        if not found and required:
            raise MissingClauseError(f"the memory has no `{what}` clause", self.mem.span,
                                     f"add one, e.g. {_EXAMPLES[what]}")
        return found[0] if found else None

    # ---- sizes ---------------------------------------------------------------------------------
    def size(self, e: A.Expr) -> sp.Expr:
        """Evaluate a shape expression over declared sizes to a positive sympy polynomial."""
        if isinstance(e, A.Num):
            if e.value.denominator != 1 or e.value <= 0 or e.value > MAX_SIZE:
                raise ValueRangeError(f"size `{e.text}` must be a positive integer ≤ {MAX_SIZE}", e.span)
            return sp.Integer(e.value.numerator)
        if isinstance(e, A.Name):
            if e.id not in self.dims:
                raise UnknownNameError(f"unknown size `{e.id}`", e.span,
                                       _suggest(e.id, self.dims) or f"declare it first: `dim {e.id}`")
            return self.dims[e.id]
        if isinstance(e, A.BinOp) and e.op in "+*^":
            a, b = self.size(e.left), self.size(e.right)
            if e.op == "^" and not (b.is_Integer and 1 <= b <= 8):
                raise ValueRangeError("a size exponent must be an integer from 1 to 8", e.right.span)
            return sp.expand(a + b if e.op == "+" else a * b if e.op == "*" else a**b)
        raise ShapeError("a size must be built from integers, sizes, +, * and ^", getattr(e, "span", None),
                         "write e.g. `[4*d, d]` or `[1 + d + d^2]`")

    def shape(self, dims: tuple[A.Expr, ...], span: Span | None, max_rank: int = 2) -> tuple[sp.Expr, ...]:
        if len(dims) > max_rank:
            raise ShapeError(f"rank {len(dims)} is not supported here (at most {max_rank})", span,
                             "memory parameters are vectors or matrices")
        return tuple(self.size(x) for x in dims)

    # ---- declarations --------------------------------------------------------------------------
    def declare_all(self) -> None:
        token_shapes = {n: (self.dims["d"],) for n in TOKEN_INPUTS}
        for s in self.mem.stmts:
            if isinstance(s, A.Dim):
                self._declare(s.name, s.span)
                sym = sp.Symbol(s.name, positive=True, integer=True)
                if s.value is not None:
                    sym = self.size(s.value)
                self.dims[s.name] = sym
                self.dim_decl[s.name] = None if s.value is None else sym
            elif isinstance(s, A.Input):
                if s.name not in TOKEN_INPUTS:
                    raise UnknownNameError(f"`{s.name}` is not a token input", s.span,
                                           "the token inputs are q, k and v")
                token_shapes[s.name] = self.shape(s.shape, s.span, max_rank=1)
            elif isinstance(s, (A.Param, A.Outer)):
                self._declare(s.name, s.span)
                role = "param" if isinstance(s, A.Param) else "outer"
                shape = self.shape(s.shape, s.span)
                self.tensors[s.name] = TensorSpec(s.name, shape, role, self.init(s.init, shape), span=s.span)
            elif isinstance(s, A.Gate):
                self._declare(s.name, s.span)
                if s.activation not in ACTIVATIONS:
                    raise UnknownNameError(f"unknown gate activation `{s.activation}`", s.span,
                                           _suggest(s.activation, ACTIVATIONS)
                                           or "one of: " + ", ".join(ACTIVATIONS))
                self.tensors[s.name] = TensorSpec(s.name, self.shape(s.shape, s.span, 1), "gate",
                                                  activation=s.activation)
            elif isinstance(s, (A.Fn, A.Model)):
                self._declare(s.name, s.span)
                args = s.params if isinstance(s, A.Fn) else (s.arg,)
                if len(set(args)) != len(args):
                    raise DuplicateNameError(f"`{s.name}` names an argument twice", s.span)
                self.fns[s.name] = s
        for n in TOKEN_INPUTS:
            self.tensors[n] = TensorSpec(n, token_shapes[n], "token")
        if not self.params_declared():
            raise MissingClauseError("the memory declares no `param`", self.mem.span,
                                     "the memory state is its params, e.g. `param W : [d, d]`")
        for name, t in self.tensors.items():
            self.g.add_input(name, t.shape, t.role)
        for name, _value in self.dims.items():
            if self.dim_decl.get(name) is None:
                self.g.add_input(name, (), "size")
        self.g.add_input("pos", (), "position")

    def params_declared(self) -> bool:
        return any(t.role == "param" for t in self.tensors.values())

    def init(self, e: A.Expr | None, shape) -> Init | None:
        if e is None:
            return None
        name, args, kwargs = (e.id, (), ()) if isinstance(e, A.Name) else (e.func, e.args, e.kwargs)
        if name not in INITS:
            raise UnknownNameError(f"unknown initializer `{name}`", e.span,
                                   _suggest(name, INITS) or "one of: " + ", ".join(INITS))
        expected = INITS[name]
        if len(args) > len(expected):
            raise ArityError(f"`{name}` takes {len(expected)} argument(s)", e.span)
        values = dict(zip(expected, args, strict=False))
        for k, v in kwargs:
            if k not in expected:
                raise ArityError(f"`{name}` has no argument `{k}`", v.span)
            values[k] = v
        out = []
        for k in expected:
            if k not in values:
                raise ArityError(f"`{name}` needs `{k}`", e.span, f"write `{name}({k} = ...)`")
            v = values[k]
            num = _literal(v)
            if num is None:
                raise ValueRangeError(f"`{k}` must be a number", v.span, f"write e.g. `{name}({k} = 0.02)`")
            if name == "normal" and num < 0:
                raise ValueRangeError("`std` must not be negative", v.span)
            out.append((k, num))
        if name == "eye" and (len(shape) != 2 or shape[0] != shape[1]):
            raise ShapeError(f"`eye` needs a square matrix, not {fmt_shape(shape)}", e.span)
        if name == "taylor":
            if not (out[0][1].denominator == 1 and 1 <= out[0][1] <= MAX_POLY_DEGREE):
                raise ValueRangeError(f"taylor degree must be an integer from 1 to {MAX_POLY_DEGREE}", e.span)
            if len(shape) != 1:
                raise ShapeError("`taylor` initialises a feature-coefficient vector", e.span,
                                 "use it on `[1 + d + d^2]`-style vectors")
        return Init(name, tuple(out))

    # ---- expressions ---------------------------------------------------------------------------
    def expr(self, e: A.Expr, scope: _Scope) -> _Value:
        try:
            return self._expr(e, scope)
        except OpShapeError as err:
            raise ShapeError(str(err), getattr(e, "span", None)) from None

    def _expr(self, e: A.Expr, scope: _Scope) -> _Value:
        g = self.g
        if isinstance(e, A.Num):
            return _Value(g.const(sp.Rational(e.value.numerator, e.value.denominator)), e.span)
        if isinstance(e, A.Name):
            if e.id in scope.values:
                return _Value(scope.values[e.id], e.span)
            if e.id in self.dims and e.id in scope.dims:
                return _Value(g.const(self.dims[e.id]), e.span)
            if e.id in self.fns or e.id in BUILTINS:
                raise ArityError(f"`{e.id}` is a function; call it", e.span, f"write `{e.id}(...)`")
            visible = [n for n in scope.values if n != "pos"] + list(scope.dims)
            hint = _suggest(e.id, visible) or "names visible here: " + ", ".join(visible)
            if scope.where.startswith("the optimizer") or scope.where.startswith("the retention"):
                hint = _suggest(e.id, visible) or f"declare it as a gate: `gate {e.id} : scalar sigmoid`"
            if e.id in self.tensors or e.id in self.dims or e.id == "pos":
                hint = f"`{e.id}` cannot be used in {scope.where}"
            raise UnknownNameError(f"unknown name `{e.id}` in {scope.where}", e.span, hint)
        if isinstance(e, A.Neg):
            return _Value(g.add("neg", [self.expr(e.operand, scope).nid]), e.span)
        if isinstance(e, A.BinOp):
            if e.op in _CMP_OPS:
                raise UnsupportedError("a comparison can only be the condition of `where`", e.span,
                                       "write `where(a <= b, x, y)`")
            a, b = self.expr(e.left, scope), self.expr(e.right, scope)
            if e.op == "@":
                return _Value(self.matmul(a, b, e), e.span)
            op = {"+": "add", "-": "sub", "*": "mul", "/": "div", "^": "pow"}[e.op]
            self._check_constants(op, a, b, e)
            try:
                return _Value(g.add(op, [a.nid, b.nid]), e.span)
            except OpShapeError as err:
                sa, sb = fmt_shape(g.node(a.nid).shape), fmt_shape(g.node(b.nid).shape)
                raise ShapeError(f"`{e.op}` of {sa} and {sb}: {err}", e.span,
                                 "elementwise operators need equal shapes (or a scalar on one side)") from None
        assert isinstance(e, A.Call)
        return _Value(self.call(e, scope), e.span)

    def _check_constants(self, op: str, a: _Value, b: _Value, e: A.BinOp) -> None:
        """Constants sympy would fold into zoo/nan, or take forever to evaluate, are errors here."""
        def value(v: _Value):
            n = self.g.node(v.nid)
            if n.op == "neg" and self.g.node(self.g.operands(v.nid)[0]).op == "const":
                return -self.g.node(self.g.operands(v.nid)[0]).attr("value")
            return n.attr("value") if n.op == "const" else None
        right, left = value(b), value(a)
        if op == "div" and right is not None and right == 0:
            raise ValueRangeError("division by zero", e.span, "check the denominator")
        if op == "pow" and right is not None and right.is_number:
            if abs(right) > 64:
                raise ValueRangeError(f"exponent {right} is too large", e.right.span,
                                      "exponents are limited to ±64")
            if right < 0 and left is not None and left == 0:
                raise ValueRangeError("zero to a negative power", e.span)

    def matmul(self, a: _Value, b: _Value, e: A.BinOp) -> int:
        sa, sb = self.g.node(a.nid).shape, self.g.node(b.nid).shape
        if len(sa) == 1 and len(sb) == 1:
            raise ShapeError("`@` of two vectors", e.span, "use `dot(a, b)` for an inner product")
        if len(sa) != 2 or len(sb) != 1:
            raise ShapeError(f"`@` needs a matrix on the left and a vector on the right, "
                             f"got {_shape_words(sa)} @ {_shape_words(sb)}", e.span,
                             "matrix @ matrix is not supported: apply the matrices one after the other")
        try:
            return self.g.add("matvec", [a.nid, b.nid])
        except OpShapeError:
            raise ShapeError(f"`@` of {fmt_shape(sa)} and {fmt_shape(sb)}", e.span,
                             f"the vector must have {sa[1]} entries, the matrix's column count") from None

    def call(self, e: A.Call, scope: _Scope) -> int:
        g = self.g
        if e.func in self.fns:
            return self.inline(e, scope)
        if e.func not in BUILTINS:
            raise UnknownNameError(f"unknown function `{e.func}`", e.span,
                                   _suggest(e.func, list(BUILTINS) + list(self.fns)) or
                                   "see docs/language.md for the built-in functions")
        f = e.func
        allowed_kw = {"layernorm": ("eps",), "rmsnorm": ("eps",)}.get(f, ())
        for k, v in e.kwargs:
            if k not in allowed_kw:
                raise ArityError(f"`{f}` has no keyword `{k}`", e.key_span(k) or v.span,
                                 f"`{f}` takes: " + (", ".join(allowed_kw) or "no keywords"))
        if f == "where":
            self._arity(e, 3)
            cond = e.args[0]
            if not (isinstance(cond, A.BinOp) and cond.op in _CMP_OPS):
                raise UnsupportedError("the first argument of `where` must be a comparison", cond.span,
                                       "write e.g. `where(norm(e) <= delta, a, b)`")
            a, b = self.expr(cond.left, scope), self.expr(cond.right, scope)
            x, y = self.expr(e.args[1], scope), self.expr(e.args[2], scope)
            for v in (a, b):
                if g.node(v.nid).shape:
                    raise ShapeError("`where` compares scalars", v.span, "reduce with `norm`, `sum` or `dot`")
            return g.add("select", [a.nid, b.nid, x.nid, y.nid], cmp=_CMP_OPS[cond.op])
        if f == "poly":
            self._arity(e, 2)
            deg = e.args[1]
            if not (isinstance(deg, A.Num) and deg.value.denominator == 1 and 1 <= deg.value <= MAX_POLY_DEGREE):
                raise ValueRangeError(f"`poly` degree must be an integer from 1 to {MAX_POLY_DEGREE}",
                                      getattr(deg, "span", e.span))
            x = self.vector(self.expr(e.args[0], scope), "poly")
            parts, power = [g.add("broadcast", [g.const(1)], shape=(sp.Integer(1),))], x
            parts.append(x)
            for _ in range(int(deg.value) - 1):
                power = g.add("kron", [power, x])
                parts.append(power)
            return g.add("concat", parts)
        args = [self.expr(a, scope) for a in e.args]
        ids = [a.nid for a in args]
        if f in UNARY:
            self._arity(e, 1)
            return g.add(UNARY[f], ids)
        if f == "elu1":
            self._arity(e, 1)
            return g.add("add", [g.add("elu", ids), g.const(1)])
        if f in ("max", "min"):
            self._arity(e, 2)
            return g.add("maximum" if f == "max" else "minimum", ids)
        if f == "huber":
            self._arity(e, 2)
            return g.add("huber", ids)
        if f in ("sum", "norm"):
            self._arity(e, 1)
            return g.add(f, [self.vector(args[0], f)])
        if f == "sqnorm":
            self._arity(e, 1)
            return g.add("sum", [g.add("pow", [self.vector(args[0], f), g.const(2)])])
        if f == "mean":
            self._arity(e, 1)
            x = self.vector(args[0], f)
            return g.add("div", [g.add("sum", [x]), g.const(g.node(x).shape[0])])
        if f == "dot":
            self._arity(e, 2)
            a, b = (self.vector(v, f) for v in args)
            try:
                return g.add("sum", [g.add("mul", [a, b])])
            except OpShapeError as err:
                raise ShapeError(f"`dot` of different lengths: {err}", e.span) from None
        if f == "l2norm":
            self._arity(e, 1)
            x = self.vector(args[0], f)
            return g.add("div", [x, g.add("norm", [x])])
        if f in ("layernorm", "rmsnorm"):
            return self.norm_layer(e, args, scope)
        if f == "concat":
            if not args:
                raise ArityError("`concat` needs at least one vector", e.span)
            return g.add("concat", [self.vector(a, f) for a in args])
        if f == "kron":
            self._arity(e, 2)
            return g.add("kron", [self.vector(a, f) for a in args])
        raise AssertionError(f)

    def norm_layer(self, e: A.Call, args: list[_Value], scope: _Scope) -> int:
        g, f = self.g, e.func
        if len(args) not in (1, 3 if f == "layernorm" else 2):
            n = "x[, weight, bias]" if f == "layernorm" else "x[, weight]"
            raise ArityError(f"`{f}` takes ({n})", e.span)
        eps_expr = e.kwarg("eps")
        eps = g.const(sp.Rational(1, 10**6))
        if eps_expr is not None:
            value = _literal(eps_expr)
            if value is None or value <= 0:
                raise ValueRangeError("`eps` must be a positive number", eps_expr.span, "e.g. `eps = 0.00001`")
            eps = g.const(sp.Rational(value.numerator, value.denominator))
        x = self.vector(args[0], f)
        n = g.const(g.node(x).shape[0])
        if f == "layernorm":
            mean = g.add("div", [g.add("sum", [x]), n])
            x = g.add("sub", [x, mean])
        var = g.add("div", [g.add("sum", [g.add("pow", [x, g.const(2)])]), n])
        y = g.add("div", [x, g.add("sqrt", [g.add("add", [var, eps])])])
        try:
            if len(args) > 1:
                y = g.add("mul", [y, args[1].nid])
            if len(args) > 2:
                y = g.add("add", [y, args[2].nid])
        except OpShapeError as err:
            raise ShapeError(f"`{f}` weight or bias does not fit: {err}", e.span) from None
        return y

    def vector(self, v: _Value, where: str) -> int:
        if len(self.g.node(v.nid).shape) != 1:
            raise ShapeError(f"`{where}` needs a vector, got {_shape_words(self.g.node(v.nid).shape)}",
                             v.span)
        return v.nid

    def _arity(self, e: A.Call, n: int) -> None:
        if len(e.args) != n:
            raise ArityError(f"`{e.func}` takes {n} argument(s), got {len(e.args)}", e.span)

    def inline(self, e: A.Call, scope: _Scope) -> int:
        fn = self.fns[e.func]
        params = fn.params if isinstance(fn, A.Fn) else (fn.arg,)
        if len(e.args) != len(params) or e.kwargs:
            raise ArityError(f"`{e.func}` takes {len(params)} argument(s), got {len(e.args) + len(e.kwargs)}",
                             e.span)
        if e.func in self._calls:
            raise UnsupportedError(f"`{e.func}` calls itself", e.span, "functions cannot be recursive")
        args = {p: self.expr(a, scope).nid for p, a in zip(params, e.args, strict=True)}
        if isinstance(fn, A.Model) and self._model_arg_shape is None:
            self._model_arg_shape = self.g.node(args[fn.arg]).shape
        visible = self.fn_scope(fn)
        inner = _Scope({**visible, **args}, scope.fns, scope.dims, f"`{e.func}`")
        self._calls.append(e.func)
        try:
            return self.expr(fn.body, inner).nid
        finally:
            self._calls.pop()

    def fn_scope(self, fn: A.Fn | A.Model) -> dict[str, int]:
        """A model sees params and outers; a helper `fn` sees only outers (gradients flow through M)."""
        roles = ("param", "outer") if isinstance(fn, A.Model) else ("outer",)
        return {n: self.g.inputs[n] for n, t in self.tensors.items() if t.role in roles}

    def scope(self, names: tuple[str, ...], where: str, pos: bool = False) -> _Scope:
        values = {n: self.g.inputs[n] for n in names}
        values.update({n: self.g.inputs[n] for n, t in self.tensors.items() if t.role in ("gate", "outer")})
        if pos:
            values["pos"] = self.g.inputs["pos"]
        return _Scope(values, self.fns, self.dims, where)

    # ---- clauses -------------------------------------------------------------------------------
    def build(self) -> Program:
        self.declare_all()
        model = self._one(A.Model, "model")
        loss = self._one(A.Loss, "loss")
        read = self._one(A.Read, "read")
        optim = self._one(A.Optim, "optim")
        retain = self._one(A.Retain, "retain", required=False)
        window = self._one(A.Window, "window", required=False)
        params = tuple(t.name for t in self.tensors.values() if t.role == "param")

        loss_scope = self.scope(("k", "v"), "the loss")
        lv = self.expr(loss.expr, loss_scope)
        if self.g.node(lv.nid).shape != ():
            raise ShapeError(f"the loss must be a scalar, got {fmt_shape(self.g.node(lv.nid).shape)}",
                             loss.expr.span, "reduce it, e.g. `sum((M(k) - v)^2)`")
        if not self.g.depends_on(lv.nid, params):
            raise DependencyError("the loss does not depend on the memory", loss.expr.span,
                                  f"use the model, e.g. `loss sum(({model.name}(k) - v)^2)`")
        self.g.outputs["loss"] = lv.nid

        rv = self.expr(read.expr, self.scope(("q",), "the read"))
        v_shape = self.tensors["v"].shape
        if self.g.node(rv.nid).shape != v_shape:
            raise ShapeError(f"the read must have v's shape {fmt_shape(v_shape)}, got "
                             f"{_shape_words(self.g.node(rv.nid).shape)}", read.expr.span)
        if not self.g.depends_on(rv.nid, params):
            raise DependencyError("the read does not use the memory", read.expr.span,
                                  f"read through the model, e.g. `read {model.name}(q)`")
        self.g.outputs["read"] = rv.nid

        x = self.g.add_input(model.arg, self.model_input_shape(model), "model_input")
        self.g.outputs["model"] = self.expr(model.body, _Scope({**self.fn_scope(model), model.arg: x},
                                                               self.fns, self.dims, "the model")).nid

        optim_spec = self.optim(optim)
        retain_spec = self.retain(retain, optim_spec)
        size, weight = self.window(window, retain_spec)
        return Program(
            name=self.mem.name, path=self.path, source=self.source,
            dims={n: self.dim_decl.get(n) for n in self.dims}, tensors=self.tensors, graph=self.g,
            optim=optim_spec, retain=retain_spec, window=size, window_weight=weight,
            read_order=read.order, schedule=self.schedule(), read_span=read.expr.span,
        )

    def model_input_shape(self, model: A.Model) -> tuple[sp.Expr, ...]:
        """The model's argument has the shape of what the loss first feeds it (recorded at inlining)."""
        return self._model_arg_shape if self._model_arg_shape is not None else self.tensors["k"].shape

    def hyper(self, name: str, e: A.Expr, span: Span | None, pos: bool = False) -> str:
        """A per-token hyper-parameter (lr, decay, keep ...): built from gates, outers and numbers."""
        where = f"the optimizer's `{name[6:]}`" if name.startswith("optim.") else \
            f"the retention's `{name.split('.', 1)[1]}`" if name.startswith("retain") else f"`{name}`"
        scope = self.scope((), where, pos=pos)
        scope.fns = {n: f for n, f in self.fns.items() if isinstance(f, A.Fn)}
        v = self.expr(e, scope)
        shape = self.g.node(v.nid).shape
        if len(shape) > 1:
            raise ShapeError(f"`{name}` must be a scalar or a per-channel vector, got {fmt_shape(shape)}", e.span)
        if shape:
            if self._channel is not None and self._channel != shape[0]:
                raise ShapeError(f"per-channel `{name}` has {shape[0]} channels, another has {self._channel}",
                                 e.span, "all per-channel gates of a rule must have the same size")
            self._channel = shape[0]
            for p in (t for t in self.tensors.values() if t.role == "param"):
                if not any(d == shape[0] for d in (p.shape[0], p.shape[-1])):
                    raise ShapeError(f"per-channel `{name}` of size {shape[0]} fits no axis of param "
                                     f"{p.name} {fmt_shape(p.shape)}", e.span,
                                     "a channel gate scales a param's rows (or columns); use a scalar gate")
        out = f"{name}"
        self.g.outputs[out] = v.nid
        return out

    def optim(self, o: A.Optim) -> OptimSpec:
        c = o.call
        kinds = {"gd": ("lr", "scale", "clip"), "momentum": ("lr", "decay", "clip"),
                 "muon": ("lr", "decay", "steps", "clip")}
        if c.func not in kinds:
            if c.func == "adam":
                raise UnsupportedError("`adam` is not an inner optimizer memdsl can chunk", c.span,
                                       "use gd, momentum or muon")
            raise UnknownNameError(f"unknown optimizer `{c.func}`", c.span,
                                   _suggest(c.func, kinds) or "one of: gd, momentum, muon")
        if c.args:
            raise ArityError(f"`{c.func}` takes keyword arguments only", c.args[0].span,
                             f"write `{c.func}(lr = ...)`")
        allowed = kinds[c.func]
        for k, v in c.kwargs:
            if k not in allowed:
                raise ArityError(f"`{c.func}` has no argument `{k}`", c.key_span(k) or v.span,
                                 _suggest(k, allowed) or "it takes: " + ", ".join(allowed))
        if c.kwarg("lr") is None:
            raise ArityError(f"`{c.func}` needs `lr`", c.span, f"e.g. `{c.func}(lr = theta)`")
        if c.func in ("momentum", "muon") and c.kwarg("decay") is None:
            raise ArityError(f"`{c.func}` needs `decay` (the momentum decay)", c.span)
        steps = 0
        if c.func == "muon":
            s = c.kwarg("steps")
            if s is None:
                steps = 5
            elif not (isinstance(s, A.Num) and s.value.denominator == 1 and 1 <= s.value <= MAX_NS_STEPS):
                raise ValueRangeError(f"`steps` must be an integer from 1 to {MAX_NS_STEPS}", s.span)
            else:
                steps = int(s.value)
            for p in self.tensors.values():
                if p.role == "param" and len(p.shape) != 2:
                    raise UnsupportedError(f"muon orthogonalises matrices; param {p.name} is a vector", c.span,
                                           "use momentum for rules with bias vectors")
        lr = self.hyper("optim.lr", c.kwarg("lr"), c.span)
        decay = self.hyper("optim.decay", c.kwarg("decay"), c.span) if c.kwarg("decay") is not None else None
        scale = None
        if c.kwarg("scale") is not None:
            scale = self.hyper("optim.scale", c.kwarg("scale"), c.span, pos=True)
            if self.g.node(self.g.outputs[scale]).shape:
                raise ShapeError("`scale` must be a scalar", c.kwarg("scale").span)
            if self.g.depends_on(self.g.outputs[scale], [t.name for t in self.gates_list()]):
                raise UnsupportedError("`scale` may depend only on `pos` and constants", c.kwarg("scale").span,
                                       "put token-dependent factors into `lr`")
        clip = None
        if c.kwarg("clip") is not None:
            e = c.kwarg("clip")
            # a literal, not a gate: the bound is part of the rule, and a constant keeps every backend exact at C=1
            if not (isinstance(e, A.Num) and e.value > 0):
                raise ValueRangeError("`clip` must be a positive number (a literal)", e.span,
                                      "e.g. `clip = 1.0`: each token's gradient is scaled to norm ≤ 1.0")
            clip = e.value
        return OptimSpec(c.func, lr, decay, scale, steps, clip)

    def gates_list(self) -> list[TensorSpec]:
        return [t for t in self.tensors.values() if t.role == "gate"]

    def retain(self, r: A.Retain | None, optim: OptimSpec) -> tuple[RetainSpec, ...]:
        if r is None:
            return ()
        forms = {"decay": ("keep", "grad_at"), "l2": ("rate",), "lq": ("q",), "softmax": ("keep",),
                 "elastic": ("keep", "threshold")}
        out: list[RetainSpec] = []
        for i, c in enumerate(r.calls):
            if c.func not in forms:
                raise UnknownNameError(f"unknown retention `{c.func}`", c.span,
                                       _suggest(c.func, forms) or "one of: " + ", ".join(forms))
            names = forms[c.func]
            if len(c.args) > 1:
                raise ArityError(f"`{c.func}` takes one positional argument", c.args[1].span)
            given = dict(zip(names[:1], c.args, strict=False))
            for k, v in c.kwargs:
                if k in given:
                    raise ArityError(f"`{c.func}` gets `{k}` twice", c.key_span(k) or v.span,
                                     "give it either by position or by keyword")
                if k not in names:
                    raise ArityError(f"`{c.func}` has no argument `{k}`", c.key_span(k) or v.span,
                                     "it takes: " + ", ".join(names))
                given[k] = v
            values, numbers, grad_at = [], [], "anchor"
            for k in names:
                v = given.get(k)
                if k == "grad_at":
                    if v is not None:
                        if not (isinstance(v, A.Name) and v.id in ("anchor", "decayed")):
                            raise ValueRangeError("`grad_at` is `anchor` or `decayed`", v.span)
                        grad_at = v.id
                    continue
                if v is None:
                    raise ArityError(f"`{c.func}` needs `{k}`", c.span)
                if k == "q":
                    if not (isinstance(v, A.Num) and 1 < v.value <= 8):
                        raise ValueRangeError("`q` must be a number in (1, 8]", v.span)
                    numbers.append((k, v.value))
                else:
                    values.append((k, self.hyper(f"retain{i}.{k}", v, c.span)))
            out.append(RetainSpec(c.func, tuple(values), tuple(numbers), grad_at))
        kinds = [s.kind for s in out]
        nonlinear = [k for k in kinds if k in ("lq", "softmax", "elastic")]
        if len(nonlinear) > 1:
            raise UnsupportedError(f"`{nonlinear[0]}` and `{nonlinear[1]}` cannot be combined", r.span,
                                   "a rule has at most one nonlinear retention")
        if len(kinds) != len(set(kinds)):
            raise DuplicateNameError("a retention form is given twice", r.span, "merge the two keep factors")
        if "softmax" in kinds and ("decay" in kinds or optim.kind != "gd"):
            raise UnsupportedError("softmax (KL) retention takes its own keep factor and plain `gd`", r.span,
                                   "Memora: `optim gd(lr = eta)` with `retain softmax(alpha)`")
        if "elastic" in kinds and "decay" in kinds:
            raise UnsupportedError("elastic net carries its own keep factor", r.span, "drop `decay`")
        if any(s.grad_at == "decayed" for s in out) and optim.kind != "gd":
            raise UnsupportedError("`grad_at = decayed` is defined for plain `gd`", r.span)
        if optim.scale is not None:
            raise UnsupportedError("a position `scale` and a retention cannot be combined", r.span,
                                   "TTT's 1/pos scaling is defined for plain accumulation: drop one of them")
        if any(s.grad_at == "decayed" for s in out) and any(k != "decay" for k in kinds):
            raise UnsupportedError("`grad_at = decayed` needs `decay` as the only retention", r.span)
        for s in out:
            thr = s.value("threshold")
            if thr is not None and self.g.depends_on(self.g.outputs[thr], [t.name for t in self.gates_list()]):
                raise UnsupportedError("the elastic-net threshold must not depend on gates", r.span,
                                       "use a number or an `outer` constant")
        return tuple(out)

    def window(self, w: A.Window | None, retain: tuple[RetainSpec, ...] = ()) -> tuple[int, str | None]:
        if w is None:
            return 1, None
        if any(r.grad_at == "decayed" for r in retain):
            raise UnsupportedError("an Omega window with `grad_at = decayed`", w.span,
                                   "window gradients are taken at the chunk anchor: drop `grad_at = decayed`")
        if not (isinstance(w.size, A.Num) and w.size.value.denominator == 1 and 1 <= w.size.value <= MAX_WINDOW):
            raise ValueRangeError(f"the window size must be an integer from 1 to {MAX_WINDOW}",
                                  getattr(w.size, "span", w.span))
        if w.weight is not None:
            t = self.tensors.get(w.weight)
            if t is None or t.role != "gate":
                raise UnknownNameError(f"window weight `{w.weight}` is not a declared gate", w.span,
                                       f"declare it: `gate {w.weight} : scalar sigmoid`")
            if t.shape:
                raise ShapeError("the window weight must be a scalar gate", w.span)
        return int(w.size.value), w.weight

    def schedule(self) -> ScheduleSpec:
        s = self.rule.schedule
        if s is None:
            return ScheduleSpec()
        chunk, gchunk, locals_, qk, tile, sem = None, None, [], None, None, None
        seen: set[type] = set()
        for st in s.stmts:
            if type(st) in seen and not isinstance(st, A.LocalMem):
                raise ScheduleError(f"`{type(st).__name__.lower()}` is given twice", st.span, "keep one")
            seen.add(type(st))
            if isinstance(st, A.Chunk):
                chunk = _chunk(st.size, st.span)
            elif isinstance(st, A.GlobalMem):
                gchunk = _chunk(st.chunk, st.span)
            elif isinstance(st, A.LocalMem):
                c = _chunk(st.chunk, st.span)
                if st.reset < c or st.reset % c:
                    raise ScheduleError(f"reset period {st.reset} is not a multiple of the local chunk {c}",
                                        st.span, "shards must hold whole chunks")
                locals_.append(LocalSpec(c, st.reset))
            elif isinstance(st, A.QKProjection):
                qk = st
            elif isinstance(st, A.Tile):
                tile = (_chunk(st.time, st.span), _chunk(st.variate, st.span))
                raise ScheduleError("`tile` schedules 2-D rules; this rule has one axis (time)", st.span,
                                    "use `chunk N`")
            elif isinstance(st, A.Semantics):
                if st.mode not in ("exact", "anchored"):
                    raise ValueRangeError("semantics is `exact` or `anchored`", st.span)
                sem = st.mode
        if chunk is not None and gchunk is not None:
            raise ScheduleError("`chunk` and a TNT `global chunk` exclude each other", s.span,
                                "a TNT hierarchy sets its chunks per memory")
        if locals_ and gchunk is None:
            raise ScheduleError("local memories need a global memory", s.span, "add `global chunk 2048`")
        if qk is not None and not locals_:
            raise ScheduleError("`qk_projection` applies to local memories", qk.span,
                                "add `local chunk 16 reset 2048`")
        return ScheduleSpec(chunk or 16, gchunk, tuple(locals_), qk.on if qk else True, tile, sem)


def _chunk(n: int, span: Span | None) -> int:
    if not 1 <= n <= MAX_CHUNK:
        raise ValueRangeError(f"chunk size {n} is outside 1..{MAX_CHUNK}", span)
    return n


def _shape_words(shape) -> str:
    return fmt_shape(shape) if shape else "a scalar"


def _literal(e: A.Expr) -> Fraction | None:
    """A number written directly, possibly negated."""
    if isinstance(e, A.Num):
        return e.value
    if isinstance(e, A.Neg) and isinstance(e.operand, A.Num):
        return -e.operand.value
    return None


_EXAMPLES = {
    "model": "`model M(x) = W @ x`", "loss": "`loss sum((M(k) - v)^2)`", "read": "`read M(q)`",
    "optim": "`optim gd(lr = eta)`", "retain": "`retain decay(alpha)`", "window": "`window 4`",
}


def build(rule: A.RuleFile, source: str, path: str) -> Program:
    """Check a parsed rule and build its Program. Raises a positioned `MemDSLError`."""
    try:
        if any(isinstance(s, (A.Axes, A.AxisRetain)) for s in rule.memory.stmts):
            from .twod import Builder2D  # a 2-D rule: same checks and IR, plus axes and per-axis retention
            return Builder2D(rule, source, path).build()
        return Builder(rule, source, path).build()
    except RecursionError:
        raise ValueRangeError("an expression is nested too deeply", rule.memory.span,
                              "split it into helper functions (`fn`)").attach(source, path) from None
    except MemDSLError as err:
        raise err.attach(source, path) from None


BuildFn = Callable[[A.RuleFile, str, str], Program]
