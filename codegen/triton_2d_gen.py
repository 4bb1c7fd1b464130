"""2-D tile graph → Triton kernels (forward and backward) for the 2-D rules (hydra, chimera, mamba2d).

`tile2d_tiles.build_tile2d_graph` gives one tile's graph; the forward kernel prints it inside a loop
over the time tiles of one (batch, head) program, carrying the left column; the backward kernel is
`tile_grad.backward` of the same graph, printed by the same printer (`tile_triton.print_tiles`), walking
the tiles in reverse from the saved left columns and carrying the left column's cotangent.

Layouts (the launcher, triton_2d.py, prepares them; every tensor fp32 contiguous):
    TQ, TK, TV, Y and their gradients   [B, H, T, V, d]      G_<gate>, KT, KV, LR and gradients  [B, H, T, V]
    PL_<p> (left column in), C_<p> (out), DL_<p>, DC_<p>   [B, H, V, *shape]
    PT_<p> (the initial memory), DT_<p>   [B, H, *shape]      O_<o> [H, *shape], DO_<o> [B, H, *shape]
    SAVE_<p>   [B, H, NT, V, *shape]: the left column at the start of every time tile
"""

from __future__ import annotations

import re
from pathlib import Path

from memdsl.program import Program

from .chunk_tiles import Unsupported, pad, tile_shape_of
from .state_tiles import MAX_NUMEL
from .tile2d_tiles import build_tile2d_graph
from .tile_grad import backward
from .tile_ir import TileGraph
from .tile_triton import mask_code, print_tiles, printed_numel

TOKENS = ("q", "k", "v")
CELL = ("kt", "kv", "lr")


def _helpers() -> str:
    """The @triton.jit helpers the printer may call (_sign, _tanh), taken from the 1-D template."""
    text = (Path(__file__).resolve().parent / "templates" / "chunk_fwd.py.tmpl").read_text()
    start = text.index("@triton.jit\ndef _sign")
    return text[start:text.index("@triton.jit\ndef memdsl_chunk_fwd")]


def _ident(name: str) -> str:
    if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
        raise ValueError(f"not an identifier: {name!r}")
    return name


class _Layout2D:
    def __init__(self, p: Program, spec: dict, shapes: dict[str, list[int]], Tp: int, Vp: int):
        self.shapes, self.Tp, self.Vp = shapes, Tp, Vp
        self.params = [_ident(t.name) for t in p.params]
        self.gates = [_ident(g) for g in spec["gates"]]
        self.outers = [_ident(o) for o in spec["outers"]]

    def logical(self, name: str) -> tuple[int, int]:
        s = self.shapes[name]
        return (s[0], s[1]) if len(s) == 2 else (1, s[0])

    def numel(self, name: str) -> int:
        m, n = self.logical(name)
        return m * n

    def state_cols(self, name: str) -> list[str]:
        """`off_<p>`, `cm_<p>`: a flattened padded state column's offset in the logical state and its mask."""
        (m, n), (mp, np_) = self.logical(name), tile_shape_of(self.shapes[name])
        c = f"tl.arange(0, {mp * np_})"
        return [f"off_{name} = ({c} // {np_}) * {n} + {c} % {np_}",
                f"cm_{name} = (({c} // {np_}) < {m}) & (({c} % {np_}) < {n})"]

    def column(self, ptr: str, name: str, rows: str) -> tuple[str, str]:
        """The address and mask of a [Vp, F] block of per-variate states (this chunk's variates `ug`, valid
        `lv`), `rows` the flattened row index."""
        addr = f"{ptr} + ({rows})[:, None] * {self.numel(name)} + off_{name}[None, :]"
        return addr, f"lv[:, None] & cm_{name}[None, :]"

    def scratch(self, ptr: str, name: str, block: str) -> str:
        """A padded [Tp, F] row block `block` of a scratch buffer (rows between variate chunks)."""
        mp, np_ = tile_shape_of(self.shapes[name])
        return f"{ptr} + (({block}) * {self.Tp} + ttp[:, None]) * {mp * np_} + tl.arange(0, {mp * np_})[None, :]"

    def outer(self, ptr: str, name: str, base: str) -> tuple[str, str]:
        (m, n), (mp, np_) = self.logical(name), tile_shape_of(self.shapes[name])
        addr = f"{ptr} + {base} * {m * n} + tl.arange(0, {mp})[:, None] * {n} + tl.arange(0, {np_})[None, :]"
        return addr, f"(tl.arange(0, {mp}) < {m})[:, None] & (tl.arange(0, {np_}) < {n})[None, :]"

    def token(self, ptr: str, name: str) -> tuple[str, str]:
        d = self.shapes[name][0]
        cols = f"tl.arange(0, {pad(d)})"
        return f"{ptr} + cell[:, None] * {d} + {cols}[None, :]", f"valid & ({cols} < {d})[None, :]"


