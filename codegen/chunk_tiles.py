"""A rule's anchored chunk program (dual form) as a tile graph: what one kernel iteration computes.

Inputs of the graph (names the kernel binds when it loads a chunk):
    tok_q, tok_k, tok_v        token tiles [C, d]
    tok_<gate>                 scalar gates [C, 1]
    out_<outer>                outer constants [1, n] / [m, n]
    A_<p>, S_<p>               chunk-start state (memory, momentum) [m, n] / [1, n]
    lr, mu, keep, scale        per-token hyper-parameters [C, 1] (padded rows: 0, 1, 1, 0)
    lower, valid, is_last      masks: C×C lower triangle, valid rows, the last valid row
Outputs: `y` [C, dv] and the end-of-chunk state `A_<p>`, `S_<p>`.

The math (MATH.md §1.4, DESIGN "Semantics"): gradients at the chunk-start state come out as
rank-1 factors a_i b_i^T (vectors: rows u_i); with D_ij = prod_{j<l<=i} keep_l and the momentum
matrix M_ij = prod_{j<l<=i} mu_l, the state after token i is
    A_i = abar_i A0 + f_i S0 - sum_j Kc_ij a_j b_j^T,   S_i = mbar_i S0 - sum_j Ks_ij a_j b_j^T
with Kc = (D @ M) * lr_j (gd: D * lr_j; TTT's position scale: scale_i * lr_j), so the read
M(q_i; A_i) never builds A_i: `A_i x = abar_i A0 x + f_i S0 x - sum_j Kc_ij (b_j . x) a_j`.

Every token-row value is masked to zero on padded rows (a ragged last chunk): a row of zeros can
still produce NaN in a norm or a division, and NaN times a zero coefficient is NaN, in the forward
sum over rows and in every adjoint.
"""

from __future__ import annotations

import sympy as sp

from memdsl.ir import Graph
from memdsl.ops import ELEMENTWISE, sympy_form
from memdsl.program import Program

from .tile_ir import TileGraph, X


class Unsupported(Exception):
    """This rule (or these sizes) is outside the Triton slice: the caller uses the torch path."""


def pad(n: int) -> int:
    """The tile width of a logical size: the next power of two (Triton tiles are powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def tile_shape_of(shape: list[int], rows: int | None = None) -> tuple[int, int]:
    """A tensor's tile: token rows [rows, width], or a chunk constant [m, n] / [1, n] / [1, 1]."""
    if rows is not None:
        return (rows, pad(shape[0]) if shape else 1)
    if len(shape) == 2:
        return (pad(shape[0]), pad(shape[1]))
    return (1, pad(shape[0]) if shape else 1)


