# memdsl runtime (torch) for 2-D rules over time × variate (memdsl/twod.py, docs/language.md §12).
#
# Pure torch. A rule plugs in through the same emitted per-token functions as a 1-D rule (grads, read;
# the hyper-parameters come in already evaluated). Layout: tokens [B, H, T, V, D]; per-cell scalars
# [B, H, T, V]; a per-channel lr [B, H, T, V, ch]; states [B, H, *shape]; outers [H, *shape].
#
# Semantics of one direction (variates in the given order), for every cell (t, v):
#   P[t, v]  = kt[t, v] * A[t-1, v] + kv[t, v] * A[t, v-1]          the retained state (two predecessors)
#   A[t, v]  = P[t, v] - lr[t, v] * grad loss(anchor[t, v]; k[t, v], v[t, v])
#   y[t, v]  = read(A[t, v]; q[t, v])
# with A[-1, v] = left[v] (the state carried in) and A[t, -1] = top (the initial memory).
#   exact:     anchor = P (the true 2-D recurrence; `wavefront` runs it anti-diagonal by anti-diagonal)
#   anchored:  the grid is cut into tiles of Tc × Vc cells; anchor = the tile's zero-update response,
#              i.e. P computed with every update inside the tile left out: the boundary states propagated
#              by the linear retention alone. All gradients of a tile are then parallel, and the tile's
#              linear part is one transfer matrix K (a 2-D scan: a time scan per variate, a short pass
#              over variates). At a 1 × 1 tile the anchor is P: the exact rule.
# When no gradient reads the memory (SSM-like rules) the anchor does not matter and the tiled program is
# exact for every tile: the exact parallel 2-D scan.
import math

import torch


def _align(coef, rank, axis):
    """A [..., ch] coefficient shaped to broadcast against a state [..., *shape] (ch = 1: a scalar)."""
    if coef.shape[-1] == 1:
        return coef.reshape(*coef.shape[:-1], *([1] * rank))
    if axis == "row" and rank == 2:
        return coef.unsqueeze(-1)
    return coef.reshape(*coef.shape[:-1], *([1] * (rank - 1)), coef.shape[-1])


