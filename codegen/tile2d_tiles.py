"""The 2-D chunkwise program of one tile (memdsl/twod.py, codegen/runtime_2d.py) as a tile graph.

One kernel program owns one (batch, head) of one direction and walks its tiles variate chunk by
variate chunk, each chunk's time tiles in order, carrying the tile's left column (and, with several
variate chunks, passing every tile's last variate row to the tile below it through memory). A tile
holds Tp × Vp cells (Tp, Vp: the tile's time and variate extents padded to powers of two), one row
per cell, variate-major as in the torch program: row r = v · Tp + t. Per-cell states are rows of
[n, m·n] tiles (state_tiles' flattened per-position states; a product with one is `kron_da` / `kron_db`).

The math (runtime_2d, "anchored"): with N the tile's one-step transfer (N[r(t,v), r(t-1,v)] = kt[t,v],
N[r(t,v), r(t,v-1)] = kv[t,v]; strictly lower triangular in this row order) the tile's 2-D scan is the
lattice path-sum matrix K = (I - N)^-1 (`trinv`, forward substitution: every entry a plain sum of
products, no division). The boundary enters as sources: row (0, v) gets kt · left[v], row (t, 0) gets
kv · top[t] (top: the last variate row of the tile above; the initial memory for the first variate
chunk — with one chunk a single [1, F] row for every tile). Then
    anchors = K @ src,   S = -lr ⊙ grad(anchors),   A = K @ (src + S),   y = read(A)
and the next left column is the tile's last valid time row of A. For `scan2d` rules no gradient reads
the memory, the anchors drop out, and the same graph is the exact 2-D scan.

Inputs (the kernel binds them per tile):
    tok_q, tok_k, tok_v [n, d]; tok_<gate> [n, 1]; kt, kv, lr [n, 1]    per cell (padded cells: 0)
    L_<p> [Vp, F_p] the left column (one state per variate);  T_<p> [1, F_p] the initial memory
    out_<o> outer constants;  masks (boolean, built from indices by the kernel):
    valid [n, 1], first_v [n, 1] (v = 0), strict / shift_t / shift_v [n, n], enter [n, Vp] (t = 0,
    column v), carry [Vp, n] (row v picks cell (last, v), `last` the tile's last valid time row)
Outputs: y [n, dv] (0 on padded cells), C_<p> [Vp, F_p] the next left column.
Several variate chunks (`rows`): T_<p> is the row above, [Tp, F_p], placed by `enter_top` [n, Tp], and
R_<p> [Tp, F_p] the tile's last valid variate row (mask `bottom` [Tp, n]), the next chunk's row above.
Padded cells (t ≥ T, t ≥ Tc, v ≥ V) come after every real cell along both axes, so nothing flows from
them into a real one (the torch program pads by repeating edge cells for the same reason).
"""

from __future__ import annotations

from memdsl.program import Program

from .chunk_tiles import Unsupported, _Lower, pad, tile_shape_of
from .state_tiles import check_tile_size
from .tile_ir import TileGraph, X

MASKS = ("valid", "first_v", "strict", "shift_t", "shift_v", "enter", "carry")