MASK_CODE = [
    "t0 = i * TC",
    "rows_t = t0 + tt",
    "valid = ((tt < TC) & (rows_t < T) & (vv < VC) & (vg < NV))[:, None]",
    "first_v = (vv == 0)[:, None]",
    "strict = rr[:, None] > rr[None, :]",
    "shift_t = (rr[None, :] == rr[:, None] - 1) & (tt[:, None] > 0)",
    "shift_v = rr[None, :] == rr[:, None] - {Tp}",
    "enter = (tt[:, None] == 0) & (vv[:, None] == uu[None, :])",
    "last = tl.minimum(T - t0, TC) - 1",
    "carry = (vv[None, :] == uu[:, None]) & (tt[None, :] == last)",
    "enter_top = (vv[:, None] == 0) & (tt[:, None] == ttp[None, :])",
    "bottom = (tt[None, :] == ttp[:, None]) & (vv[None, :] == last_v)",
    "cell = (base * T + rows_t) * NV + vg",
]

CHUNK_CODE = [  # per variate chunk j: its first variate, every cell's and left row's variate, the valid left rows
    "v0 = j * VC",
    "vg = v0 + vv",
    "ug = v0 + uu",
    "lv = (uu < VC) & (ug < NV)",
    "last_v = tl.minimum(NV - v0, VC) - 1",
    "jt = tl.zeros([1, 1], dtype=tl.int32) + j  # the chunk index as a tensor, for masks and selects",
]

HEAD = """
@triton.jit
def memdsl_tile2d_{direction}(
    {signature}
    T, NV, H, NT, NVC,
    TC: tl.constexpr,
    VC: tl.constexpr,
{extra}):
    pid = tl.program_id(0)
    base = pid.to(tl.int64)  # = b * H + h
    rr = tl.arange(0, {n})
    tt = rr % {Tp}
    vv = rr // {Tp}
    uu = tl.arange(0, {Vp})
    ttp = tl.arange(0, {Tp})
"""


def _indent(lines: list[str], k: int) -> str:
    return "\n".join(" " * k + line for line in lines)


def _check(graph: TileGraph, nodes: list[int]) -> None:
    for i in nodes:
        if printed_numel(graph, i) > MAX_NUMEL:
            raise Unsupported(f"a printed tensor of the 2-D tile holds {printed_numel(graph, i)} elements, past "
                              f"Triton's {MAX_NUMEL}: use a smaller tile")


def _loads(lay: _Layout2D, graph: TileGraph) -> list[str]:
    lines = []
    for x in TOKENS:
        addr, mask = lay.token(f"T{x.upper()}", x)
        lines.append(f"tok_{x} = tl.load({addr}, mask={mask}, other=0.0)")
    for g in lay.gates:
        lines.append(f"tok_{g} = tl.load(G_{g} + cell[:, None], mask=valid, other=0.0)")
    for c in CELL:
        lines.append(f"{c} = tl.load({c.upper()} + cell[:, None], mask=valid, other=0.0)")
    return lines


