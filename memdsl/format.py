"""AST → canonical `.mem` text. `parse(format_rule(parse(s))) == parse(s)` for every valid file."""

from __future__ import annotations

from . import ast as A

# binding strength: higher binds tighter
_PREC = {"<=": 1, ">=": 1, "<": 1, ">": 1, "==": 1, "!=": 1, "+": 2, "-": 2, "*": 3, "/": 3, "@": 3,
         "neg": 4, "^": 5}


def format_num(value) -> str:
    """Print a parsed number exactly: an integer, or a decimal (what the grammar accepts)."""
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:  # not a decimal: only compiler-made values get here
        return f"({value.numerator} / {value.denominator})"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
    return ("-" if value < 0 else "") + text


def format_expr(e: A.Expr, parent: int = 0, right: bool = False) -> str:
    if isinstance(e, A.Num):
        return format_num(e.value)
    if isinstance(e, A.Name):
        return e.id
    if isinstance(e, A.Call):
        parts = [format_expr(a) for a in e.args] + [f"{k} = {format_expr(v)}" for k, v in e.kwargs]
        return f"{e.func}({', '.join(parts)})"
    if isinstance(e, A.Neg):
        text = "-" + format_expr(e.operand, _PREC["neg"])
        return f"({text})" if parent > _PREC["neg"] else text
    assert isinstance(e, A.BinOp)
    p = _PREC[e.op]
    if e.op == "^":  # right-associative; its right side is a unary
        text = f"{format_expr(e.left, p + 1)}^{format_expr(e.right, _PREC['neg'])}"
    elif p == 1:  # comparisons do not chain
        text = f"{format_expr(e.left, p + 1)} {e.op} {format_expr(e.right, p + 1)}"
    else:
        text = f"{format_expr(e.left, p)} {e.op} {format_expr(e.right, p + 1)}"
    return f"({text})" if p < parent else text


def _shape(shape: tuple[A.Expr, ...]) -> str:
    return "[" + ", ".join(format_expr(s) for s in shape) + "]"


def format_stmt(s: A.Stmt) -> str:
    if isinstance(s, A.Dim):
        return f"dim {s.name}" + (f" = {format_expr(s.value)}" if s.value is not None else "")
    if isinstance(s, A.Input):
        return f"input {s.name} : {_shape(s.shape)}"
    if isinstance(s, (A.Param, A.Outer)):
        kw = "param" if isinstance(s, A.Param) else "outer"
        init = f" init {format_expr(s.init)}" if s.init is not None else ""
        return f"{kw} {s.name} : {_shape(s.shape)}{init}"
    if isinstance(s, A.Gate):
        shape = _shape(s.shape) if s.shape else "scalar"
        return f"gate {s.name} : {shape} {s.activation}"
    if isinstance(s, A.Fn):
        return f"fn {s.name}({', '.join(s.params)}) = {format_expr(s.body)}"
    if isinstance(s, A.Model):
        return f"model {s.name}({s.arg}) = {format_expr(s.body)}"
    if isinstance(s, A.Loss):
        return f"loss {format_expr(s.expr)}"
    if isinstance(s, A.Window):
        return f"window {format_expr(s.size)}" + (f" weight {s.weight}" if s.weight else "")
    if isinstance(s, A.Optim):
        return f"optim {format_expr(s.call)}"
    if isinstance(s, A.Retain):
        return "retain " + ", ".join(format_expr(c) for c in s.calls)
    if isinstance(s, A.Axes):
        return "axes " + ", ".join(s.names) + (" bidirectional" if s.bidirectional else "")
    if isinstance(s, A.AxisRetain):
        return f"retain {s.axis} " + ", ".join(format_expr(c) for c in s.calls)
    if isinstance(s, A.Read):
        return f"read {format_expr(s.expr)}" + (" before" if s.order == "before" else "")
    raise TypeError(type(s).__name__)


def format_sched(s: A.SchedStmt) -> str:
    if isinstance(s, A.Chunk):
        return f"chunk {s.size}"
    if isinstance(s, A.GlobalMem):
        return f"global chunk {s.chunk}"
    if isinstance(s, A.LocalMem):
        return f"local chunk {s.chunk} reset {s.reset}"
    if isinstance(s, A.QKProjection):
        return f"qk_projection {'on' if s.on else 'off'}"
    if isinstance(s, A.Tile):
        return f"tile time {s.time} variate {s.variate}"
    if isinstance(s, A.Semantics):
        return f"semantics {s.mode}"
    raise TypeError(type(s).__name__)


def format_rule(rule: A.RuleFile) -> str:
    lines = [f"memory {rule.memory.name} {{"]
    lines += [f"  {format_stmt(s)}" for s in rule.memory.stmts]
    lines.append("}")
    if rule.schedule is not None:
        lines.append("schedule {")
        lines += [f"  {format_sched(s)}" for s in rule.schedule.stmts]
        lines.append("}")
    return "\n".join(lines) + "\n"
