"""The exact chunked delta rule (WY/UT transform, MATH.md §9.3) as a tile graph.

For a rule the classifier marked `wy` — a matrix memory read once by a loss quadratic in its
output — the update is W_t = a_t W_{t-1} - lr_t (slope_t (a_t W_{t-1} key_t) + offset_t) key_t^T.
With S = W^T, b_i = lr_i slope_i, Gam_ij = prod_{j<l<=i} a_l, g_i = prod_{l<=i} a_l, per chunk:

    L   = strictly_lower(b_i (key_i . key_j) Gam_ij),      Tinv = (I + L)^-1
    U   = Tinv (-lr offset),   Wt = Tinv (b key g),        Vn = U - Wt S0
    y   = (query g) S0 + ((query key^T) * Gam) Vn
    S_C = g_C S0 + (key * tail)^T Vn,   tail_i = prod_{i<l<=C} a_l

Same inputs, outputs and masks as the anchored chunk graph (chunk_tiles.py), so the same kernel
templates, launcher and generated backward serve both.
"""

from __future__ import annotations

from memdsl.program import Program

from .chunk_tiles import _Lower, decay_coefficients, tile_shape_of
from .tile_ir import TileGraph, X


def build_wy_graph(p: Program, spec: dict, shapes: dict[str, list[int]], sizes: dict, C: int,
                   read_order: str = "after") -> TileGraph:
    if read_order != "after":
        raise ValueError("the WY chunk graph reads after write")
    ir = p.graph
    t = TileGraph()
    zero = t.const(0.0)
    lower = t.input("lower", (C, C), boolean=True)
    t.input("valid", (C, 1), boolean=True)
    is_last = t.input("is_last", (C, 1), boolean=True)
    strict = t.input("strict", (C, C), boolean=True)
    bind = {n: (t.input(f"tok_{n}", tile_shape_of(shapes[n], C)), "tok") for n in ("q", "k", "v")}
    bind.update({n: (t.input(f"tok_{n}", (C, 1)), "tok") for n in spec["gates"]})
    bind.update({n: (t.input(f"out_{n}", tile_shape_of(shapes[n])), "const") for n in spec["outers"]})
    (w,) = [x.name for x in p.params]
    A = t.input(f"A_{w}", tile_shape_of(shapes[w]))
    lr = t.input("lr", (C, 1))
    low = _Lower(t, ir, sizes, C, bind)
    names = ("wy.slope", "wy.offset", "wy.key", "wy.query")
    got = low.emit([ir.outputs[n] for n in names])
    slope, offset, key, query = (low.as_rows(got[ir.outputs[n]], shapes_of(t, got[ir.outputs[n]][0])) for n in names)
    if got[ir.outputs["wy.slope"]][1] == "const":  # e.g. 1 for an l2 loss / 2: folds into b = lr
        slope = got[ir.outputs["wy.slope"]][0]

    if spec["retain"]:
        gam, g = decay_coefficients(t, t.input("keep", (C, 1)), C)
    else:
        gam, g = t.where(lower, t.const(1.0), zero), t.expand(t.const(1.0), (C, 1))
    b = t.mul(lr, slope)
    L = t.mul(t.mul(b, t.dot(key, t.trans(key))), gam)
    tinv = t.trinv(L, strict)
    u = t.dot(tinv, t.ew(-X[0] * X[1], lr, offset))
    wt = t.dot(tinv, t.mul(t.mul(b, key), g))
    S0 = t.trans(A)
    vn = t.sub(u, t.dot(wt, S0))
    y = t.add2(t.dot(t.mul(query, g), S0), t.dot(t.mul(t.dot(query, t.trans(key)), gam), vn))
    t.outputs["y"] = low.mask(y)
    tail = t.trans(t.sum(t.where(is_last, gam, zero), axis=0))
    g_last = t.sum(t.where(is_last, g, zero), axis=0)
    S_new = t.add2(t.mul(g_last, S0), t.dot(t.trans(t.mul(key, tail)), vn))
    t.outputs[f"A_{w}"] = t.trans(S_new)
    return t


def shapes_of(t: TileGraph, node: int) -> int:
    return t.shape(node)[1]
