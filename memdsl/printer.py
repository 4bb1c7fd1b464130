"""Stable text forms of each stage: the AST dump, the Program summary, IR functions by group."""

from __future__ import annotations

import hashlib
from dataclasses import fields, is_dataclass
from fractions import Fraction

from . import ast as A
from .format import format_num
from .ir import print_function
from .ops import fmt_shape
from .program import Program


def dump_ast(node, indent: int = 0) -> str:
    """An indented tree of the AST, positions omitted (they are in the golden source anyway)."""
    pad = "  " * indent
    if isinstance(node, A.Num):
        return f"{pad}Num {format_num(node.value)}"
    if isinstance(node, A.Name):
        return f"{pad}Name {node.id}"
    if isinstance(node, tuple):
        return "\n".join(dump_ast(x, indent) for x in node) if node else f"{pad}()"
    if is_dataclass(node):
        simple, nested = [], []
        for f in fields(node):
            if not f.compare:  # spans and literal text: positions live in the source itself
                continue
            v = getattr(node, f.name)
            if isinstance(v, (str, int, bool, Fraction)) or v is None:
                simple.append(f"{f.name}={v}")
            elif isinstance(v, tuple) and v and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                                    for x in v):
                nested += [(f"{f.name}.{k}", x) for k, x in v]
            elif isinstance(v, tuple) and all(isinstance(x, str) for x in v):
                simple.append(f"{f.name}=({', '.join(v)})")
            else:
                nested.append((f.name, v))
        head = f"{pad}{type(node).__name__}" + (" " + " ".join(simple) if simple else "")
        parts = [head]
        for name, v in nested:
            parts.append(f"{pad}  {name}:")
            parts.append(dump_ast(v, indent + 2))
        return "\n".join(parts)
    return f"{pad}{node!r}"


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def summary(p: Program) -> str:
    dims = ", ".join(n if v is None else f"{n} = {v}" for n, v in p.dims.items())
    lines = [f"rule {p.name}  ({p.path}, sha256 {source_hash(p.source)})", f"  sizes      {dims}"]
    for role, title in (("token", "tokens"), ("param", "params"), ("outer", "outers"), ("gate", "gates")):
        items = p.of_role(role)
        if items:
            lines.append(f"  {title:<10} " + "  ".join(t.describe().split(" ", 1)[1] for t in items))
    o = p.optim
    extra = "".join(f", {k}={v}" for k, v in (("decay", o.decay), ("scale", o.scale)) if v)
    extra += f", steps={o.ns_steps}" if o.kind == "muon" else ""
    extra += f", clip={format_num(o.clip)}" if o.clip is not None else ""
    lines.append(f"  optim      {o.kind}(lr={o.lr}{extra})")
    if p.retain:
        ret = []
        for r in p.retain:
            args = [f"{k}={v}" for k, v in r.values] + [f"{k}={format_num(v)}" for k, v in r.numbers]
            args += [f"grad_at={r.grad_at}"] if r.kind == "decay" else []
            ret.append(f"{r.kind}({', '.join(args)})")
        lines.append(f"  retain     {', '.join(ret)}")
    if p.axes is not None:
        keeps = f"time {' * '.join(p.axes.keep_time)}, variate {' * '.join(p.axes.keep_variate)}"
        lines.append(f"  axes       time, variate{' bidirectional' if p.axes.bidirectional else ''}; keep {keeps}")
    if p.window > 1:
        lines.append(f"  window     {p.window}" + (f" weight {p.window_weight}" if p.window_weight else ""))
    lines.append(f"  read       {p.read_order} write")
    s = p.schedule
    if s.is_tnt:
        locs = ", ".join(f"chunk {loc.chunk} reset {loc.reset}" for loc in s.locals)
        qk = "on" if s.qk_projection else "off"
        sched = f"tnt global chunk {s.global_chunk}; locals [{locs}]; qk_projection {qk}"
    elif p.axes is not None:
        sched = f"tile time {s.tile[0]} variate {s.tile[1]}"
    else:
        sched = f"chunk {s.chunk}"
    lines.append(f"  schedule   {sched}")
    if p.algorithm:
        lines.append(f"  algorithm  {p.algorithm}: {p.algorithm_reason}")
    lines.append(f"  passes     {' '.join(p.passes_run)}")
    return "\n".join(lines)


def forward_groups(p: Program) -> dict[str, dict[str, int]]:
    out = p.graph.outputs
    groups = {name: {name: out[name]} for name in ("loss", "read", "model") if name in out}
    hyper = {k: v for k, v in out.items() if k.startswith(("optim.", "retain"))}
    if hyper:
        groups["hyper"] = hyper
    return groups


def gradient_groups(p: Program) -> dict[str, dict[str, int]]:
    out = p.graph.outputs
    groups = {}
    grads = {k: v for k, v in out.items() if k.startswith("grad.")}
    if grads:
        groups["grad_loss"] = grads
    vjps = {k: v for k, v in out.items() if k.startswith("vjp.read.")}
    if vjps:
        groups["vjp_read"] = vjps
    return groups


def print_groups(p: Program, groups: dict[str, dict[str, int]]) -> str:
    return "\n\n".join(print_function(p.graph, outs, title) for title, outs in groups.items())


def describe_shape(shape) -> str:
    return fmt_shape(shape) if shape else "[]"