class _Lower:
    """Lowers IR nodes (the rule's gradient and read functions) into tile nodes."""

    def __init__(self, t: TileGraph, ir: Graph, sizes: dict, C: int, bind: dict[str, tuple[int, str]],
                 duals: dict | None = None, valid: int | None = None):
        self.t, self.ir, self.sizes, self.C, self.bind = t, ir, sizes, C, bind
        self.duals = duals or {}
        self.per_position: dict[int, tuple[int, int]] = {}  # flattened states [C, m*n] -> (m, n) (state_tiles)
        self.val: dict[int, int] = {}
        self.kind: dict[int, str] = {}
        self.valid = t.inputs["valid"] if valid is None else valid  # the rows this lowering fills

    def n(self, e) -> int:
        return int(sp.sympify(e).subs(self.sizes))

    def mask(self, i: int) -> int:
        zero = self.t.const(0.0)
        return self.t.where(self.valid, i, zero)

    def mask_cols(self, i: int, n: int) -> int:
        """Zero the padding columns of a logical width-n value (an expression of zeros need not be 0)."""
        if pad(n) == n:
            return i
        return self.t.where(self.t.mask("cols", n, pad(n)), i, self.t.const(0.0))

    def emit(self, outputs: list[int]) -> dict[int, tuple[int, str]]:
        for nid in self.ir.topo(outputs):
            self.node(nid)
        return {o: (self.val[o], self.kind[o]) for o in outputs}

    def node(self, nid: int) -> None:
        t, ir = self.t, self.ir
        node = ir.node(nid)
        ops = ir.operands(nid)
        if node.op == "input":
            name = node.attr("name")
            if node.attr("role") == "size":
                self.val[nid], self.kind[nid] = t.const(float(sp.Symbol(name).subs(self.sizes))), "const"
            elif name in self.bind:
                self.val[nid], self.kind[nid] = self.bind[name]
            else:
                raise Unsupported(f"input {name} is not available inside the kernel")
            return
        if node.op == "const":
            self.val[nid], self.kind[nid] = t.const(float(sp.sympify(node.attr("value")).subs(self.sizes))), "const"
            return
        args = [self.val[o] for o in ops]
        kinds = [self.kind[o] for o in ops]
        kind = "tok" if "tok" in kinds or "pp" in kinds else "const"
        if "pp" in kinds and node.op not in ("matvec", "matvec_t"):
            raise Unsupported(f"op {node.op} on a memory matrix (the kernels only multiply with it)")
        if node.op == "outer":
            self.val[nid], self.kind[nid] = (args[0], args[1]), "outer"
            return
        width = self.n(node.shape[0]) if len(node.shape) == 1 else None
        if node.op in ELEMENTWISE:
            expr = sympy_form(node.op, X[:len(ops)], dict(node.attrs)).subs(self.sizes)
            out = t.ew(expr, *args)
            if width is not None:
                out = self.mask_cols(out, width)
        elif node.op in ("sum", "norm"):
            if len(ir.node(ops[0]).shape) != 1:
                raise Unsupported("a reduction over a matrix")
            x = args[0]
            if node.op == "norm":
                out = t.ew(sp.sqrt(X[0]), t.sum(t.ew(X[0] * X[0], x), axis=1))
            else:
                out = t.sum(x, axis=1)
        elif node.op == "matvec":
            w, x = args
            if kinds[0] == "dual":
                out = self.duals[ops[0]](x)
            elif kinds[0] == "pp":  # row i of w is position i's matrix, flattened: out_i = W_i x_i
                m, n = self.per_position[w]
                out = t.kron_da(w, self.as_rows((x, kinds[1]), n), m)
            elif kinds[0] == "tok":
                raise Unsupported("a per-token matrix")
            elif kinds[1] == "tok":
                out = t.dot(x, t.trans(w))
            else:
                out = t.trans(t.sum(t.mul(w, x), axis=1))
        elif node.op == "matvec_t":
            w, x = args
            if kinds[0] == "pp":
                m, n = self.per_position[w]
                out = t.kron_db(w, self.as_rows((x, kinds[1]), m), n)
            elif kinds[0] != "const":
                raise Unsupported("a transposed product with a per-token matrix")
            else:
                out = t.dot(x, w) if kinds[1] == "tok" else t.sum(t.mul(w, t.trans(x)), axis=0)
        elif node.op == "broadcast":
            rows = self.C if kind == "tok" else 1
            out = self.mask_cols(t.expand(args[0], (rows, pad(width or 1))), width or 1)
        elif node.op == "concat":  # each block moved to its column offset (a gather: no [n, W] placement matrix)
            out, off = None, 0
            for o, x in zip(ops, args, strict=True):
                n_o = self.n(ir.node(o).shape[0])
                term = t.place_cols(x, off, n_o, pad(width))
                out = term if out is None else t.add2(out, term)
                off += n_o
        elif node.op == "kron":
            if any(pad(self.n(ir.node(o).shape[0])) != self.n(ir.node(o).shape[0]) for o in ops):
                raise Unsupported("a Kronecker product of vectors whose size is not a power of two")
            out = t.kron(*args)
        else:
            raise Unsupported(f"op {node.op}")
        if kind == "tok":
            out = self.mask(out)
        self.val[nid], self.kind[nid] = out, kind

    def as_rows(self, pair: tuple[int, str], width: int) -> int:
        """A factor as a [C, width] token tile (a chunk constant is broadcast to every valid row)."""
        i, kind = pair
        if kind == "tok":
            return i
        return self.mask(self.t.expand(i, (self.C, width)))


def token_bind(t: TileGraph, shapes: dict[str, list[int]], gates, outers: dict, prefix: str,
               rows: int) -> dict[str, tuple[int, str]]:
    """The `_Lower` bindings of one block of token rows — this chunk's (`tok`) or the window history's
    (`hist`): q, k, v and the gates as new tile inputs, plus the outer constants."""
    bind = {n: (t.input(f"{prefix}_{n}", tile_shape_of(shapes[n], rows)), "tok") for n in ("q", "k", "v", *gates)}
    return {**bind, **outers}


