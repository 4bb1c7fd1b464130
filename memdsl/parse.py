"""Text → AST. Syntax errors become `MemSyntaxError` with the position and what was expected."""

from __future__ import annotations

import functools
from fractions import Fraction
from importlib import resources

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast as A
from .errors import MemDSLError, MemSyntaxError, Span, ValueRangeError

MAX_SOURCE_CHARS = 200_000
MAX_LITERAL_DIGITS = 40
MAX_NESTING = 64

_TOKEN_NAMES = {
    "NAME": "a name", "NUMBER": "a number", "INT": "an integer", "LBRACE": "'{'", "RBRACE": "'}'",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "COLON": "':'",
    "EQUAL": "'='", "PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "CIRCUMFLEX": "'^'",
    "CMP": "a comparison", "READ_ORDER": "'before' or 'after'", "SWITCH": "'on' or 'off'", "$END": "end of file",
    "BIDIRECTIONAL": "'bidirectional'",
}


@functools.cache
def _parser() -> Lark:
    grammar = resources.files("grammar").joinpath("memdsl.lark").read_text()
    # maybe_placeholders=False: an optional `[...]` item that is absent is left out of the tree rather than
    # given as None, which is what the AST builder's child counting expects
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _span_of(meta) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(tok: Token) -> Span:
    return Span(tok.line, tok.column, tok.end_line or tok.line, tok.end_column or tok.column + len(tok))


def _int(tok: Token) -> int:
    if len(tok) > MAX_LITERAL_DIGITS:
        raise ValueRangeError(f"integer literal with {len(tok)} digits", _tok_span(tok),
                              f"literals are limited to {MAX_LITERAL_DIGITS} digits")
    return int(tok)


@v_args(meta=True)
class _ToAst(Transformer):
    # expressions
    def number(self, meta, children):
        (tok,) = children
        mantissa = tok.lower().split("e")[0].replace(".", "")
        if len(mantissa) > MAX_LITERAL_DIGITS:
            raise ValueRangeError(f"number literal `{tok[:20]}...` is too long", _tok_span(tok),
                                  f"literals are limited to {MAX_LITERAL_DIGITS} digits")
        if "e" in tok.lower() and abs(int(tok.lower().split("e")[1])) > 30:
            raise ValueRangeError(f"number literal `{tok}` is out of range", _tok_span(tok),
                                  "exponents are limited to ±30")
        return A.Num(Fraction(str(tok)), str(tok), _span_of(meta))

    def name(self, meta, children):
        return A.Name(str(children[0]), _span_of(meta))

    def call(self, meta, children):
        func, *rest = children
        args, kwargs, key_spans = [], [], []
        for a in rest:
            if a is None:
                continue
            if isinstance(a, tuple):
                if any(k == a[0] for k, _ in kwargs):
                    raise MemSyntaxError(f"keyword `{a[0]}` given twice", a[2], "remove one of them")
                kwargs.append(a[:2])
                key_spans.append(a[2])
            elif kwargs:
                raise MemSyntaxError("a positional argument follows a keyword argument",
                                     getattr(a, "span", None), "put positional arguments first")
            else:
                args.append(a)
        return A.Call(str(func), tuple(args), tuple(kwargs), _span_of(meta), tuple(key_spans))

    def kwarg(self, meta, children):
        key, value = children
        return (str(key), value, _tok_span(key))

    def add(self, meta, children):
        return A.BinOp("+", children[0], children[-1], _span_of(meta))

    def sub(self, meta, children):
        return A.BinOp("-", children[0], children[-1], _span_of(meta))

    def mul(self, meta, children):
        return A.BinOp("*", children[0], children[-1], _span_of(meta))

    def div(self, meta, children):
        return A.BinOp("/", children[0], children[-1], _span_of(meta))

    def matmul(self, meta, children):
        return A.BinOp("@", children[0], children[-1], _span_of(meta))

    def pow(self, meta, children):
        return A.BinOp("^", children[0], children[-1], _span_of(meta))

    def compare(self, meta, children):
        left, op, right = children
        return A.BinOp(str(op), left, right, _span_of(meta))

    def neg(self, meta, children):
        return A.Neg(children[0], _span_of(meta))

    # memory statements
    def shape(self, meta, children):
        return tuple(children)

    def scalar_shape(self, meta, children):
        return ()

    def dim(self, meta, children):
        return A.Dim(str(children[0]), children[1] if len(children) > 1 else None, _span_of(meta))

    def input(self, meta, children):
        return A.Input(str(children[0]), children[1], _span_of(meta))

    def init(self, meta, children):
        return children[0]

    def param(self, meta, children):
        return A.Param(str(children[0]), children[1], children[2] if len(children) > 2 else None,
                       _span_of(meta))

    def outer(self, meta, children):
        return A.Outer(str(children[0]), children[1], children[2] if len(children) > 2 else None,
                       _span_of(meta))

    def gate(self, meta, children):
        name, shape, act = children
        return A.Gate(str(name), shape, str(act), _span_of(meta))

    def fn(self, meta, children):
        name, *params, body = children
        return A.Fn(str(name), tuple(str(p) for p in params), body, _span_of(meta))

    def model(self, meta, children):
        name, arg, body = children
        return A.Model(str(name), str(arg), body, _span_of(meta))

    def loss(self, meta, children):
        return A.Loss(children[0], _span_of(meta))

    def window(self, meta, children):
        return A.Window(children[0], str(children[1]) if len(children) > 1 else None, _span_of(meta))

    def optim(self, meta, children):
        return A.Optim(children[0], _span_of(meta))

    def retain(self, meta, children):
        return A.Retain(tuple(children), _span_of(meta))

    def axes(self, meta, children):
        names = [str(c) for c in children if c.type == "NAME"]
        return A.Axes(tuple(names), any(c.type == "BIDIRECTIONAL" for c in children), _span_of(meta))

    def retain_axis(self, meta, children):
        return str(children[0])

    def axis_retain(self, meta, children):
        return A.AxisRetain(children[0], tuple(children[1:]), _span_of(meta))

    def read(self, meta, children):
        order = str(children[1]) if len(children) > 1 else "after"
        return A.Read(children[0], order, _span_of(meta))

    def memory(self, meta, children):
        name, *stmts = children
        return A.Memory(str(name), tuple(stmts), _span_of(meta))

    # schedule
    def chunk(self, meta, children):
        return A.Chunk(_int(children[0]), _span_of(meta))

    def global_mem(self, meta, children):
        return A.GlobalMem(_int(children[0]), _span_of(meta))

    def local_mem(self, meta, children):
        return A.LocalMem(_int(children[0]), _int(children[1]), _span_of(meta))

    def qk_projection(self, meta, children):
        return A.QKProjection(str(children[0]) == "on", _span_of(meta))

    def tile(self, meta, children):
        return A.Tile(_int(children[0]), _int(children[1]), _span_of(meta))

    def semantics(self, meta, children):
        return A.Semantics(str(children[0]), _span_of(meta))

    def schedule(self, meta, children):
        return A.Schedule(tuple(children), _span_of(meta))

    def start(self, meta, children):
        return list(children)