class Runtime2D:
    """The three executions of a 2-D rule: `wavefront` (exact), `tiles` (2-D chunkwise), `anchored_loop`
    (the token-serial oracle of the tiled model). `spec` needs `params` ({name: {"rank", "axis"}}) and
    `linear` (True when no gradient reads the memory); `fns` are the rule's emitted `grads` and `read`."""

    def __init__(self, spec, fns):
        self.spec = spec
        self.params = list(spec["params"])
        self.grads_fn, self.read_fn = fns["grads"], fns["read"]

    # ---- per-cell helpers ----------------------------------------------------------------------
    def _rank(self, p):
        return self.spec["params"][p]["rank"]

    def _lr(self, lr, p):
        return _align(lr, self._rank(p), self.spec["params"][p]["axis"])

    def _scalar(self, x, p):
        return x.reshape(*x.shape, *([1] * self._rank(p)))

    def _env(self, cells, outers):
        """cells: {name: [B, H, n, ...]} tokens and gates of n cells; outers broadcast over cells."""
        H = next(iter(cells.values())).shape[1]
        env = dict(cells)
        env.update({n: o.reshape(1, H, 1, *o.shape[1:]) for n, o in outers.items()})
        return env

    def _grads(self, anchors, cells, outers, sz):
        env = self._env(cells, outers)
        env.update(anchors)
        return self.grads_fn(env, sz)

    def _read(self, states, cells, outers, sz):
        env = self._env(cells, outers)
        env.update(states)
        return self.read_fn(env, sz)["read"]

    def _steps(self, anchors, cells, lr, outers, sz):
        """-lr * grad at the given anchors, per param: [B, H, n, *shape]."""
        g = self._grads(anchors, cells, outers, sz)
        return {p: -self._lr(lr, p) * g[f"grad.{p}"] for p in self.params}

    # ---- exact: anti-diagonal wavefront ---------------------------------------------------------
    def wavefront(self, tok, kt, kv, lr, outers, sz, left, top):
        """tok: {name: [B, H, T, V, ...]}; kt, kv: [B, H, T, V]; lr: [B, H, T, V, ch];
        left: {p: [B, H, V, *shape]}; top: {p: [B, H, *shape]}. Returns y [B, H, T, V, Dv], last column."""
        T, V = kt.shape[2], kt.shape[3]
        dev = kt.device
        vs = torch.arange(V, device=dev)
        R = dict(left)  # R[v] = A[d - v, v] on the current anti-diagonal d (left[v] while d - v < 0)
        final = dict(left)
        ys = []
        for d in range(T + V - 1):
            ts = d - vs
            valid = (ts >= 0) & (ts < T)
            tc = ts.clamp(0, T - 1)
            cells = {n: x[:, :, tc, vs] for n, x in tok.items()}
            kt_d, kv_d, lr_d = kt[:, :, tc, vs], kv[:, :, tc, vs], lr[:, :, tc, vs]
            P = {}
            for p in self.params:
                up = torch.cat([top[p].unsqueeze(2), R[p][:, :, :-1]], dim=2)
                P[p] = self._scalar(kt_d, p) * R[p] + self._scalar(kv_d, p) * up
            steps = self._steps(P, cells, lr_d, outers, sz)
            new = {p: P[p] + steps[p] for p in self.params}
            ys.append(self._read(new, cells, outers, sz))
            for p in self.params:
                R[p] = torch.where(self._scalar(valid, p), new[p], R[p])
                final[p] = torch.where(self._scalar(ts == T - 1, p), new[p], final[p])
        Y = torch.stack(ys, dim=2)  # [B, H, T + V - 1, V, Dv]
        tt = torch.arange(T, device=dev)[:, None]
        return Y[:, :, tt + vs[None, :], vs[None, :]], final

    # ---- anchored (and, for linear rules, exact): the tile program ------------------------------
    def tiles(self, tok, kt, kv, lr, outers, sz, left, top, tile):
        """The 2-D chunkwise program. The sequential loop over tiles carries only what depends on a tile's
        boundary: the anchors (the boundary states through the tile's retention: one matrix per tile, built
        for all tiles at once), the gradients at the anchors, and the tile's 2-D scan of its steps. The read
        runs once over every cell. All parameters travel as one flat state [..., F]."""
        T, V = kt.shape[2], kt.shape[3]
        cut = _Tiler(T, V, min(tile[0], T), min(tile[1], V))
        Tc, Vc, nT, nV = cut.Tc, cut.Vc, cut.nT, cut.nV
        kt_b, kv_b = cut.blocks(kt), cut.blocks(kv)  # [B, H, tiles, Tc, Vc]
        D = decays(kt_b)  # [B, H, tiles, Vc, Tc, Tc]
        kvs = kv_b.transpose(-1, -2)  # [B, H, tiles, Vc, Tc]
        # unit sources where the boundary flows in: the left column at (0, u) through kt, the row above at
        # (s, 0) through kv; their responses are the columns of K_in [B, H, tiles, n, Vc + Tc]
        e_left = torch.zeros(Vc, Tc, Vc, dtype=kt.dtype, device=kt.device)
        e_left[torch.arange(Vc), 0, torch.arange(Vc)] = 1
        kt0, kv0 = kt_b[..., 0, :], kv_b[..., :, 0]  # [B, H, tiles, Vc], [B, H, tiles, Tc]
        # with one variate chunk the row above every tile is the initial memory: one source column for all of it
        # (Vc + 1 columns instead of Vc + Tc: a 3x smaller boundary scan and anchor product at tile 16 x 8, V = 7)
        collapse = nV == 1
        e_top = torch.zeros(Vc, Tc, 1 if collapse else Tc, dtype=kt.dtype, device=kt.device)
        e_top[0, torch.arange(Tc), 0 if collapse else torch.arange(Tc)] = 1
        src_top = e_top * (kv0[..., None, :, None] if collapse else kv0[..., None, None, :])
        src = torch.cat([(e_left * kt0[..., None, None, :]).expand(*src_top.shape[:-1], Vc), src_top], dim=-1)
        K_in = scan2d(D, kvs, src).flatten(-3, -2)
        shapes = {p: left[p].shape[3:] for p in self.params}
        flat = _Flat(self.params, shapes)
        left_f = cut.pad_variates(flat.join(left, 3))  # [B, H, V, F]
        top_f = flat.join(top, 2)  # [B, H, F]
        top_row = top_f.unsqueeze(2)  # [B, H, 1, F]
        top_in = [top_row if collapse else top_row.expand(*top_f.shape[:2], Tc, top_f.shape[-1])] * nT
        K_in_l, D_l, kvs_l = K_in.unbind(2), D.unbind(2), kvs.unbind(2)
        if self.spec["linear"]:  # no gradient reads the memory: every step at once, at any anchor, all scanned
            steps = self._steps({p: top[p].unsqueeze(2).unsqueeze(2) for p in self.params}, tok, lr, outers, sz)
            S = cut.cells(flat.join(steps, 4))  # [B, H, tiles, n, F]
            scanned_l = scan2d(D, kvs, S.unflatten(3, (Vc, Tc))).unbind(2)
        else:
            cells_l = {name: cut.cells(x).unbind(2) for name, x in tok.items()}
            lr_l = cut.cells(lr).unbind(2)
        A = [None] * (nT * nV)
        for j in range(nV):
            cur = left_f[:, :, j * Vc:(j + 1) * Vc]
            for i in range(nT):
                b = i * nV + j
                anchors = K_in_l[b] @ torch.cat([cur, top_in[i]], dim=2)  # [B, H, n, F]
                if self.spec["linear"]:
                    scanned = scanned_l[b]
                else:
                    steps = self._steps(flat.split(anchors, 3), {n: x[b] for n, x in cells_l.items()}, lr_l[b],
                                        outers, sz)
                    scanned = scan2d(D_l[b], kvs_l[b], flat.join(steps, 3).unflatten(2, (Vc, Tc)))
                grid = anchors.unflatten(2, (Vc, Tc)) + scanned  # [B, H, Vc, Tc, F]
                cur = grid[:, :, :, -1]
                if not collapse:
                    top_in[i] = grid[:, :, -1]
                A[b] = grid.flatten(2, 3)
        A = torch.stack(A, dim=2)  # [B, H, tiles, n, F]
        y = self._read(flat.split(A.flatten(2, 3), 3), {name: cut.cells(x).flatten(2, 3) for name, x in tok.items()},
                       outers, sz)
        y = cut.grid(y.reshape(*y.shape[:2], nT * nV, Tc * Vc, *y.shape[3:]))
        return y, flat.split(cut.grid(A)[:, :, T - 1, :V], 3)

    # ---- the oracle of the tiled model: token by token ------------------------------------------
    def anchored_loop(self, tok, kt, kv, lr, outers, sz, left, top, tile):
        T, V = kt.shape[2], kt.shape[3]
        Tc, Vc = tile
        A, ys = {}, {}

        def get(t, v):
            if t < 0:
                return {p: left[p][:, :, v] for p in self.params}
            if v < 0:
                return top
            return A[(t, v)]

        for v0 in range(0, V, Vc):
            for t0 in range(0, T, Tc):
                ghost = {}
                for v in range(v0, min(v0 + Vc, V)):
                    for t in range(t0, min(t0 + Tc, T)):
                        a, b = kt[:, :, t, v], kv[:, :, t, v]
                        gt = ghost[(t - 1, v)] if t > t0 else get(t - 1, v)
                        gv = ghost[(t, v - 1)] if v > v0 else get(t, v - 1)
                        ghost[(t, v)] = {p: self._scalar(a, p) * gt[p] + self._scalar(b, p) * gv[p]
                                         for p in self.params}
                        pt, pv = get(t - 1, v), get(t, v - 1)
                        cells = {n: x[:, :, t:t + 1, v] for n, x in tok.items()}
                        steps = self._steps({p: w.unsqueeze(2) for p, w in ghost[(t, v)].items()}, cells,
                                            lr[:, :, t:t + 1, v], outers, sz)
                        A[(t, v)] = {p: self._scalar(a, p) * pt[p] + self._scalar(b, p) * pv[p] + steps[p][:, :, 0]
                                     for p in self.params}
                        ys[(t, v)] = self._read({p: w.unsqueeze(2) for p, w in A[(t, v)].items()}, cells, outers,
                                                sz)[:, :, 0]
        y = torch.stack([torch.stack([ys[(t, v)] for v in range(V)], dim=2) for t in range(T)], dim=2)
        return y, {p: torch.stack([A[(T - 1, v)][p] for v in range(V)], dim=2) for p in self.params}


