"""IR → Python source on torch tensors: one function per group of graph outputs.

The emitted code is what runs (in-process it is compiled once per rule; `memdsl compile -o` writes
it into a standalone module), so it is plain, readable torch: one statement per IR node, shapes
in comments. Per-token values carry their IR shape as trailing axes and broadcast over any
leading axes (batch, head, chunk, position).

Safety: rule identifiers are validated (ASCII names, see the grammar) and mangled with a `v_`
prefix, numbers are printed from sympy values, and no text from the rule file reaches the code
except validated names inside string literals built with `repr`.
"""

from __future__ import annotations

import re

import sympy as sp

from memdsl.ir import Graph
from memdsl.ops import ELEMENTWISE, fmt_shape, sympy_form

from .sympy_print import TorchPrinter
from .torch_activations import PRELUDE as ACTIVATIONS_PRELUDE
from .torch_activations import fold_activations

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def mangle(name: str) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"not an identifier: {name!r}")
    return f"v_{name}"


def size_name(sym: sp.Symbol) -> str:
    return f"sz_{mangle(sym.name)[2:]}"


_VAR = re.compile(r"^(t[0-9]+|v_[A-Za-z_][A-Za-z0-9_]*|sz_[A-Za-z_][A-Za-z0-9_]*)(\[[.,a-zA-Z ]*\])?$")


class _Printer(TorchPrinter):
    """Torch printer whose symbols x0, x1, ... print as emitted variables (t3, v_W1[..., None], sz_d)."""

    def __init__(self, names: dict[str, str] | None = None):
        super().__init__()
        self.names = names or {}

    def _print_Symbol(self, expr):
        text = self.names.get(expr.name, expr.name)
        if not _VAR.match(text):
            raise ValueError(f"unexpected symbol {expr.name!r}")
        return text


def _size_expr(e: sp.Expr) -> str:
    """An integer size expression in Python, over the size variables."""
    e = sp.sympify(e)
    subs = {s: sp.Symbol(size_name(s)) for s in e.free_symbols}
    return str(e.subs(subs, simultaneous=True)).replace(" ", "")


def _lift(name: str, rank: int, to: int) -> str:
    return name if rank >= to else f"{name}[{'...,' + ', '.join(['None'] * (to - rank))}]"


def emit_function(graph: Graph, fname: str, outputs: list[str], doc: str = "") -> str:
    """Emit `def fname(env, sz) -> dict` computing the named outputs."""
    roots = [graph.outputs[o] for o in outputs]
    order = graph.topo(roots)
    names: dict[int, str] = {}
    lines = [f"def {fname}(env, sz):"]
    if doc:
        lines.append(f'    """{doc}"""')
    sizes = sorted({s for nid in order for s in _node_symbols(graph, nid)}, key=lambda s: s.name)
    for s in sizes:
        lines.append(f"    {size_name(s)} = sz[{s.name!r}]")
    printer = _Printer()
    counter = 0
    used_inputs = [graph.node(n).attr("name") for n in order
                   if graph.node(n).op == "input" and graph.node(n).attr("role") != "size"]
    if any(graph.node(n).op == "broadcast" for n in order):
        like = next((n for n in ("k", "q", "v") if n in used_inputs), used_inputs[0] if used_inputs else None)
        # a constant broadcast with no input of its own (`lr = 0 * g`) takes dtype and device from any tensor
        lines.append(f"    _like = env[{like!r}]" if like else
                     "    _like = next(t for t in env.values() if isinstance(t, torch.Tensor))")
    for nid in order:
        node = graph.node(nid)
        shape = fmt_shape(node.shape) if node.shape else "[]"
        if node.op == "input":
            name = node.attr("name")
            if node.attr("role") == "size":
                names[nid] = size_name(sp.Symbol(name))
                continue
            names[nid] = mangle(name)
            lines.append(f"    {names[nid]} = env[{name!r}]  # {shape}")
            continue
        if node.op == "const":
            value = sp.sympify(node.attr("value"))
            names[nid] = f"({printer.doprint(value.subs({s: sp.Symbol(size_name(s)) for s in value.free_symbols}))})"
            continue
        var = f"t{counter}"
        counter += 1
        ops = graph.operands(nid)
        args = [names[o] for o in ops]
        ranks = [len(graph.node(o).shape) for o in ops]
        rank = len(node.shape)
        if node.op in ELEMENTWISE:
            syms = [sp.Symbol(f"x{i}", real=True) for i in range(len(ops))]
            expr = sympy_form(node.op, syms, dict(node.attrs))
            expr = expr.subs({s: sp.Symbol(size_name(s)) for s in expr.free_symbols if s not in syms})
            expr = fold_activations(expr)
            lifted = {f"x{i}": _lift(a, r, rank) for i, (a, r) in enumerate(zip(args, ranks, strict=True))}
            rhs = _Printer(lifted).doprint(expr)
        else:
            rhs = _structural(node, args, ranks)
        lines.append(f"    {var} = {rhs}  # {shape}")
        names[nid] = var
    body = ", ".join(f"{o!r}: {names[graph.outputs[o]]}" for o in outputs)
    lines.append(f"    return {{{body}}}")
    return "\n".join(lines) + "\n"


