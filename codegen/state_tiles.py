"""The anchored chunk program with per-position states, as a tile graph of one chunk.

For rules whose read needs each position's whole memory — a state projection: Moneta's ℓq
normalisation `P(A) = A / ‖A‖_q^(q-2)`, Memora's row softmax — or whose learning rate and keep are
per channel (Moneta's η, α ∈ R^d), the dual form's `A_i x` trick is not enough. Here every
position's state is built, flattened row-major into one row of a [C, m*n] tile (MATH.md §1.4
without momentum, §4.5):

    A_i = abar_i A0 - sum_{j<=i} D_ij lr_j a_j b_j^T        row i = abar_i vec(A0) - (Kc @ kron(a, b))_i

Per-channel coefficients (a channel is a row of the matrix, `channel_axis` "row", or a column,
"col"/"vec"): one C×C matrix per channel, D_ij lr_j with D_ij = prod_{j<l<=i} keep_l multiplied in linear
space (`channel_decays`), kept channel-major as a [w, C*C] tile; the flattened outer products are permuted
to channel-major [w, C*other] (`permute`), multiplied channel by channel (`bmm`) and permuted back.
(Factoring D_ij = abar_i / abar_j instead, as gated-linear-attention kernels do, overflows past a
chunk product of e^-80, and was further from float64 in fp32: gate α 6.6e-5 vs 3.3e-5 on moneta. Log
space, exp(cum_i - cum_j), lost the gradient of a keep of exactly 0 and clamped negative keeps.)

The gradient of every token is taken at the projected chunk-start state P(A0), the reads see
P(A_i) (`matvec` on a flattened state is kron_da), the chunk ends in the unprojected A_last — what
`runtime_torch.Runtime.chunkwise` computes. Memora's lag token (runtime_torch.segments): row 0 is a
segment of its own, and rows 1.. are a second segment anchored at P(A_1) — two passes over the
chunk, each with the other rows' learning rate 0 and keep 1.

Inputs as in chunk_tiles, plus `first` / `later` ([C, 1] boolean: row 0, the valid rows after it)
with a lag token; lr and keep are [C, 1] or [C, channels].
"""

from __future__ import annotations

import sympy as sp

from memdsl.program import Program

from .chunk_tiles import Unsupported, _Lower, decay_coefficients, pad, tile_shape_of
from .tile_ir import TileGraph, X

FP32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny: the runtime's floor of an ℓq sum


MAX_NUMEL = 1 << 20  # Triton's largest tensor (TRITON_MAX_TENSOR_NUMEL)


def check_tile_size(C: int, mats: dict[str, tuple[int, int]]) -> None:
    """Per-position states are [C, m*n] tiles: past Triton's largest tensor there is no kernel."""
    for n, (m, k) in mats.items():
        if C * m * k > MAX_NUMEL:
            raise Unsupported(f"the per-position states of {n} ({C} x {m}*{k} after padding) exceed Triton's "
                              f"{MAX_NUMEL} elements per tile")


def hyper_width(p: Program, name: str | None, sizes: dict) -> int:
    """Channels of a hyper-parameter (graph output `name`): 1 for a scalar, else its vector's size."""
    if name is None:
        return 1
    shape = p.graph.node(p.graph.outputs[name]).shape
    return int(sp.sympify(shape[0]).subs(sizes)) if shape else 1


def channel_decays(t: TileGraph, keep: int, C: int) -> tuple[int, int]:
    """Per-channel decay_coefficients of a [C, w] keep: D as [w, C*C] (channel c's C×C matrix row-major in row
    c) and abar [C, w], in linear space. D = (I - N)^-1 = sum_{k<C} N^k = (I + N)(I + N^2)(I + N^4)..., one
    batched product per doubling (`bmm` over the channels); each entry of D is a single product of keeps (the
    other terms of its sum are exact zeros), so a keep of exactly 0 or below 0 is multiplied like any other."""
    one, zero = t.const(1.0), t.const(0.0)
    flat = (1, C * C)
    sub = t.reshape(t.where(t.input("shift", (C, C), boolean=True), one, zero), flat)
    eye = t.reshape(t.where(t.mask("place", 0, C, C, C), one, zero), flat)
    keep_t = t.trans(keep)
    power = t.mul(t.kron(keep_t, t.expand(one, (1, C))), sub)  # N: keep_i at column i*C + i - 1
    D, span = t.add2(eye, power), 2
    while span < C:
        power = t.bmm(power, power, C, C, C)
        D, span = t.add2(D, t.bmm(D, power, C, C, C)), 2 * span
    abar = t.kron_da(D, t.where(t.mask("cols", 1, C), keep_t, zero), C)  # D_i0 keep_0 = prod_{l<=i} keep_l
    return D, t.trans(abar)