def _common(lay: _Layout2D, graph: TileGraph) -> list[str]:
    lines = [line for q in lay.params for line in lay.state_cols(q)]
    lines += [mask_code(name, definition) for name, definition in graph.mask_defs.items()]
    for q in lay.params:
        lines.append(f"top0_{q} = tl.load(PT_{q} + base * {lay.numel(q)} + off_{q}[None, :], mask=cm_{q}[None, :], "
                     "other=0.0)")
    for o in lay.outers:
        addr, mask = lay.outer(f"O_{o}", o, "(base % H)")
        lines.append(f"out_{o} = tl.load({addr}, mask={mask}, other=0.0)")
    return lines


def _header(p: Program, sizes: dict, tile: tuple[int, int], direction: str, precision: str) -> str:
    return (f"# generated by memdsl for the 2-D rule `{p.name}`: {direction}; sizes {sizes}, tile {tile}\n"
            "import triton\nimport triton.language as tl\n\n"
            f"PRECISION = tl.constexpr({precision!r})\n\n\n" + _helpers())


def _signature(lay: _Layout2D) -> list[str]:
    sig = ["TQ, TK, TV,"] + [f"G_{g}," for g in lay.gates] + ["KT, KV, LR,"] + [f"O_{o}," for o in lay.outers]
    sig += [f"PL_{q}, PT_{q}," for q in lay.params]
    return sig


def _top(lay: _Layout2D, rows: bool) -> list[str]:
    """The row above the tile: the initial memory, or (several chunks) the stored last row of the tile above."""
    if not rows:
        return [f"T_{q} = top0_{q}" for q in lay.params]
    return [f"T_{q} = tl.load({lay.scratch(f'ROW_{q}', q, '(base * NVC + j) * NT + i')}, "
            f"mask=(ttp[:, None] >= 0) & (jt > 0), other=0.0) + tl.where(jt == 0, top0_{q}, 0.0)"
            for q in lay.params]


def generate_forward_2d(p: Program, spec: dict, shapes: dict, sizes: dict, tile: tuple[int, int],
                        rows: bool = False, precision: str = "ieee") -> str:
    """The forward kernel: one program per (batch, head) walks the variate chunks and each one's NT time
    tiles, storing y, the final left column C_<p> and (SAVE) every tile's starting left column. `tile` =
    (Tp, Vp), powers of two. `rows`: several variate chunks (each tile's last variate row is stored in
    ROW_<p> [B, H, NVC, NT, Tp, F] for the tile below it, and read back by the backward)."""
    Tp, Vp = tile
    lay = _Layout2D(p, spec, shapes, Tp, Vp)
    graph = build_tile2d_graph(p, spec, shapes, sizes, Tp, Vp, rows)
    roots = [graph.outputs["y"]] + [graph.outputs[f"C_{q}"] for q in lay.params]
    roots += [graph.outputs[f"R_{q}"] for q in lay.params] if rows else []
    live = graph.live(roots)
    _check(graph, live)
    names: dict[int, str] = {}
    body = print_tiles(graph, {n: n for n in graph.inputs}, live, names)
    sig = _signature(lay) + ["Y,"] + [f"C_{q}, SAVE_{q}," for q in lay.params]
    sig += [f"ROW_{q}," for q in lay.params] if rows else []
    lines = _common(lay, graph) + ["for j in range(0, NVC):"]
    chunk = list(CHUNK_CODE)
    for q in lay.params:
        addr, mask = lay.column(f"PL_{q}", q, "base * NV + ug")
        chunk.append(f"L_{q} = tl.load({addr}, mask={mask}, other=0.0)")
    chunk.append("for i in range(0, NT):")
    loop = [line.format(Tp=Tp) for line in MASK_CODE]
    loop.append("if SAVE:  # the tile's starting left column, read back by the backward kernel")
    for q in lay.params:
        addr, mask = lay.column(f"SAVE_{q}", q, "(base * NT + i) * NV + ug")
        loop.append(f"    tl.store({addr}, L_{q}, mask={mask})")
    loop += _top(lay, rows) + _loads(lay, graph) + body
    addr, mask = lay.token("Y", "v")
    loop.append(f"tl.store({addr}, {names[graph.outputs['y']]}, mask={mask})")
    loop += [f"L_{q} = {names[graph.outputs[f'C_{q}']]}" for q in lay.params]
    for q in lay.params if rows else []:  # the row above tile (i, j + 1); the barrier: visible to the whole block
        loop.append(f"tl.store({lay.scratch(f'ROW_{q}', q, '(base * NVC + j + 1) * NT + i')}, "
                    f"{names[graph.outputs[f'R_{q}']]}, mask=(ttp[:, None] >= 0) & (jt + 1 < NVC))")
    loop += ["tl.debug_barrier()"] if rows else []
    chunk += ["    " + line for line in loop]
    for q in lay.params:
        addr, mask = lay.column(f"C_{q}", q, "base * NV + ug")
        chunk.append(f"tl.store({addr}, L_{q}, mask={mask})")
    lines += ["    " + line for line in chunk]
    head = HEAD.format(direction="fwd", signature="\n    ".join(sig), extra="    SAVE: tl.constexpr,\n", Tp=Tp,
                       n=Tp * Vp, Vp=Vp)
    return _header(p, sizes, tile, "forward", precision) + head + _indent(lines, 4) + "\n"


