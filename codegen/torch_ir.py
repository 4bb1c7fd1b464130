"""Evaluate IR functions on torch tensors, batched over any leading axes.

Per-token values carry their IR shape as trailing axes: a scalar is `[*batch]`, a vector
`[*batch, n]`, a matrix `[*batch, m, n]`. Leading axes broadcast like torch does, so a caller can
pair one state `[B, H, 1, m, n]` with a chunk of tokens `[B, H, C, n]`. Every backend that runs IR
on a CPU (the reference loop, the chunkwise program, the checks) goes through `evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy as sp
import torch

from memdsl.ir import Graph
from memdsl.ops import ELEMENTWISE, sympy_form

from .sympy_print import torch_lambda


def concrete_sizes(dims: Mapping[str, sp.Expr | None], given: Mapping[str, int]) -> dict[sp.Symbol, int]:
    """Values for every size symbol: free sizes from `given`, derived sizes computed."""
    values: dict[sp.Symbol, int] = {}
    for name, expr in dims.items():
        if expr is None:
            if name not in given:
                raise ValueError(f"size `{name}` needs a value (pass {name}=...)")
            values[sp.Symbol(name, positive=True, integer=True)] = int(given[name])
    return values


def size(expr: sp.Expr, sizes: Mapping[sp.Symbol, int]) -> int:
    return int(sp.sympify(expr).subs(sizes))


def _lift(t, rank: int, to: int):
    """Append singleton axes so a rank-`rank` per-token value broadcasts against rank `to`."""
    if not isinstance(t, torch.Tensor) or rank == to:
        return t
    return t.reshape(*t.shape, *([1] * (to - rank)))


def _lead(t: torch.Tensor, rank: int) -> tuple[int, ...]:
    return tuple(t.shape[: t.dim() - rank])


def evaluate(graph: Graph, outputs: list[str] | tuple[str, ...], env: Mapping[str, torch.Tensor],
             sizes: Mapping[sp.Symbol, int]) -> dict[str, torch.Tensor]:
    """Compute the named graph outputs from input tensors `env` (by input name)."""
    roots = [graph.outputs[o] for o in outputs]
    vals: dict[int, object] = {}
    for nid in graph.topo(roots):
        node = graph.node(nid)
        ops = [vals[o] for o in graph.operands(nid)]
        rank = len(node.shape)
        if node.op == "input":
            name = node.attr("name")
            if node.attr("role") == "size":
                vals[nid] = float(sizes[sp.Symbol(name, positive=True, integer=True)])
            else:
                vals[nid] = env[name]
            continue
        if node.op == "const":
            vals[nid] = float(sp.sympify(node.attr("value")).subs(sizes))
            continue
        if node.op in ELEMENTWISE:
            ranks = [len(graph.node(o).shape) for o in graph.operands(nid)]
            args = [_lift(v, r, rank) for v, r in zip(ops, ranks, strict=True)]
            syms = [sp.Symbol(f"x{i}", real=True) for i in range(len(args))]
            expr = sympy_form(node.op, syms, dict(node.attrs)).subs(sizes)
            out = torch_lambda(expr, len(args))(*args)
            vals[nid] = out if isinstance(out, torch.Tensor) else torch.tensor(out, dtype=torch.get_default_dtype())
            continue
        vals[nid] = _structural(graph, nid, node, ops, sizes)
    return {o: vals[graph.outputs[o]] for o in outputs}


def _structural(graph: Graph, nid: int, node, ops, sizes):
    op = node.op
    if op == "sum":
        (x,) = ops
        r = len(graph.node(graph.operands(nid)[0]).shape)
        return x.sum(dim=tuple(range(-r, 0))) if r else x
    if op == "norm":
        return torch.linalg.vector_norm(ops[0], dim=-1)
    if op == "matvec":
        return torch.einsum("...mn,...n->...m", *ops)
    if op == "matvec_t":
        return torch.einsum("...mn,...m->...n", *ops)
    if op == "outer":
        a, b = ops
        return a.unsqueeze(-1) * b.unsqueeze(-2)
    if op == "broadcast":
        (x,) = ops
        shape = tuple(size(s, sizes) for s in node.shape)
        x = x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.get_default_dtype())
        return x.reshape(*x.shape, *([1] * len(shape))).expand(*x.shape, *shape)
    if op == "concat":
        lead = torch.broadcast_shapes(*(_lead(t, 1) for t in ops))
        return torch.cat([t.expand(*lead, t.shape[-1]) for t in ops], dim=-1)
    if op == "slice":
        return ops[0][..., size(node.attr("start"), sizes): size(node.attr("stop"), sizes)]
    if op == "kron":
        a, b = ops
        return (a.unsqueeze(-1) * b.unsqueeze(-2)).flatten(-2)
    if op == "unflatten":
        return ops[0].unflatten(-1, (size(node.attr("rows"), sizes), size(node.attr("cols"), sizes)))
    if op == "flatten":
        return ops[0].flatten(-2)
    raise ValueError(f"op {op} is missing from the torch lowering (every op in memdsl/ops.py must be here)")