def decay_coefficients(t: TileGraph, keep: int, C: int) -> tuple[int, int]:
    """D_ij = prod_{j<l<=i} keep_l (1 on the diagonal, 0 above) and abar_i = prod_{l<=i} keep_l of a [C, 1]
    keep column, in linear space: D = (I - N)^-1 for the sub-diagonal N_{i,i-1} = keep_i (forward substitution
    multiplies, so every entry is the plain product). Log space (exp of a cumulative sum of safe logs) was used
    before: a keep of exactly 0 (a saturated fp32 sigmoid) lost its gradient there, as the clamped log's
    derivative is 0, and a negative keep was clamped to 1e-30; trinv's adjoint, -D^T g D^T, has no division."""
    zero = t.const(0.0)
    D = t.trinv(t.where(t.input("shift", (C, C), boolean=True), t.ew(-X[0], keep), zero),
                t.input("strict", (C, C), boolean=True))
    abar = t.dot(D, t.where(t.input("first", (C, 1), boolean=True), keep, zero))
    return D, abar


def build_chunk_graph(p: Program, spec: dict, shapes: dict[str, list[int]], sizes: dict, C: int,
                      read_order: str = "after") -> TileGraph:
    """The forward tile graph of one chunk (outputs y, A_<p>, S_<p>). `read_order`: the read sees the
    state after its own token ("after"), before it ("before"), or at the chunk start (TNT's global
    memory, "chunk_start").

    With an Omega window of c tokens (weights gamma), position j's gradient is the gamma-weighted sum
    over tokens j-c+1..j, all at the chunk-start anchor (MATH.md §5): the coefficients become
    Kw = Kc @ mix (banded), and the c-1 tokens before the chunk are a second set of factor rows,
    `hist_<name>` inputs of Hh = pad(c-1) rows (masked by `hist_valid`)."""
    ir = p.graph
    t = TileGraph()
    mats = [x.name for x in p.params if len(x.shape) == 2]
    vecs = [x.name for x in p.params if len(x.shape) == 1]
    momentum = spec["optim"] == "momentum"
    zero, one = t.const(0.0), t.const(1.0)
    c, weight = spec["window"], spec["window_weight"]
    Hh = pad(c - 1) if c > 1 else 0
    if Hh > C:
        raise Unsupported(f"a window of {c} tokens is longer than the chunk ({C})")

    def tile_shape(name: str, rows: int | None = None) -> tuple[int, int]:
        return tile_shape_of(shapes[name], rows)

    lower = t.input("lower", (C, C), boolean=True)
    valid = t.input("valid", (C, 1), boolean=True)
    is_last = t.input("is_last", (C, 1), boolean=True)
    A = {n: t.input(f"A_{n}", tile_shape(n)) for n in mats + vecs}
    S = {n: t.input(f"S_{n}", tile_shape(n)) for n in mats + vecs} if momentum else {}
    outers = {n: (t.input(f"out_{n}", tile_shape(n)), "const") for n in spec["outers"]}

    bind = token_bind(t, shapes, spec["gates"], outers, "tok", C)
    lr = t.input("lr", (C, 1))

    # ---- gradients at the chunk-start state, as factor sets: this chunk's rows, window history ----
    outs = {n: ir.outputs[f"grad.{n}"] for n in mats + vecs}
    # the rank-1 factors a b^T of each matrix's gradient, exposed as graph outputs by module.factor_outputs
    factors = {n: [(ir.outputs[f"factor.{n}.{i}.a"], ir.outputs[f"factor.{n}.{i}.b"])
                   for i in range(spec["factors"][n])] for n in mats}

    def gradient_rows(token_inputs: dict, rows: int, row_valid: int):
        low = _Lower(t, ir, sizes, rows, {**token_inputs, **{n: (A[n], "const") for n in A}}, valid=row_valid)
        done = low.emit([x for n in mats for pair in factors[n] for x in pair] + [outs[n] for n in vecs])
        pairs = {n: [(low.as_rows(done[a], tile_shape(n)[0]), low.as_rows(done[b], tile_shape(n)[1]))
                     for a, b in factors[n]] for n in mats}
        return pairs, {n: low.as_rows(done[outs[n]], tile_shape(n)[1]) for n in vecs}

    sets = [gradient_rows(bind, C, valid)]
    if Hh:
        hist_valid = t.input("hist_valid", (Hh, 1), boolean=True)
        sets.append(gradient_rows(token_bind(t, shapes, spec["gates"], outers, "hist", Hh), Hh, hist_valid))

    # ---- coefficients -------------------------------------------------------------------------
    lr_row = t.trans(lr)
    if spec["retain"]:
        D, abar = decay_coefficients(t, t.input("keep", (C, 1)), C)
    else:
        D, abar = t.where(lower, one, zero), one
    f = Ks = mbar = None
    if spec["scale"] is not None:
        Kc = t.where(lower, t.mul(t.input("scale", (C, 1)), lr_row), zero)
    elif momentum:
        Mmu, mbar = decay_coefficients(t, t.input("mu", (C, 1)), C)
        Kc = t.mul(t.dot(D, Mmu), lr_row)
        Ks = t.mul(Mmu, lr_row)
        f = t.sum(t.mul(D, t.trans(mbar)), axis=1)
    else:
        Kc = t.mul(D, lr_row)

    # the window: mix[j, l] = gamma_l on the band l in (j - c, j], for this chunk's rows and history
    mixes = [None]
    if weight and not Hh:  # a window of one token still weighs its gradient (runtime_torch.window_mix)
        mixes = [t.where(t.mask("band", 1, C), t.trans(bind[weight][0]), zero)]
    if Hh:
        gammas = [bind[weight][0], t.inputs[f"hist_{weight}"]] if weight else [one, one]
        cur = t.where(t.mask("band", c, C), t.trans(gammas[0]), zero)
        hist = t.where(t.mask("hband", c, C, Hh), t.trans(gammas[1]), zero)
        mixes = [cur, hist]
    coef = [t.dot(Kc, m) if m is not None else Kc for m in mixes]             # per factor set
    coef_s = [t.dot(Ks, m) if m is not None else Ks for m in mixes] if Ks is not None else None

    # ---- the read: every matrix as a dual weight ----------------------------------------------
    # coefficients of the state each position reads: A_i ("after") or A_{i-1} ("before": every
    # coefficient shifted down one row; row 0 reads A0 itself)
    ra, rf, rK = abar, f, coef
    if read_order == "before":
        down = t.where(t.input("shift", (C, C), boolean=True), one, zero)
        first = t.where(t.input("first", (C, 1), boolean=True), one, zero)
        if t.nodes[abar].op != "const":
            ra = t.add2(t.dot(down, abar), first)
        rf = t.dot(down, f) if f is not None else None
        rK = [t.dot(down, k) for k in coef]

    def dual(n: str):
        def apply(x: int) -> int:
            out = t.mul(ra, t.dot(x, t.trans(A[n])))
            if rf is not None:
                out = t.add2(out, t.mul(rf, t.dot(x, t.trans(S[n]))))
            for k, (pairs, _) in zip(rK, sets, strict=True):
                for a, b in pairs[n]:
                    out = t.sub(out, t.dot(t.mul(k, t.dot(x, t.trans(b))), a))
            return out
        return apply

    low = _Lower(t, ir, sizes, C, bind)
    read_bind = dict(bind)
    duals = {}
    if read_order == "chunk_start":  # every position reads the chunk-start state: plain products
        read_bind.update({n: (A[n], "const") for n in A})
    else:
        for nid in ir.g.nodes:
            node = ir.node(nid)
            if node.op == "input" and node.attr("name") in mats:
                read_bind[node.attr("name")] = (A[node.attr("name")], "dual")
                duals[nid] = dual(node.attr("name"))
        for n in vecs:
            r = t.mul(ra, A[n])
            if rf is not None:
                r = t.add2(r, t.mul(rf, S[n]))
            for k, (_, rows_u) in zip(rK, sets, strict=True):
                r = t.sub(r, t.dot(k, rows_u[n]))
            read_bind[n] = (low.mask(r), "tok")
    reader = _Lower(t, ir, sizes, C, read_bind, duals)
    y, _ = reader.emit([ir.outputs["read"]])[ir.outputs["read"]]
    t.outputs["y"] = low.mask(y)

    # ---- the end-of-chunk state -----------------------------------------------------------------
    def last_row(x: int) -> int:  # row `last` of a tile, as a [1, n] row
        return t.sum(t.where(is_last, x, zero), axis=0)

    a_last = last_row(abar if t.shape(abar)[0] == C else t.expand(abar, (C, 1)))
    f_last = last_row(f) if f is not None else None
    m_last = last_row(mbar) if mbar is not None else None

    def update(n: str, coefs: list[int]) -> int:
        total = None
        for k, (pairs, rows_u) in zip(coefs, sets, strict=True):
            k_last = t.trans(last_row(k))
            terms = [t.sum(t.mul(k_last, rows_u[n]), axis=0)] if n in vecs else \
                [t.dot(t.trans(t.mul(a, k_last)), b) for a, b in pairs[n]]
            for term in terms:
                total = term if total is None else t.add2(total, term)
        return total

    for n in mats + vecs:
        new_a = t.mul(a_last, A[n])
        if f_last is not None:
            new_a = t.add2(new_a, t.mul(f_last, S[n]))
        t.outputs[f"A_{n}"] = t.sub(new_a, update(n, coef))
        if momentum:
            t.outputs[f"S_{n}"] = t.sub(t.mul(m_last, S[n]), update(n, coef_s))
    return t