class _Flat:
    """Every parameter's state as one flat trailing axis, so the linear parts run once for all of them."""

    def __init__(self, params, shapes):
        self.params, self.shapes = params, shapes
        self.sizes = [math.prod(shapes[p]) for p in params]

    def join(self, states, lead):  # {p: [*lead, *shape]} -> [*lead, F]
        return torch.cat([states[p].reshape(*states[p].shape[:lead], -1) for p in self.params], dim=-1)

    def split(self, x, lead):  # [*lead, F] -> {p: [*lead, *shape]}
        parts = torch.split(x, self.sizes, dim=-1)
        return {p: part.reshape(*x.shape[:lead], *self.shapes[p]) for p, part in zip(self.params, parts, strict=True)}


class _Tiler:
    """Cuts a [B, H, T, V, ...] grid into tiles of Tc × Vc cells, each tile's cells variate-major
    (n(t, v) = v * Tc + t). A grid that the tile does not divide is padded by repeating its edge cells:
    padded cells come after every real cell along both axes, so nothing flows from them into a real one."""

    def __init__(self, T, V, Tc, Vc):
        self.T, self.V, self.Tc, self.Vc = T, V, Tc, Vc
        self.nT, self.nV = -(-T // Tc), -(-V // Vc)

    def _pad(self, x, dim, size, full):
        if full == size:
            return x
        return x.index_select(dim, torch.arange(full, device=x.device).clamp(max=size - 1))

    def pad_variates(self, w):  # [B, H, V, ...] -> [B, H, nV * Vc, ...]
        return self._pad(w, 2, self.V, self.nV * self.Vc)

    def _padded(self, x):
        return self._pad(self._pad(x, 2, self.T, self.nT * self.Tc), 3, self.V, self.nV * self.Vc)

    def blocks(self, x):  # [B, H, T, V] -> [B, H, tiles, Tc, Vc]
        B, H = x.shape[:2]
        x = self._padded(x).reshape(B, H, self.nT, self.Tc, self.nV, self.Vc).transpose(3, 4)
        return x.reshape(B, H, self.nT * self.nV, self.Tc, self.Vc)

    def cells(self, x):  # [B, H, T, V, *rest] -> [B, H, tiles, n, *rest]
        B, H, rest = x.shape[0], x.shape[1], x.shape[4:]
        x = self._padded(x).reshape(B, H, self.nT, self.Tc, self.nV, self.Vc, *rest)
        x = x.permute(0, 1, 2, 4, 5, 3, *range(6, 6 + len(rest)))
        return x.reshape(B, H, self.nT * self.nV, self.Vc * self.Tc, *rest)

    def grid(self, x):  # [B, H, tiles, n, *rest] -> [B, H, T, V, *rest]
        B, H, rest = x.shape[0], x.shape[1], x.shape[4:]
        x = x.reshape(B, H, self.nT, self.nV, self.Vc, self.Tc, *rest).permute(0, 1, 2, 5, 3, 4,
                                                                                *range(6, 6 + len(rest)))
        return x.reshape(B, H, self.nT * self.Tc, self.nV * self.Vc, *rest)[:, :, :self.T, :self.V]


def decays(kt):
    """Per variate, the time scan's decay matrix: D[..., v, i, j] = prod_{j < l <= i} kt[..., l, v] (0 above
    the diagonal). kt: [..., nt, nv] -> [..., nv, nt, nt], contiguous (a strided bmm is far slower)."""
    nt = kt.shape[-2]
    cum = torch.log(kt.clamp_min(1e-30)).cumsum(dim=-2)  # [..., nt, nv]
    diff = cum.unsqueeze(-2) - cum.unsqueeze(-3)  # [..., i, j, nv]
    mask = torch.ones(nt, nt, dtype=torch.bool, device=kt.device).tril()
    return torch.exp(diff.masked_fill(~mask[:, :, None], -math.inf)).movedim(-1, -3).contiguous()


def scan2d(D, kvs, src):
    """The tile's linear 2-D recurrence X[t, v] = kt X[t-1, v] + kv X[t, v-1] + src[t, v] from zero boundary
    states: a time scan per variate (D from `decays`), variate after variate. D [..., nv, nt, nt],
    kvs [..., nv, nt] (kv, variate-major), src [..., nv, nt, F] -> X [..., nv, nt, F]."""
    out, prev = [], None
    # unbind once: indexing per variate would make the backward allocate a full-size zero gradient each time
    for Dv, kvv, sv in zip(D.unbind(-3), kvs.unbind(-2), src.unbind(-3), strict=True):
        prev = Dv @ (sv if prev is None else kvv.unsqueeze(-1) * prev + sv)
        out.append(prev)
    return torch.stack(out, dim=-3)


def transfer(kt, kv):
    """The tile's linear 2-D scan as one matrix: K[..., n(t, v), n(s, u)] = sum over monotone lattice paths
    from (s, u) to (t, v) of the product of the keeps they pass (kt per time step, kv per variate step),
    1 on the diagonal; n(t, v) = v * nt + t. kt, kv: [..., nt, nv]. (The tile program applies it as
    `scan2d`; the matrix is for inspection and tests.)"""
    nt, nv = kt.shape[-2], kt.shape[-1]
    eye = torch.eye(nt * nv, dtype=kt.dtype, device=kt.device).reshape(nv, nt, nt * nv)
    return scan2d(decays(kt), kv.transpose(-1, -2), eye).flatten(-3, -2)