def _node_symbols(graph: Graph, nid: int) -> set[sp.Symbol]:
    node = graph.node(nid)
    out = set()
    for s in node.shape:
        out |= sp.sympify(s).free_symbols
    for _, v in node.attrs:
        if isinstance(v, sp.Basic):
            out |= {s for s in v.free_symbols if not re.match(r"^x[0-9]+$", s.name)}
        elif isinstance(v, tuple):
            for x in v:
                out |= sp.sympify(x).free_symbols
    if node.op == "input" and node.attr("role") == "size":
        out.add(sp.Symbol(node.attr("name")))
    return {sp.Symbol(s.name) for s in out}


def _structural(node, args: list[str], ranks: list[int]) -> str:
    op = node.op
    if op == "sum":
        return f"{args[0]}.sum(dim={tuple(range(-ranks[0], 0))})" if ranks[0] else args[0]
    if op == "norm":
        return f"torch.linalg.vector_norm({args[0]}, dim=-1)"
    if op == "matvec":
        return f"_mv({args[0]}, {args[1]})"
    if op == "matvec_t":
        return f"_mv_t({args[0]}, {args[1]})"
    if op == "outer":
        return f"{args[0]}.unsqueeze(-1) * {args[1]}.unsqueeze(-2)"
    if op == "broadcast":
        dims = ", ".join(_size_expr(s) for s in node.shape)
        extra = ", ".join(["None"] * len(node.shape))
        return f"_like.new_tensor({args[0]})[..., {extra}].expand(*_like.new_tensor({args[0]}).shape, {dims})"
    if op == "concat":
        joined = ", ".join(args)
        return f"_cat_last([{joined}])"
    if op == "slice":
        return f"{args[0]}[..., {_size_expr(node.attr('start'))}:{_size_expr(node.attr('stop'))}]"
    if op == "kron":
        return f"(({args[0]}).unsqueeze(-1) * ({args[1]}).unsqueeze(-2)).flatten(-2)"
    if op == "unflatten":
        return f"{args[0]}.unflatten(-1, ({_size_expr(node.attr('rows'))}, {_size_expr(node.attr('cols'))}))"
    if op == "flatten":
        return f"{args[0]}.flatten(-2)"
    raise ValueError(f"op {op} is missing from the torch lowering (every op in memdsl/ops.py must be here)")


PRELUDE = '''
def _mv(w, x):
    """W @ x per token. W is a tensor [..., m, n] or a chunk-affine DualWeight (the dual form)."""
    if not isinstance(w, torch.Tensor):
        return w.matvec(x)
    if w.dim() == x.dim() + 1 and x.dim() >= 2 and w.shape[-3] == 1 and x.shape[-2] != 1:
        return x @ w.squeeze(-3).mT  # one W for a whole chunk of tokens: a single matmul
    return torch.einsum("...mn,...n->...m", w, x)


def _mv_t(w, g):
    """W^T @ g per token."""
    if w.dim() == g.dim() + 1 and g.dim() >= 2 and w.shape[-3] == 1 and g.shape[-2] != 1:
        return g @ w.squeeze(-3)
    return torch.einsum("...mn,...m->...n", w, g)


def _cat_last(parts):
    """Concatenate per-token vectors whose leading (batch) axes broadcast."""
    parts = [torch.as_tensor(p) for p in parts]
    lead = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*lead, p.shape[-1]) for p in parts], dim=-1)
''' + ACTIVATIONS_PRELUDE
