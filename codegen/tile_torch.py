"""Tile graphs printed as batched torch code: the CPU backend of the generated chunk kernels.

The Triton kernels (triton_gen.py) run one program per (batch, head) and walk its chunks. Here the
same forward and backward tile graphs are printed as torch statements on [..., r, c] tensors that
hold every program at once, and each node is placed by what it depends on:

    setup   masks, outer constants: computed once                           [r, c] / [H, 1, r, c]
    pre     no carried value: every chunk at once, before the loop          [B, H, NC, r, c]
    loop    what the carried value needs (forward: the state; backward:   [B, H, 1, r, c]
            the state cotangent), one chunk per iteration
    post    the rest, every chunk at once, after the loop (from per-chunk   [B, H, NC, r, c]
            buffers of the loop values it reads)

So the forward loop holds only the state recurrence (the read runs after it, from the saved
chunk-start states), and the backward loops only over the state cotangent. `_Plan` places the nodes
(with a few cost rules: state-sized values stay in the loop when only the loop needs them, large
loop values are reduced inside it rather than buffered); `_Fusion` (tile_torch_fusion.py) decides
which nodes print inside others; `print_program` writes the function. tile_torch_kernel.py runs it
with the Triton kernels' calling convention.

Sizes: tile widths are still padded to powers of two (the graph's column masks keep padding at
zero), but no width or chunk needs to be a power of two or ≥ 16 here: tl.dot's limits do not apply.
`_specialise_full` gives the variant for sequences whose length is a multiple of the chunk (the
valid-row masks vanish, the last row is a slice).
"""

from __future__ import annotations

import itertools
import re

import sympy as sp

from .chunk_tiles import Unsupported
from .tile_ir import Tile, TileGraph, X
from .tile_torch_fusion import VIEWS, _bidiagonal, _fewer_passes, _Fusion, _InPlace, _Named
from .torch_activations import fold_activations


def _specialise_full(g: TileGraph) -> TileGraph:
    """A copy of `g` for full chunks: every row valid (where(valid, a, b) is a), and the last row of a
    tile is a slice (sum(where(is_last, x, 0), axis 0) is `lastrow(x)`)."""
    out = TileGraph()
    out.inputs, out.boolean, out.mask_defs = {}, set(), dict(g.mask_defs)
    new: dict[int, int] = {}
    valid, last = g.inputs.get("valid"), g.inputs.get("is_last")
    for i, t in enumerate(g.nodes):
        args = tuple(new[a] for a in t.args)
        if t.op == "where" and t.args[0] == valid:
            new[i] = out.expand(args[1], t.shape) if out.shape(args[1]) != t.shape else args[1]
            continue
        if t.op == "sum" and t.attrs == (0,):
            w = g.nodes[t.args[0]]
            zero = g.nodes[w.args[2]] if w.op == "where" else None
            if w.op == "where" and w.args[0] == last and zero.op == "const" and zero.attrs[0] == 0.0:
                x = new[w.args[1]]
                if out.shape(x)[0] == 1:
                    new[i] = out.expand(x, t.shape) if out.shape(x) != t.shape else x
                else:
                    new[i] = out.add(Tile("lastrow", (x,), t.shape))
                continue
        new[i] = out.add(Tile(t.op, args, t.shape, t.attrs))
        if t.op == "input":
            out.inputs[t.attrs[0]] = new[i]
        if i in g.boolean:
            out.boolean.add(new[i])
    out.outputs = {n: new[i] for n, i in g.outputs.items()}
    out._renamed = new  # old id -> new id, for the caller's result nodes
    return out


