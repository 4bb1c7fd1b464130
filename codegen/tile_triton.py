"""Tile IR → Triton statements, one assignment per node.

`tl.dot` needs every dimension ≥ 16; a product with a thinner operand (a [1, n] row, a [C, 1]
column) is printed as a broadcast multiply and a sum instead. Transposes of a row or a column
are reshapes. Elementwise nodes are printed from sympy by the Triton printer, so a `Piecewise`
derivative becomes nested `tl.where`.
"""

from __future__ import annotations

from .sympy_print import TritonPrinter
from .tile_ir import TileGraph


class _Named(TritonPrinter):
    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names

    def _print_Symbol(self, expr):
        return self.names[int(expr.name[1:])]


def print_tiles(graph: TileGraph, bound: dict[str, str], nodes: list[int], names: dict[int, str],
                prefix: str = "t") -> list[str]:
    """Statements computing `nodes` (program order); inputs by their bound variable names.
    `names` maps node ids to variable names and is extended in place."""
    lines = []
    for i in nodes:
        if i in names:
            continue
        t = graph.nodes[i]
        a = [names[j] for j in t.args]
        if t.op == "input":
            names[i] = bound[t.attrs[0]]
            continue
        if t.op == "const":
            names[i] = f"tl.full([1, 1], {t.attrs[0]!r}, tl.float32)"
            continue
        m, n = t.shape
        if t.op == "ew":
            rhs = _Named(a).doprint(t.attrs[0])
        elif t.op == "dot":
            (_, k) = graph.shape(t.args[0])
            if min(m, k, n) >= 16:
                rhs = f"tl.dot({a[0]}, {a[1]}, input_precision=PRECISION)"
            else:
                rhs = f"tl.sum({a[0]}[:, :, None] * {a[1]}[None, :, :], axis=1)"
        elif t.op == "trans":
            rhs = f"tl.reshape({a[0]}, [{m}, {n}])" if 1 in (m, n) else f"tl.trans({a[0]})"
        elif t.op == "sum":
            rhs = f"tl.sum({a[0]}, axis={t.attrs[0]}, keep_dims=True)"
        elif t.op == "cumsum":
            axis, reverse = t.attrs
            rhs = f"tl.cumsum({a[0]}, axis={axis}, reverse={reverse})"
        elif t.op == "where":
            rhs = f"tl.where({a[0]}, {a[1]}, {a[2]})"
        elif t.op == "expand":
            rhs = f"tl.broadcast_to({a[0]}, [{m}, {n}])"
        elif t.op == "kron":
            (r, n1), (_, n2) = graph.shape(t.args[0]), graph.shape(t.args[1])
            rhs = f"tl.reshape({a[0]}[:, :, None] * {a[1]}[:, None, :], [{m}, {n1 * n2}])"
        elif t.op == "kron_da":
            width = graph.shape(t.args[1])[1]
            rhs = f"tl.sum(tl.reshape({a[0]}, [{m}, {n}, {width}]) * {a[1]}[:, None, :], axis=2)"
        elif t.op == "kron_db":
            width = graph.shape(t.args[1])[1]
            rhs = f"tl.sum(tl.reshape({a[0]}, [{m}, {width}, {n}]) * {a[1]}[:, :, None], axis=1)"
        elif t.op == "bmm":
            mm, k, nn, ta, tb = t.attrs
            a3 = _batched(a[0], graph.shape(t.args[0])[0], m, (k, mm) if ta else (mm, k), ta)
            b3 = _batched(a[1], graph.shape(t.args[1])[0], m, (nn, k) if tb else (k, nn), tb)
            prod = f"tl.dot({a3}, {b3}, input_precision=PRECISION)" if min(mm, k, nn) >= 16 else \
                f"tl.sum({a3}[:, :, :, None] * {b3}[:, None, :, :], axis=2)"
            rhs = f"tl.reshape({prod}, [{m}, {n}])"
        elif t.op == "permute":
            dims, perm = t.attrs
            rhs = f"tl.reshape(tl.permute(tl.reshape({a[0]}, {list(dims)}), {tuple(perm)}), [{m}, {n}])"
        elif t.op == "reshape":
            rhs = f"tl.reshape({a[0]}, [{m}, {n}])"
        elif t.op == "gmax":
            group = t.attrs[0]
            rhs = f"tl.max({a[0]}, axis=1, keep_dims=True)" if n == 1 else \
                f"tl.max(tl.reshape({a[0]}, [{m}, {n}, {group}]), axis=2)"
        elif t.op == "place_cols":
            # tl.gather takes an index of the output's shape (it does not broadcast one), clamped to 0 outside
            # the block; the mask then zeros those columns
            off, nb, src = t.attrs
            j, inside = f"{prefix}{i}_j", f"{prefix}{i}_in"
            lines += [f"{j} = tl.broadcast_to(tl.arange(0, {n})[None, :], [{m}, {n}])",
                      f"{inside} = ({j} >= {off}) & ({j} < {off + nb})"]
            index = f"{j} - {off - src}" if off >= src else f"{j} + {src - off}"
            rhs = f"tl.where({inside}, tl.gather({a[0]}, tl.where({inside}, {index}, 0), axis=1), 0.0)"
        elif t.op == "trinv":
            # forward substitution, one row per step: X_r = e_r - sum_{j<r} L_rj X_j (rows j < r are final)
            x, r = f"{prefix}{i}", f"{prefix}{i}_r"
            lines += [f"{x}_L = tl.where({a[1]}, {a[0]}, 0.0)",
                      f"{x}_id = tl.arange(0, {m})",
                      f"{x} = tl.where({x}_id[:, None] == {x}_id[None, :], 1.0, 0.0)",
                      f"for {r} in range(1, {m}):",
                      f"    {x}_row = tl.sum(tl.where({x}_id[:, None] == {r}, {x}_L, 0.0), axis=0)",
                      f"    {x}_sub = tl.sum({x}_row[:, None] * {x}, axis=0)",
                      f"    {x} = tl.where({x}_id[:, None] == {r}, {x} - {x}_sub[None, :], {x})"]
            names[i] = x
            continue
        else:
            raise ValueError(f"unknown tile op {t.op}")
        names[i] = f"{prefix}{i}"
        # an elementwise result of broadcast-free scalars must still have its tile shape
        if t.op == "ew" and all(graph.shape(j) != t.shape for j in t.args):
            rhs = f"tl.broadcast_to({rhs}, [{m}, {n}])"
        lines.append(f"{names[i]} = {rhs}")
    return lines