def generate_backward_2d(p: Program, spec: dict, shapes: dict, sizes: dict, tile: tuple[int, int],
                         rows: bool = False, precision: str = "ieee") -> str:
    """The backward kernel: reverse mode over the tile graph, tiles in reverse from the saved left columns
    (and rows above). Stores every cell's gradients (tokens, gates, kt, kv, lr), the initial left column's
    (DL_<p>), the initial memory's and the outer constants' (DT_<p>, DO_<o>, per (batch, head)). With
    several chunks the cotangent of a tile's row above goes to the tile above it through DROW_<p>
    [B, H, NT, Tp, F]."""
    Tp, Vp = tile
    lay = _Layout2D(p, spec, shapes, Tp, Vp)
    graph = build_tile2d_graph(p, spec, shapes, sizes, Tp, Vp, rows)
    outs = ["y"] + [f"C_{q}" for q in lay.params] + ([f"R_{q}" for q in lay.params] if rows else [])
    seeds = [(graph.outputs[o], graph.input("dy" if o == "y" else f"d{o}", graph.shape(graph.outputs[o])))
             for o in outs]
    wrt = [f"tok_{x}" for x in (*TOKENS, *lay.gates)] + list(CELL) + [f"L_{q}" for q in lay.params] + \
        [f"T_{q}" for q in lay.params] + [f"out_{o}" for o in lay.outers]
    adj = backward(graph, seeds, [graph.inputs[w] for w in wrt])
    grad = {w: adj[graph.inputs[w]] for w in wrt}
    live = graph.live(list(grad.values()))
    _check(graph, live)
    names: dict[int, str] = {}
    body = print_tiles(graph, {n: n for n in graph.inputs}, live, names)
    sig = _signature(lay) + [f"SAVE_{q}," for q in lay.params] + ([f"ROW_{q}," for q in lay.params] if rows else [])
    sig += ["DY,"] + [f"DC_{q}," for q in lay.params]
    sig += ["DQ, DK, DV,"] + [f"DG_{g}," for g in lay.gates] + ["DKT, DKV, DLR,"]
    sig += [f"DL_{q}, DT_{q}," for q in lay.params] + [f"DO_{o}," for o in lay.outers]
    sig += [f"DROW_{q}," for q in lay.params] if rows else []
    lines = _common(lay, graph)
    for q in lay.params:
        lines.append(f"acc_T_{q} = tl.zeros([1, {graph.shape(graph.inputs[f'T_{q}'])[1]}], dtype=tl.float32)")
    for o in lay.outers:
        lines.append(f"acc_{o} = tl.zeros({list(tile_shape_of(shapes[o]))}, dtype=tl.float32)")
    lines += ["for jr in range(0, NVC):"]
    chunk = ["j = NVC - 1 - jr"] + list(CHUNK_CODE)
    for q in lay.params:
        addr, mask = lay.column(f"DC_{q}", q, "base * NV + ug")
        chunk.append(f"dC_{q} = tl.load({addr}, mask={mask}, other=0.0)")
    chunk += ["for ir in range(0, NT):", "    i = NT - 1 - ir"]
    loop = [line.format(Tp=Tp) for line in MASK_CODE]
    for q in lay.params:
        addr, mask = lay.column(f"SAVE_{q}", q, "(base * NT + i) * NV + ug")
        loop.append(f"L_{q} = tl.load({addr}, mask={mask}, other=0.0)")
    loop += _top(lay, rows)
    for q in lay.params if rows else []:  # the cotangent of this tile's last row, left by the tile below it
        loop.append(f"dR_{q} = tl.load({lay.scratch(f'DROW_{q}', q, 'base * NT + i')}, "
                    "mask=(ttp[:, None] >= 0) & (jt + 1 < NVC), other=0.0)")
    loop += _loads(lay, graph)
    addr, mask = lay.token("DY", "v")
    loop.append(f"dy = tl.load({addr}, mask={mask}, other=0.0)")
    loop += body
    for x in TOKENS:
        addr, mask = lay.token(f"D{x.upper()}", x)
        loop.append(f"tl.store({addr}, {names[grad[f'tok_{x}']]}, mask={mask})")
    for ptr, key in [(f"DG_{g}", f"tok_{g}") for g in lay.gates] + [(f"D{c.upper()}", c) for c in CELL]:
        # an adjoint may come out broadcast: store the [n, 1] column
        loop.append(f"tl.store({ptr} + cell[:, None], tl.sum({names[grad[key]]}, axis=1, keep_dims=True), "
                    "mask=valid)")
    if rows:  # the first chunk's row above is the initial memory; the others' go to the tile above
        loop += [f"acc_T_{q} += tl.where(jt == 0, tl.sum({names[grad[f'T_{q}']]}, axis=0, keep_dims=True), 0.0)"
                 for q in lay.params]
        loop.append("tl.debug_barrier()")
        loop += [f"tl.store({lay.scratch(f'DROW_{q}', q, 'base * NT + i')}, {names[grad[f'T_{q}']]}, "
                 "mask=(ttp[:, None] >= 0) & (jt > 0))" for q in lay.params]
        loop.append("tl.debug_barrier()")
    else:
        loop += [f"acc_T_{q} += {names[grad[f'T_{q}']]}" for q in lay.params]
    loop += [f"acc_{o} += {names[grad[f'out_{o}']]}" for o in lay.outers]
    loop += [f"dC_{q} = {names[grad[f'L_{q}']]}" for q in lay.params]
    chunk += ["    " + line for line in loop]
    for q in lay.params:
        addr, mask = lay.column(f"DL_{q}", q, "base * NV + ug")
        chunk.append(f"tl.store({addr}, dC_{q}, mask={mask})")
    lines += ["    " + line for line in chunk]
    for q in lay.params:
        lines.append(f"tl.store(DT_{q} + base * {lay.numel(q)} + off_{q}[None, :], acc_T_{q}, mask=cm_{q}[None, :])")
    for o in lay.outers:
        addr, mask = lay.outer(f"DO_{o}", o, "base")
        lines.append(f"tl.store({addr}, acc_{o}, mask={mask})")
    head = HEAD.format(direction="bwd", signature="\n    ".join(sig), extra="", Tp=Tp, n=Tp * Vp, Vp=Vp)
    return _header(p, sizes, tile, "backward", precision) + head + _indent(lines, 4) + "\n"


__all__ = ["Unsupported", "generate_backward_2d", "generate_forward_2d"]