def _statement(g: TileGraph, i: int, ref, fuse: _Fusion | None = None, hoist=None, inplace: bool = False) -> str:
    """`t<i> = ...`: one tile op on tensors with any leading batch dims (the tile is the last two). `inplace`:
    an elementwise expression writes its intermediates into its own temporaries (full-sequence passes)."""
    t = g.nodes[i]
    a = [ref(j) for j in t.args]
    m, n = t.shape
    if t.op == "ew" and fuse and i in fuse.addmm_t:
        # p ± (q + (x @ y)) ^ T: p ± q^T ± y^T @ x^T (or p ± q^T ± x @ y when the addmm held (x @ y)^T)
        other, inner, beta, alpha, _, temp = fuse.addmm_t[i]
        q, dot, beta_s, alpha_s, tr, _ = fuse.addmm[inner]
        if q in fuse.folded:
            (x, sx), (y, sy) = (fuse.operand(j, ref) for j in g.nodes[q].args)
            base = f"_addmm({ref(other)}, {y}.transpose(-1, -2), {x}.transpose(-1, -2), {beta!r}, " \
                f"{alpha * beta_s * sx * sy!r}{', True' if temp else ''})"
        else:
            p = ref(other) if beta == 1 else f"{beta!r} * {ref(other)}"
            base = f"torch.add({p}, {ref(q)}.transpose(-1, -2), alpha={alpha * beta_s!r})"
        (x, sx), (y, sy) = (fuse.operand(j, ref) for j in g.nodes[dot].args)
        if not tr:
            x, y = f"{y}.transpose(-1, -2)", f"{x}.transpose(-1, -2)"
        rhs = f"_addmm({base}, {x}, {y}, 1.0, {alpha * alpha_s * sx * sy!r}, True)"
    elif t.op == "ew" and fuse and i in fuse.addmm:
        other, dot, beta, alpha, tr, temp = fuse.addmm[i]
        (x, sx), (y, sy) = (fuse.operand(j, ref) for j in g.nodes[dot].args)
        if tr:  # (x @ y)^T = y^T @ x^T
            x, y = f"{y}.transpose(-1, -2)", f"{x}.transpose(-1, -2)"
        rhs = f"_addmm({ref(other)}, {x}, {y}, {beta!r}, {alpha * sx * sy!r}{', True' if temp else ''})"
    elif fuse and i in fuse.subdiag:
        xj, yj, sign = fuse.subdiag[i]
        (x, sx), (y, sy) = fuse.operand(xj, ref), fuse.operand(yj, ref)
        below = f"torch.nn.functional.pad({y}.transpose(-1, -2)[..., :-1, :], (0, 0, 1, 0))"  # row i: y[:, i-1]
        rhs = f"({x} * {below}).sum(-1, keepdim=True)" + (".neg_()" if sign * sx * sy < 0 else "")
    elif fuse and i in fuse.inner:
        x, y = (ref(j) for j in fuse.inner[i])
        rhs = f"({x} * {y}).sum((-2, -1), keepdim=True)"  # einsum would copy both operands
    elif t.op == "ew":
        expr, leaves = fuse.expr(i) if fuse else (t.attrs[0], list(t.args))
        expr, names = fold_activations(expr), [ref(j) for j in leaves]
        if hoist is not None:
            expr, names = hoist(expr, leaves, names)
        rhs = (_InPlace if inplace else _Named)(names).doprint(expr)
    elif t.op == "dot":
        k = g.shape(t.args[0])[1]
        (x, sx), (y, sy) = (fuse.operand(j, ref) if fuse else (ref(j), 1) for j in t.args)
        rhs = f"{x} * {y}" if k == 1 else f"torch.matmul({x}, {y})"
        if sx * sy < 0:
            rhs = f"({rhs}).neg_()"
    elif t.op == "trans":  # of a constant (an unweighted window's weight): the constant tile itself
        rhs = (f"torch.full(({m}, {n}), {a[0]}, dtype=DT)" if g.nodes[t.args[0]].op == "const"
               else f"{a[0]}.transpose(-1, -2)")
    elif t.op == "sum":
        rhs = f"{a[0]}.sum({t.attrs[0] - 2}, keepdim=True)"
    elif t.op == "cumsum":
        axis, reverse = t.attrs
        d = axis - 2
        rhs = f"{a[0]}.flip({d}).cumsum({d}).flip({d})" if reverse else f"{a[0]}.cumsum({d})"
    elif t.op == "where":
        rhs = f"torch.where({a[0]}, {a[1]}, {a[2]})"
        if all(g.nodes[j].op == "const" for j in t.args[1:]):
            rhs += ".to(DT)"
    elif t.op == "expand":
        if g.nodes[t.args[0]].op == "const":
            rhs = f"torch.full(({m}, {n}), {a[0]}, dtype=DT)"
        else:
            rhs = f"{a[0]}.expand(*{a[0]}.shape[:-2], {m}, {n})"
    elif t.op == "lastrow":
        rhs = f"{a[0]}[..., -1:, :]"
    elif t.op == "kron":
        rhs = f"({a[0]}.unsqueeze(-1) * {a[1]}.unsqueeze(-2)).flatten(-2)"
    elif t.op == "kron_da":
        rhs = f"({a[0]}.unflatten(-1, ({n}, {g.shape(t.args[1])[1]})) * {a[1]}.unsqueeze(-2)).sum(-1)"
    elif t.op == "kron_db":
        rhs = f"({a[0]}.unflatten(-1, ({g.shape(t.args[1])[1]}, {n})) * {a[1]}.unsqueeze(-1)).sum(-2)"
    elif t.op == "reshape":
        rhs = f"{a[0]}.reshape(*{a[0]}.shape[:-2], {m}, {n})"
    elif t.op == "bmm":
        mm, k, nn, ta, tb = t.attrs
        x = f"{a[0]}.unflatten(-1, ({k}, {mm})).transpose(-1, -2)" if ta else f"{a[0]}.unflatten(-1, ({mm}, {k}))"
        y = f"{a[1]}.unflatten(-1, ({nn}, {k})).transpose(-1, -2)" if tb else f"{a[1]}.unflatten(-1, ({k}, {nn}))"
        rhs = f"torch.matmul({x}, {y}).flatten(-2)"
    elif t.op == "permute":
        (d0, d1, d2), perm = t.attrs
        rhs = f"{a[0]}.unflatten(-1, ({d1}, {d2})).movedim({tuple(p - 3 for p in perm)}, {(-3, -2, -1)}).flatten(-2)"
    elif t.op == "place_cols":  # a slice and zero padding: what the Triton kernels gather (tile_triton)
        off, nb, src = t.attrs
        x = a[0]
        if g.nodes[t.args[0]].op == "const":  # a number here (poly features' constant 1): made a tile first
            x = f"torch.full({g.shape(t.args[0])}, {x}, dtype=DT)"
        rhs = f"torch.nn.functional.pad({x}[..., {src}:{src + nb}], ({off}, {n - off - nb}))"
    elif t.op == "gmax":
        rhs = f"{a[0]}.unflatten(-1, ({n}, {t.attrs[0]})).amax(-1)"
    elif t.op == "trinv" and _bidiagonal(g, t.args[0]) is not None:
        # (I + N)^-1 for a sub-diagonal N (chunk_tiles.decay_coefficients): D_ij = prod_{j<l<=i} -N_{l,l-1}, a
        # cumulative product down each column (forward substitution's own recurrence: the same products, no
        # batched triangular solve)
        col = ref(_bidiagonal(g, t.args[0]))
        rhs = f"torch.where(torch.ones({m}, {m}, dtype=torch.bool).tril(-1), -{col}, 1.0).cumprod(-2).tril()"
    elif t.op == "trinv":
        low = f"torch.where({a[1]}, {a[0]}, 0.0)"
        rhs = (f"torch.linalg.solve_triangular({low}, torch.eye({m}, dtype=DT).expand(*{a[0]}.shape[:-2], {m}, {m}), "
               "upper=False, unitriangular=True)")
    else:
        raise Unsupported(f"tile op {t.op} has no torch printing")
    return f"t{i} = {rhs}"