def _expected(exc: UnexpectedInput) -> str:
    names = sorted({_TOKEN_NAMES.get(t, f"'{t.lower()}'" if t.isupper() and not t.startswith("_")
                                     else t) for t in (getattr(exc, "expected", None) or ())})
    keywords = [n for n in names if n.startswith("'") and n[1:-1].isalpha()]
    others = [n for n in names if n not in keywords]
    shown = others + keywords
    if len(shown) > 8:
        shown = shown[:8] + ["..."]
    return ", ".join(shown)


def _syntax_error(exc: UnexpectedInput) -> MemSyntaxError:
    if isinstance(exc, UnexpectedCharacters):
        span = Span(exc.line, exc.column, exc.line, exc.column + 1)
        return MemSyntaxError(f"unexpected character {exc.char!r}", span,
                              "rule files use ASCII names, numbers and the operators + - * / @ ^")
    if isinstance(exc, UnexpectedEOF):
        return MemSyntaxError("the file ends in the middle of a statement", None,
                              f"expected {_expected(exc)}; is a closing '}}' or ')' missing?")
    assert isinstance(exc, UnexpectedToken)
    tok = exc.token
    if tok.type == "$END":
        return MemSyntaxError("the file ends in the middle of a statement", None,
                              f"expected {_expected(exc)}; is a closing '}}' or ')' missing?")
    what = f"'{tok}'" if tok.type != "NAME" else f"name '{tok}'"
    return MemSyntaxError(f"unexpected {what}", _tok_span(tok), f"expected {_expected(exc)}")


def _nesting_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            best = max(best, depth)
        elif ch in ")]}":
            depth -= 1
    return best


def _end_span(source: str) -> Span:
    lines = source.splitlines() or [""]
    last = len(lines)
    while last > 1 and not lines[last - 1].strip():
        last -= 1
    col = len(lines[last - 1].rstrip()) + 1
    return Span(last, col, last, col + 1)


def parse(source: str, path: str = "<rule>") -> A.RuleFile:
    """Parse rule-file text into an AST. Raises a `MemDSLError` (with source attached) on bad input."""
    try:
        return _parse(source)
    except MemDSLError as err:
        if err.span is None and isinstance(err, MemSyntaxError):
            err.span = _end_span(source)
        raise err.attach(source, path) from None


def _parse(source: str) -> A.RuleFile:
    if len(source) > MAX_SOURCE_CHARS:
        raise ValueRangeError(f"the file has {len(source)} characters", Span(1, 1, 1, 2),
                              f"rule files are limited to {MAX_SOURCE_CHARS} characters")
    if _nesting_depth(source) > MAX_NESTING:
        raise ValueRangeError("brackets are nested too deeply", Span(1, 1, 1, 2),
                              f"nesting is limited to {MAX_NESTING} levels")
    try:
        tree: Tree = _parser().parse(source)
        items = _ToAst().transform(tree)
    except UnexpectedInput as exc:
        raise _syntax_error(exc) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, MemDSLError):
            raise exc.orig_exc from None
        if isinstance(exc.orig_exc, RecursionError):
            raise ValueRangeError("the expression is nested too deeply", Span(1, 1, 1, 2),
                                  "split it into helper functions (`fn`)") from None
        raise
    except RecursionError:
        raise ValueRangeError("the expression is nested too deeply", Span(1, 1, 1, 2),
                              "split it into helper functions (`fn`)") from None
    memories = [i for i in items if isinstance(i, A.Memory)]
    schedules = [i for i in items if isinstance(i, A.Schedule)]
    if not memories:
        raise MemSyntaxError("the file has no `memory` block", Span(1, 1, 1, 2),
                             "a rule file is `memory NAME { ... }` (see docs/language.md)")
    if len(memories) > 1:
        raise MemSyntaxError(f"a rule file holds exactly one `memory` block, found {len(memories)}",
                             memories[1].span, "put each model in its own file")
    if len(schedules) > 1:
        raise MemSyntaxError("more than one `schedule` block", schedules[1].span, "merge them into one")
    return A.RuleFile(memories[0], schedules[0] if schedules else None)