def _lq_norm(q: float) -> sp.Expr:
    """‖A‖_q from s = sum |A|^q, floored as runtime_torch.Runtime.project floors it (s at fp32's tiny, the
    norm at 1e-12). The floors are Piecewise, not Max: their derivatives are then selects, where a Max's step
    function multiplies a derivative that overflows by 0, giving NaN. The norm and its inverse power are two
    nodes, as in the runtime: one expression for d(s^((2-q)/q))/ds is s^((2-2q)/q), which overflows fp32 for
    s near the floor (1e48 at s = 1e-36) where the chain through the norm stays in range."""
    return sp.Piecewise((X[0] ** sp.Float(1.0 / q), X[0] > FP32_TINY), (sp.Float(FP32_TINY) ** sp.Float(1.0 / q), True))


def _lq_scale(q: float) -> sp.Expr:
    """1 / norm^(q-2) of the floored norm (see _lq_norm)."""
    floor = sp.Float(1e-12)
    return sp.Piecewise((1 / X[0] ** sp.Float(q - 2), X[0] > floor), (floor ** sp.Float(2 - q), True))


def _power(q: float) -> sp.Expr:
    return X[0] ** int(q) if float(q).is_integer() and int(q) % 2 == 0 else sp.Abs(X[0]) ** sp.Float(q)