NAME = re.compile(r"\b(?:c_)?(?:[th]\d+|i_\w+)\b")
LARGE = 4096  # elements per program: a loop value this large is not buffered for a reduction after the loop


def _live(g: TileGraph, roots: list[int], stop: set[int]) -> list[int]:
    """The nodes the roots depend on, in program order, not looking behind the nodes in `stop`."""
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        i = todo.pop()
        if i not in seen:
            seen.add(i)
            if i not in stop:
                todo.extend(g.nodes[i].args)
    return sorted(seen)


class _Plan:
    """Which phase computes each node (see the module docstring), what the loop buffers for after it,
    and how nodes fuse. `given`: nodes the caller passes in (all chunks), not computed here."""

    def __init__(self, g: TileGraph, carried: dict[str, int], chunked: set[str], results: dict[str, int],
                 after_loop: bool = True, saved: tuple[str, ...] = (), given: frozenset[int] = frozenset()):
        self.g, self.carried, self.chunked, self.results, self.given = g, carried, chunked, results, given
        live = _live(g, list(results.values()) + list(carried.values()), set(given))
        dep_c, dep_k = set(), set(given)
        for i in live:
            t = g.nodes[i]
            if i in given:
                continue
            if t.op == "input":
                (dep_c if t.attrs[0] in carried else dep_k if t.attrs[0] in chunked else set()).add(i)
            elif any(a in dep_c for a in t.args):
                dep_c.add(i)
            elif any(a in dep_k for a in t.args):
                dep_k.add(i)
        in_loop = set(_live(g, list(carried.values()), set(given))) & dep_c if after_loop else dep_c
        def numel(j: int) -> int:
            return g.shape(j)[0] * g.shape(j)[1]
        level = {}
        for i in live:
            t = g.nodes[i]
            if i in given:
                level[i] = "given"
            elif t.op in ("input", "const"):
                level[i] = t.op
            elif i in dep_c:
                level[i] = "loop" if i in in_loop else "post"
            else:
                level[i] = "pre" if i in dep_k else "setup"
        # a large value (state-sized) computed before the loop only for the loop is computed in the loop:
        # one chunk's copy stays in cache, all chunks' copies would go through memory twice
        users: dict[int, set[int]] = {}
        for i in live:
            for a in g.nodes[i].args:
                users.setdefault(a, set()).add(i)
        for i in reversed(live):
            if level[i] == "pre" and numel(i) >= LARGE and i not in results.values() and \
                    users.get(i) and all(level[u] == "loop" for u in users[i]):
                level[i] = "loop"
        # a value after the loop that shrinks a large per-chunk loop value (a reduction, a product with a
        # chunk tile) is computed inside the loop instead: buffering its input for every chunk costs more
        free = set(saved) if after_loop else set()
        pulled: set[int] = set()
        for i in live:
            if level[i] != "post" or any(level[a] == "post" for a in g.nodes[i].args):
                continue
            def buffered(a: int) -> bool:  # reading `a` after the loop needs a buffer of it for every chunk
                while g.nodes[a].op in VIEWS and level[a] == "loop":
                    a = g.nodes[a].args[0]  # a view of a saved state is redone from the saved states
                if level[a] == "input":
                    return g.nodes[a].attrs[0] in carried and g.nodes[a].attrs[0] not in free
                return level[a] == "loop"
            if any((a in pulled or numel(a) >= LARGE) and numel(i) <= numel(a) and buffered(a)
                   for a in g.nodes[i].args):
                level[i] = "loop"
                pulled.add(i)
        post = [i for i in live if level[i] == "post"]
        # loop values the post phase reads: views of them are redone after the loop, the rest buffered
        redo: set[int] = set()
        while True:
            reads = {j for i in post + sorted(redo) for j in g.nodes[i].args} | set(results.values())
            more = {j for j in reads if level[j] == "loop" and g.nodes[j].op in VIEWS} - redo
            if not more:
                break
            redo |= more
        self.live, self.level, self.reads = live, level, reads
        self.post = sorted(set(post) | redo)
        self.keep = sorted(j for j in reads if level[j] == "loop" and j not in redo)
        self.starts = [n for n in carried if g.inputs[n] in reads or n in saved]
        roots = set(results.values()) | set(carried.values()) | set(self.keep) | redo
        roots |= {j for i in live for j in g.nodes[i].args if level.get(j) != level[i]}  # read across phases
        self.fuse = _Fusion(g, [i for i in live if i not in given], level, roots)

    def available(self) -> set[int]:
        """Nodes this program holds for every chunk at once, or could buffer cheaply (loop values no larger
        than a state: one more write per chunk, where recomputing them after the loop costs their GEMMs again):
        what a later program could be given instead of recomputing them."""
        state = max([LARGE] + [self.g.shape(self.g.inputs[n])[0] * self.g.shape(self.g.inputs[n])[1]
                               for n in self.carried])
        small = {i for i in self.live if self.level[i] == "loop" and self.g.nodes[i].op not in VIEWS
                 and self.g.shape(i)[0] * self.g.shape(i)[1] <= state}
        held = {i for i in self.live if self.level[i] in ("pre", "post")} | set(self.keep) | small
        return held - self.fuse.skip

    def ref(self, j: int, where: str) -> str:
        t = self.g.nodes[j]
        if t.op == "const":
            return repr(float(t.attrs[0]))
        var = f"i_{t.attrs[0]}" if t.op == "input" and j not in self.given else f"t{j}"
        if where == "loop" and (self.level[j] in ("pre", "given") or (t.op == "input" and t.attrs[0] in self.chunked)):
            return f"c_{var}"
        return var