def build_tile2d_graph(p: Program, spec: dict, shapes: dict[str, list[int]], sizes: dict, Tp: int,
                       Vp: int, rows: bool = False) -> TileGraph:
    """The forward tile graph of one 2-D tile of Tp × Vp cells (outputs y, C_<p>). `spec` is the rule's
    1-D SPEC (gates, outers); `p` must have its gradient factors exposed (module.factor_outputs).
    `rows` (several variate chunks): the row above the tile is an input T_<p> [Tp, F] (one state per time
    step: the last variate row of the tile above, or the initial memory), and the tile's own last variate
    row is an output R_<p> [Tp, F] (selected by the mask `bottom` [Tp, n]), for the tile below it."""
    ir = p.graph
    t = TileGraph()
    n = Tp * Vp
    mats = [x.name for x in p.params if len(x.shape) == 2]
    vecs = [x.name for x in p.params if len(x.shape) == 1]
    if any(len(x.shape) == 0 for x in p.params):
        raise Unsupported("a scalar memory parameter in a 2-D kernel")
    missing = [m for m in mats if f"factor.{m}.0.a" not in ir.outputs]
    if missing:
        raise Unsupported(f"the gradient of {missing[0]} is not a sum of outer products")
    if any(info["channels"] for info in spec["gates"].values()):
        raise Unsupported("per-channel gates in a 2-D kernel")
    check_tile_size(n, {m: tile_shape_of(shapes[m]) for m in mats})
    zero, one = t.const(0.0), t.const(1.0)
    valid = t.input("valid", (n, 1), boolean=True)
    first_v = t.input("first_v", (n, 1), boolean=True)
    strict = t.input("strict", (n, n), boolean=True)
    shift_t = t.input("shift_t", (n, n), boolean=True)
    shift_v = t.input("shift_v", (n, n), boolean=True)
    enter = t.input("enter", (n, Vp), boolean=True)
    carry = t.input("carry", (Vp, n), boolean=True)
    width = {q: tile_shape_of(shapes[q]) for q in mats + vecs}
    F = {q: width[q][0] * width[q][1] for q in mats + vecs}
    left = {q: t.input(f"L_{q}", (Vp, F[q])) for q in mats + vecs}
    top = {q: t.input(f"T_{q}", (Tp if rows else 1, F[q])) for q in mats + vecs}
    bind = {x: (t.input(f"tok_{x}", tile_shape_of(shapes[x], n)), "tok") for x in ("q", "k", "v")}
    bind.update({g: (t.input(f"tok_{g}", (n, 1)), "tok") for g in spec["gates"]})
    bind.update({o: (t.input(f"out_{o}", tile_shape_of(shapes[o])), "const") for o in spec["outers"]})
    kt, kv, lr = (t.input(x, (n, 1)) for x in ("kt", "kv", "lr"))

    # the tile's 2-D scan as one matrix: K = (I + L)^-1 with L = -N
    L = t.where(shift_t, t.ew(-X[0], kt), t.where(shift_v, t.ew(-X[0], kv), zero))
    K = t.trinv(L, strict)
    E = t.where(enter, one, zero)
    kv_top = t.where(first_v, kv, zero)
    if rows:  # cell (t, 0) takes row t of the row above: a placement [n, Tp] (t_r == column, v_r == 0)
        place = t.where(t.input("enter_top", (n, Tp), boolean=True), one, zero)
        above = {q: t.dot(place, top[q]) for q in mats + vecs}
    else:
        above = top
    src = {q: t.add2(t.mul(kt, t.dot(E, left[q])), t.mul(kv_top, above[q])) for q in mats + vecs}
    anchors = {q: t.dot(K, src[q]) for q in mats + vecs}

    def per_cell(states: dict[str, int]) -> _Lower:
        low = _Lower(t, ir, sizes, n, {**bind, **{m: (states[m], "pp") for m in mats},
                                       **{v: (t.where(valid, states[v], zero), "tok") for v in vecs}}, valid=valid)
        low.per_position = {states[m]: width[m] for m in mats}
        return low

    # the steps: -lr ⊙ the gradient at every cell's anchor (rank-1 factors for matrices, rows for vectors)
    grads = per_cell(anchors)
    factors = {m: [(ir.outputs[f"factor.{m}.{i}.a"], ir.outputs[f"factor.{m}.{i}.b"]) for i in _count(ir, m)]
               for m in mats}
    roots = [x for m in mats for pair in factors[m] for x in pair] + [ir.outputs[f"grad.{v}"] for v in vecs]
    done = grads.emit(roots)
    neg_lr = t.ew(-X[0], lr)
    A = {}
    for q in mats + vecs:
        if q in mats:
            g = None
            for a, b in factors[q]:
                term = t.kron(grads.as_rows(done[a], width[q][0]), grads.as_rows(done[b], width[q][1]))
                g = term if g is None else t.add2(g, term)
        else:
            g = grads.as_rows(done[ir.outputs[f"grad.{q}"]], width[q][1])
        A[q] = t.dot(K, t.add2(src[q], t.mul(neg_lr, g)))
    reader = per_cell(A)
    y, _ = reader.emit([ir.outputs["read"]])[ir.outputs["read"]]
    t.outputs["y"] = t.where(valid, y, zero)
    C = t.where(carry, one, zero)
    for q in mats + vecs:
        t.outputs[f"C_{q}"] = t.dot(C, A[q])
    if rows:
        R = t.where(t.input("bottom", (Tp, n), boolean=True), one, zero)
        for q in mats + vecs:
            t.outputs[f"R_{q}"] = t.dot(R, A[q])
    return t


def _count(ir, m: str) -> range:
    i = 0
    while f"factor.{m}.{i}.a" in ir.outputs:
        i += 1
    return range(i)


def mask_values(Tp: int, Vp: int, Tc: int, T_left: int, V: int, Vc: int | None = None) -> dict:
    """The boolean inputs of one tile, as torch tensors (for the tile evaluator; the kernel builds the
    same from indices): Tc, Vc the logical tile, T_left and V the time steps and variates from this tile's
    corner to the end of the grid."""
    import torch
    r = torch.arange(Tp * Vp)
    tt, vv, u = r % Tp, r // Tp, torch.arange(Vp)
    Vc = Vc or V
    last, last_v = min(T_left, Tc) - 1, min(V, Vc) - 1
    return {
        "valid": ((tt < Tc) & (tt < T_left) & (vv < V) & (vv < Vc))[:, None],
        "enter_top": (vv[:, None] == 0) & (tt[:, None] == torch.arange(Tp)[None, :]),
        "bottom": (tt[None, :] == torch.arange(Tp)[:, None]) & (vv[None, :] == last_v),
        "first_v": (vv == 0)[:, None],
        "strict": r[:, None] > r[None, :],
        "shift_t": (r[None, :] == r[:, None] - 1) & (tt[:, None] > 0),
        "shift_v": r[None, :] == r[:, None] - Tp,
        "enter": (tt[:, None] == 0) & (vv[:, None] == u[None, :]),
        "carry": (vv[None, :] == u[:, None]) & (tt[None, :] == last),
    }


def tile_sizes(tile: tuple[int, int], T: int, V: int) -> tuple[int, int, int, int]:
    """(Tc, Vc, Tp, Vp): the torch program's tile (min(tile, grid)) and its padded extents."""
    Tc, Vc = min(tile[0], T), min(tile[1], V)
    return Tc, Vc, pad(Tc), pad(Vc)


__all__ = ["MASKS", "Unsupported", "build_tile2d_graph", "mask_values", "tile_sizes"]