def build_state_graph(p: Program, spec: dict, shapes: dict[str, list[int]], sizes: dict, C: int,
                      read_order: str = "after") -> TileGraph:
    """The forward tile graph of one chunk (outputs y, A_<p>) with per-position states. `read_order` as in
    chunk_tiles: after write, before write (A_{i-1}: the rows shifted down), at the segment's start."""
    ir = p.graph
    t = TileGraph()
    mats = [x.name for x in p.params if len(x.shape) == 2]
    vecs = [x.name for x in p.params if len(x.shape) == 1]
    zero, one = t.const(0.0), t.const(1.0)
    proj = spec["projection"]

    def tile_shape(name: str, rows: int | None = None) -> tuple[int, int]:
        return tile_shape_of(shapes[name], rows)

    if proj == "softmax" and any(pad(s) != s for n in mats + vecs for s in shapes[n]):
        raise Unsupported("a row softmax over a padded width (a size that is not a power of two)")
    check_tile_size(C, {n: tile_shape(n) for n in mats})
    lower = t.input("lower", (C, C), boolean=True)
    valid = t.input("valid", (C, 1), boolean=True)
    is_last = t.input("is_last", (C, 1), boolean=True)
    A = {n: t.input(f"A_{n}", tile_shape(n)) for n in mats + vecs}
    bind = {n: (t.input(f"tok_{n}", tile_shape(n, C)), "tok") for n in ("q", "k", "v")}
    bind.update({n: (t.input(f"tok_{n}", tile_shape(n, C)), "tok") for n in spec["gates"]})
    bind.update({n: (t.input(f"out_{n}", tile_shape(n)), "const") for n in spec["outers"]})
    lr = t.input("lr", (C, hyper_width(p, spec["lr"], sizes)))
    keeps = [r["keep"] for r in spec["retain"] if r.get("keep")]
    keep = t.input("keep", (C, max(hyper_width(p, k, sizes) for k in keeps))) if keeps else None
    for n in mats + vecs:  # a per-channel coefficient must match the axis it scales
        width = max(t.shape(lr)[1], t.shape(keep)[1] if keep is not None else 1)
        axis = spec["params"][n]["channel_axis"]
        side = tile_shape(n)[0 if axis == "row" else 1]
        if width > 1 and width != side:
            raise Unsupported(f"per-channel coefficients of width {width} on {n}, whose {axis} axis is {side}")
    outs = {n: ir.outputs[f"grad.{n}"] for n in mats + vecs}
    factors = {n: [(ir.outputs[f"factor.{n}.{i}.a"], ir.outputs[f"factor.{n}.{i}.b"])
                   for i in range(spec["factors"][n])] for n in mats}

    def ones(n: int) -> int:
        return t.expand(one, (1, n))

    def project(x: int, n: int, flat: bool) -> int:
        """P(x) of a state tile [m, n] (flat=False) or of per-position states [C, m*n] (flat=True)."""
        if proj == "lq":
            power = t.ew(_power(spec["lq"]), x)
            total = t.sum(power, axis=1) if flat else t.sum(t.sum(power, axis=1), axis=0)
            return t.mul(x, t.ew(_lq_scale(spec["lq"]), t.ew(_lq_norm(spec["lq"]), total)))
        if proj == "softmax":  # per row of each matrix: groups of n consecutive columns
            shift = t.gmax(x, n)
            wide = (lambda r: t.kron(r, ones(n))) if flat and t.shape(x)[1] != n else (lambda r: r)
            e = t.ew(sp.exp(X[0] - X[1]), x, wide(shift))
            total = t.kron_da(e, ones(n), t.shape(x)[1] // n) if flat and t.shape(x)[1] != n else t.sum(e, axis=1)
            return t.ew(X[0] / X[1], e, wide(total))
        return x

    def last_row(x: int) -> int:
        return t.sum(t.where(is_last, x, zero), axis=0)

    def segment(state: dict[str, int], rows: int | None, lr_s: int, keep_s: int | None):
        """One anchor segment over the rows `rows` (None: every valid row): the flattened per-position
        states of every param, their projections (the read's weights) and the segment's end state."""
        row_valid = valid if rows is None else rows
        anchor = {n: project(state[n], tile_shape(n)[1], flat=False) for n in state}
        low = _Lower(t, ir, sizes, C, {**bind, **{n: (anchor[n], "const") for n in anchor}}, valid=row_valid)
        done = low.emit([x for n in mats for pair in factors[n] for x in pair] + [outs[n] for n in vecs])
        scalar = t.shape(lr_s)[1] == 1 and (keep_s is None or t.shape(keep_s)[1] == 1)
        if scalar:
            D, abar = decay_coefficients(t, keep_s, C) if keep_s is not None else (t.where(lower, one, zero), one)
            Kc = t.mul(D, t.trans(lr_s))
        else:  # per channel: a C×C coefficient matrix per channel, channel-major [w, C*C]
            tri = t.mask("ltri", C)
            lr_cols = t.kron(ones(C), t.trans(lr_s))  # lr_j at column i*C + j
            if keep_s is not None:
                D, abar = channel_decays(t, keep_s, C)
                Kc = t.where(tri, t.mul(D, lr_cols), zero)
            else:
                Kc, abar = t.where(tri, lr_cols, zero), one
        flat, read, end = {}, {}, {}
        for n in mats + vecs:
            m_p, n_p = tile_shape(n)
            axis = spec["params"][n]["channel_axis"]
            if n in vecs:
                u = low.as_rows(done[outs[n]], n_p)
                upd = t.dot(Kc, u) if scalar else t.trans(t.bmm(Kc, t.trans(u), C, C, 1))
                states = t.sub(t.mul(abar, state[n]), upd)
            else:
                upd = None
                for a, b in factors[n]:
                    term = t.kron(low.as_rows(done[a], m_p), low.as_rows(done[b], n_p))
                    upd = term if upd is None else t.add2(upd, term)
                base, wide = t.reshape(state[n], (1, m_p * n_p)), abar
                if scalar:
                    upd = t.dot(Kc, upd)
                else:  # [C, m*n] (j, m, n) -> channel-major, one product per channel, and back
                    dims, to, back = ((C, m_p, n_p), (1, 0, 2), (1, 0, 2)) if axis == "row" else \
                        ((C, m_p, n_p), (2, 0, 1), (1, 2, 0))
                    chan = t.permute(upd, dims, to)
                    inner = dims[2] if axis == "row" else dims[1]
                    prod = t.bmm(Kc, chan, C, C, inner)
                    upd = t.permute(prod, (t.shape(chan)[0], C, inner), back)
                    if t.shape(abar)[1] > 1:
                        wide = t.kron(abar, ones(n_p)) if axis == "row" else t.kron(ones(m_p), abar)
                states = t.sub(t.mul(wide, base), upd)
            flat[n] = states
            if read_order == "chunk_start":  # every position reads the segment's start state: P(A0)
                read[n] = anchor[n]
            else:
                if read_order == "before":  # position i reads A_{i-1}: rows shifted down, row 0 reads A0
                    start = state[n] if n in vecs else t.reshape(state[n], (1, m_p * n_p))
                    states = t.add2(t.dot(down, states), t.where(first, start, zero))
                read[n] = project(states, n_p, flat=True)
            end[n] = last_row(flat[n]) if n in vecs else t.reshape(last_row(flat[n]), (m_p, n_p))
        return read, end

    def read_at(weights: dict[str, int], row_valid: int) -> int:
        low = _Lower(t, ir, sizes, C, bind, valid=row_valid)
        rb = dict(bind)
        if read_order == "chunk_start":
            rb.update({n: (weights[n], "const") for n in mats + vecs})
        else:
            rb.update({n: (weights[n], "pp") for n in mats})
            rb.update({n: (low.mask(weights[n]), "tok") for n in vecs})
        reader = _Lower(t, ir, sizes, C, rb, valid=row_valid)
        reader.per_position = {weights[n]: tile_shape(n) for n in mats}
        y, _ = reader.emit([ir.outputs["read"]])[ir.outputs["read"]]
        return low.mask(y)

    first = t.input("first", (C, 1), boolean=True) if spec["lag"] or read_order == "before" else None
    down = t.where(t.input("shift", (C, C), boolean=True), one, zero) if read_order == "before" else None
    if spec["lag"]:
        later = t.input("later", (C, 1), boolean=True)
        lr1 = t.where(first, lr, zero)
        keep1 = t.where(first, keep, one) if keep is not None else None
        read1, mid = segment(A, first, lr1, keep1)
        lr2 = t.where(first, zero, lr)
        keep2 = t.where(first, one, keep) if keep is not None else None
        read2, end = segment(mid, later, lr2, keep2)
        y = t.where(first, read_at(read1, first), read_at(read2, later))
    else:
        read, end = segment(A, None, lr, keep)
        y = read_at(read, valid)
    t.outputs["y"] = t.where(valid, y, zero)
    for n in mats + vecs:
        t.outputs[f"A_{n}"] = end[n]
    return t


__all__ = ["MAX_NUMEL", "build_state_graph", "check_tile_size", "hyper_width"]