def print_program(g: TileGraph, carried: dict[str, int], chunked: set[str], results: dict[str, int],
                  reverse: bool, name: str, after_loop: bool = True, saved: tuple[str, ...] = (),
                  given: frozenset[int] = frozenset()) -> str:
    """The source of `name(I, B, H, NC, DT)`. I maps input names to tensors: setup inputs [r, c] or
    [H, 1, r, c]; chunked inputs [B, H, NC, r, c]; carried inputs [B, H, 1, r, c] (their value at the
    first chunk); for every carried input n a buffer `start:n` [B, H, NC, r, c] that receives its
    value at each chunk's start (the forward's saved states); and `t<i>` for every given node. carried:
    {input name: the node holding its value for the next chunk}; results: per-chunk values, returned as
    [B, H, NC, r, c] (or broadcastable); the carried values after the last chunk come back as
    `final:<name>`. `reverse`: the loop runs from the last chunk to the first. `after_loop=False` keeps
    every carried-dependent value in the loop (small per-chunk ops instead of per-chunk buffers).
    `saved`: carried inputs whose `start:` buffer is filled even when nothing after the loop reads it."""
    plan = _Plan(g, carried, chunked, results, after_loop, saved, given)
    live, level, fuse, keep, starts, ref = plan.live, plan.level, plan.fuse, plan.keep, plan.starts, plan.ref

    # (name, its statement before the loop, sliced per chunk, a common subexpression only the statements
    # before the loop read)
    hoisted: list[tuple[str, str, bool, bool]] = []

    def hoist(expr: sp.Expr, leaves: list[int], names: list[str]):
        """Subexpressions of a loop statement that read no loop value are computed before the loop, for
        every chunk at once (e.g. gelu'' of a forward value in the backward)."""
        before = {X[k] for k, j in enumerate(leaves) if level[j] in ("pre", "given", "setup") or
                  (level[j] == "input" and g.nodes[j].attrs[0] not in carried)}
        names = list(names)

        def add(text: str, chunky: bool, temp: bool) -> str:
            same = [h for h, st, *_ in hoisted if st.split(" = ", 1)[1] == text]
            if same:
                return same[0]
            h = f"h{len(hoisted)}"
            hoisted.append((h, f"{h} = {text}", chunky, temp))
            return h

        def new(e: sp.Expr) -> sp.Expr:
            ks = sorted(int(x.name[1:]) for x in e.free_symbols)
            pre = [ref(leaves[k], "pre") if k < len(leaves) else "?" for k in range(max(ks) + 1)]
            chunky = any(ref(leaves[k], "loop") != ref(leaves[k], "pre") for k in ks)
            # a subexpression used twice (x² in gelu'') is one temporary; every pass writes into its own result
            temps, (e,) = sp.cse(_fewer_passes(e), symbols=(sp.Symbol(f"x{k}") for k in itertools.count(len(pre))))
            for _, sub in temps:
                pre.append(add(_InPlace(pre).doprint(sub), False, True))
            h = add(_InPlace(pre).doprint(e), chunky, False)
            names.append(f"c_{h}" if chunky else h)
            if len(names) > len(X):
                raise Unsupported("an elementwise expression over too many operands")
            return X[len(names) - 1]

        def pure(e: sp.Expr) -> bool:
            return bool(e.free_symbols) and e.free_symbols <= before and not e.is_Symbol

        def walk(e: sp.Expr) -> sp.Expr:
            if e.is_Atom:
                return e
            if pure(e):
                return new(e)
            if isinstance(e, (sp.Add, sp.Mul)):
                inner = [a for a in e.args if a.free_symbols and a.free_symbols <= before]
                rest = [walk(a) for a in e.args if not (a.free_symbols and a.free_symbols <= before)]
                if len(inner) >= 2 or (inner and not inner[0].is_Symbol):
                    return e.func(new(e.func(*inner)), *rest)
                return e.func(*inner, *rest)
            return e.func(*[walk(a) for a in e.args])
        return walk(expr), names

    def stmts(nodes: list[int], where: str) -> list[tuple[str, set[str]]]:
        out = []
        for i in nodes:
            if i in fuse.skip:
                continue
            # in the loop only state-sized values: the in-place helpers check shapes at run time (~1 µs a call)
            inplace = where != "loop" or g.shape(i)[0] * g.shape(i)[1] >= LARGE
            st = _statement(g, i, lambda j: ref(j, where), fuse, hoist if where == "loop" else None, inplace)
            out.append((st, set(NAME.findall(st.split(" = ", 1)[1]))))
        return out

    loop = [i for i in live if level[i] == "loop"]
    loop_stmts = stmts(loop, "loop")
    loop_reads = {j for i in loop for j in g.nodes[i].args} | set(carried.values())
    sliced = sorted(j for j in loop_reads if ref(j, "loop") != ref(j, "pre"))
    lines = [f"def {name}(I, B, H, NC, DT):"]
    lines += [f"    i_{n} = I[{n!r}]" for n in sorted(g.inputs) if g.inputs[n] in live and g.inputs[n] not in given]
    lines += [f"    t{j} = I['t{j}']" for j in sorted(given) if j in live]
    for n in starts:
        r, c = g.shape(g.inputs[n])
        lines.append(f"    S_{n} = I.get('start:{n}')")
        lines.append(f"    S_{n} = torch.empty(B, H, NC, {r}, {c}, dtype=DT) if S_{n} is None else S_{n}")
    tail = {ref(j, "pre") for j in loop_reads | plan.reads}
    before = stmts([i for i in live if level[i] in ("setup", "pre")], "pre")
    before += [(st, set(NAME.findall(st.split(" = ", 1)[1]))) for _, st, *_ in hoisted]
    lines += _with_dels(before, tail | {h for h, _, _, temp in hoisted if not temp})
    # ---- the loop: what the carried values need ------------------------------------------------------
    lines += [f"    L_t{j} = torch.empty(B, H, NC, {g.shape(j)[0]}, {g.shape(j)[1]}, dtype=DT)" for j in keep]
    # every per-chunk view is made once, before the loop (`u_x = x.split(1, 2)`; u_x[ci] is x[:, :, ci:ci + 1]):
    # a slice per chunk and tensor costs ~2 µs of dispatch, and at C=16 the backward loop reads ~30 of them
    read = [ref(j, "pre") for j in sliced] + [h for h, _, chunky, _ in hoisted if chunky]
    written = [f"S_{n}" for n in starts] + [f"L_t{j}" for j in keep]
    views = [f"u_{x}" for x in read + written]
    lines += [f"    u_{x} = {x}.split(1, 2)" for x in read + written]
    body = [f"c_{x} = u_{x}[ci]" for x in read]
    body += [f"u_S_{n}[ci].copy_(i_{n})" for n in starts]
    body += [st for st, _ in loop_stmts] + [f"u_L_t{j}[ci].copy_(t{j})" for j in keep]
    if carried:
        body.append(", ".join(f"i_{n}" for n in carried) + " = " + ", ".join(ref(carried[n], "loop") for n in carried))
    if body:  # a graph without a carried value (a test's decay tiles) has no loop
        lines.append(f"    for ci in {'range(NC - 1, -1, -1)' if reverse else 'range(NC)'}:")
        lines += ["        " + st for st in body]
    if views:  # the views would keep every full-sequence tensor they view alive after the loop
        lines.append("    del " + ", ".join(views))
    lines += [f"    final_{n} = i_{n}" for n in carried]
    lines += [f"    t{j} = L_t{j}" for j in keep] + [f"    i_{n} = S_{n}" for n in starts]
    # ---- after the loop: every chunk at once ---------------------------------------------------------
    lines += _with_dels(stmts(plan.post, "post"), {ref(j, "post") for j in results.values()})
    def result(j: int) -> str:  # a constant tile prints as a number (a 1 x 1 one always): results are tensors
        r = ref(j, "post")
        return r if r.isidentifier() else f"torch.full({tuple(g.shape(j))}, {r}, dtype=DT)"
    out = [f"{k!r}: {result(j)}" for k, j in results.items()] + [f"'final:{n}': final_{n}" for n in carried]
    lines.append("    return {" + ", ".join(out) + "}")
    return "\n".join(lines) + "\n"


def _with_dels(body: list[tuple[str, set[str]]], kept: set[str]) -> list[str]:
    """Statements with `del` of every temporary after its last read (full-sequence tiles are large)."""
    last: dict[str, int] = {}
    for k, (_, reads) in enumerate(body):
        for r in reads:
            last[r] = k
    out = []
    for k, (stmt, _) in enumerate(body):
        out.append("    " + stmt)
        dead = sorted(r for r, at in last.items() if at == k and r.startswith(("t", "h")) and r not in kept)
        if dead:
            out.append("    del " + ", ".join(dead))
    return out


__all__ = ["Unsupported", "print_program"]
