"""Muon's anchored chunk program (ATLAS, MATH.md §5.4, §5.6) as a tile graph of one chunk.

Once the gradients are anchored at the chunk-start state, the momentum no longer depends on the
memory, so every position's momentum comes out of one product; Newton–Schulz is nonlinear, so the
C momenta are materialised (MATH.md §5.6, Eq. 39–41), each flattened row-major into one row of a
[C, m*n] tile, and orthogonalised together by per-row matrix products (`bmm`):

    G_j = sum_l mix_jl a_l b_l^T                   the Omega window: this chunk's rows and the c-1 before
    S_i = mbar_i S0 + sum_{j<=i} Mmu_ij G_j        row i = mbar_i vec(S0) + (Mmu @ mix @ kron(a, b))_i
    A_i = abar_i A0 - sum_{j<=i} D_ij lr_j NS_k(S_j)
    y_i = M(q_i; A_i)                               (a product with a flattened state is kron_da)

— what `runtime_torch.Runtime.chunkwise` computes for `optim muon` (the signs "(+∇, −NS)"). The
backward kernel recomputes the chunk from its saved start state and differentiates all of it,
Newton–Schulz iterations included (tile_grad), so no per-position state is stored between chunks.

Inputs as in chunk_tiles (window history rows `hist_*` included).
"""

from __future__ import annotations

import sympy as sp

from memdsl.program import Program

from .chunk_tiles import Unsupported, _Lower, decay_coefficients, pad, tile_shape_of, token_bind
from .state_tiles import check_tile_size
from .tile_ir import TileGraph, X

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # runtime_torch._NS_COEFFS: the Muon quintic


def newton_schulz(t: TileGraph, x: int, m: int, n: int, steps: int) -> int:
    """NS_steps of every row of x, each an [m, n] matrix flattened (runtime_torch.newton_schulz: Frobenius
    normalisation, then X <- aX + (bG + cG^2)X with G = X X^T, on the transpose of a tall matrix)."""
    a, b, c = NS_COEFFS
    # the square root's derivative is infinite at 0 (a momentum of zeros: gates at 0), and times the zero
    # cotangent of sum(x^2) it would be NaN; autograd's norm has derivative 0 there, and so has this select
    norm = t.ew(sp.Piecewise((sp.sqrt(X[0]), X[0] > 0), (0, True)), t.sum(t.ew(X[0] ** 2, x), axis=1))
    x = t.ew(X[0] / (X[1] + sp.Float(1e-7)), x, norm)
    tall = m > n
    side = n if tall else m
    for _ in range(steps):
        gram = t.bmm(x, x, n, m, n, True, False) if tall else t.bmm(x, x, m, n, m, False, True)
        poly = t.ew(b * X[0] + c * X[1], gram, t.bmm(gram, gram, side, side, side))
        # tall: X^T <- a X^T + P X^T, i.e. X <- a X + X P (P is symmetric)
        x = t.ew(a * X[0] + X[1], x, t.bmm(x, poly, m, n, n) if tall else t.bmm(poly, x, m, m, n))
    return x