def printed_numel(graph: TileGraph, i: int) -> int:
    """The largest tensor the printed statement of node i holds: its tile, or the 3-D broadcast product a
    thin `dot` or `bmm` is printed as (Triton refuses a tensor past 2^20 elements)."""
    t = graph.nodes[i]
    size = t.shape[0] * t.shape[1]
    if t.op == "dot":
        (m, k), (_, n) = graph.shape(t.args[0]), graph.shape(t.args[1])
        if min(m, k, n) < 16:
            size = max(size, m * k * n)
    elif t.op == "bmm":
        mm, k, nn = t.attrs[:3]
        if min(mm, k, nn) < 16:
            size = max(size, t.shape[0] * mm * k * nn)
    return size


def _batched(x: str, rows: int, out_rows: int, shape: tuple[int, int], transposed: bool) -> str:
    """A [rows, p*q] tile as [out_rows, p, q] matrices (broadcast over rows), transposed to [.., q, p]."""
    if rows != out_rows:
        x = f"tl.broadcast_to({x}, [{out_rows}, {shape[0] * shape[1]}])"
    x = f"tl.reshape({x}, [{out_rows}, {shape[0]}, {shape[1]}])"
    return f"tl.permute({x}, (0, 2, 1))" if transposed else x


def mask_code(name: str, definition: tuple) -> str:
    """The statement defining a mask input (see TileGraph.mask)."""
    kind, *args = definition
    if kind == "cols":
        n, width = args
        return f"{name} = (tl.arange(0, {width}) < {n})[None, :]"
    if kind == "band":
        c, C = args
        return (f"{name} = (tl.arange(0, {C})[None, :] <= tl.arange(0, {C})[:, None]) & "
                f"(tl.arange(0, {C})[None, :] > tl.arange(0, {C})[:, None] - {c})")
    if kind == "ltri":
        (C,) = args
        return f"{name} = (tl.arange(0, {C * C}) // {C} >= tl.arange(0, {C * C}) % {C})[None, :]"
    if kind == "hband":
        c, C, hh = args
        return f"{name} = tl.arange(0, {hh})[None, :] > tl.arange(0, {C})[:, None] + {hh - c}"
    off, n, p_in, p_out = args
    return (f"{name} = (tl.arange(0, {p_out})[None, :] == tl.arange(0, {p_in})[:, None] + {off}) & "
            f"(tl.arange(0, {p_in})[:, None] < {n})")