def build_muon_graph(p: Program, spec: dict, shapes: dict[str, list[int]], sizes: dict, C: int,
                     read_order: str = "after") -> TileGraph:
    """The forward tile graph of one chunk (outputs y, A_<p>, S_<p>) of a rule with `optim muon`, read after
    write, before write or at the chunk start (`read_order`, as in chunk_tiles)."""
    ir = p.graph
    t = TileGraph()
    mats = [x.name for x in p.params if len(x.shape) == 2]
    if len(mats) != len(p.params):
        raise Unsupported("Muon on a vector parameter")
    zero, one = t.const(0.0), t.const(1.0)
    c, weight = spec["window"], spec["window_weight"]
    # at least 16 history rows: the window's [C, Hh] coefficients then multiply the [Hh, m*n] outer
    # products with tl.dot (a thinner Hh would print as a [C, Hh, m*n] broadcast, past Triton's largest tensor)
    Hh = max(pad(c - 1), min(16, C)) if c > 1 else 0
    if Hh > C:
        raise Unsupported(f"a window of {c} tokens is longer than the chunk ({C})")

    def tile_shape(name: str, rows: int | None = None) -> tuple[int, int]:
        return tile_shape_of(shapes[name], rows)

    check_tile_size(C, {n: tile_shape(n) for n in mats})
    lower = t.input("lower", (C, C), boolean=True)
    valid = t.input("valid", (C, 1), boolean=True)
    is_last = t.input("is_last", (C, 1), boolean=True)
    A = {n: t.input(f"A_{n}", tile_shape(n)) for n in mats}
    S = {n: t.input(f"S_{n}", tile_shape(n)) for n in mats}
    outers = {n: (t.input(f"out_{n}", tile_shape(n)), "const") for n in spec["outers"]}

    bind = token_bind(t, shapes, spec["gates"], outers, "tok", C)
    lr, mu = t.input("lr", (C, 1)), t.input("mu", (C, 1))
    factors = {n: [(ir.outputs[f"factor.{n}.{i}.a"], ir.outputs[f"factor.{n}.{i}.b"])
                   for i in range(spec["factors"][n])] for n in mats}

    def outer_rows(token_inputs: dict, rows: int, row_valid: int) -> dict[str, int]:
        """Every token's gradient at the chunk-start state, flattened: sum over pairs of kron(a, b)."""
        low = _Lower(t, ir, sizes, rows, {**token_inputs, **{n: (A[n], "const") for n in A}}, valid=row_valid)
        done = low.emit([x for n in mats for pair in factors[n] for x in pair])
        out = {}
        for n in mats:
            m_p, n_p = tile_shape(n)
            terms = [t.kron(low.as_rows(done[a], m_p), low.as_rows(done[b], n_p)) for a, b in factors[n]]
            out[n] = terms[0]
            for term in terms[1:]:
                out[n] = t.add2(out[n], term)
        return out

    sets = [outer_rows(bind, C, valid)]
    mixes = [None]
    if weight and not Hh:  # a window of one token still weighs its gradient (runtime_torch.window_mix)
        mixes = [t.where(t.mask("band", 1, C), t.trans(bind[weight][0]), zero)]
    if Hh:
        hist_valid = t.input("hist_valid", (Hh, 1), boolean=True)
        sets.append(outer_rows(token_bind(t, shapes, spec["gates"], outers, "hist", Hh), Hh, hist_valid))
        gammas = [bind[weight][0], t.inputs[f"hist_{weight}"]] if weight else [one, one]
        mixes = [t.where(t.mask("band", c, C), t.trans(gammas[0]), zero),
                 t.where(t.mask("hband", c, C, Hh), t.trans(gammas[1]), zero)]

    if spec["retain"]:
        D, abar = decay_coefficients(t, t.input("keep", (C, 1)), C)
    else:
        D, abar = t.where(lower, one, zero), one
    Mmu, mbar = decay_coefficients(t, mu, C)
    coef = [Mmu if mix is None else t.dot(Mmu, mix) for mix in mixes]

    def last_row(x: int) -> int:
        return t.sum(t.where(is_last, x, zero), axis=0)

    read_bind = dict(bind)
    per_position = {}
    for n in mats:
        m_p, n_p = tile_shape(n)
        flat = (1, m_p * n_p)
        mom = t.mul(mbar, t.reshape(S[n], flat))
        for k, rows in zip(coef, sets, strict=True):
            mom = t.add2(mom, t.dot(k, rows[n]))
        step = t.mul(t.ew(-X[0], lr), newton_schulz(t, mom, m_p, n_p, spec["ns_steps"]))
        states = t.add2(t.mul(abar, t.reshape(A[n], flat)), t.dot(D, step))
        if read_order == "chunk_start":  # every position reads the chunk-start state
            read_bind[n] = (A[n], "const")
        else:
            read = states
            if read_order == "before":  # position i reads A_{i-1}: rows shifted down, row 0 reads A0
                first = t.input("first", (C, 1), boolean=True)
                down = t.where(t.input("shift", (C, C), boolean=True), one, zero)
                read = t.add2(t.dot(down, states), t.where(first, t.reshape(A[n], flat), zero))
            read_bind[n] = (read, "pp")
            per_position[read] = (m_p, n_p)
        t.outputs[f"A_{n}"] = t.reshape(last_row(states), (m_p, n_p))
        t.outputs[f"S_{n}"] = t.reshape(last_row(mom), (m_p, n_p))
    reader = _Lower(t, ir, sizes, C, read_bind)
    reader.per_position = per_position
    y, _ = reader.emit([ir.outputs["read"]])[ir.outputs["read"]]
    t.outputs["y"] = reader.mask(y)
    return t


__all__ = ["build_muon_graph", "newton_schulz"]
