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
        T, V = kt.shape[2], kt.shape[3]
        Tc, Vc = tile
        top_row = {p: top[p].unsqueeze(2).expand(*top[p].shape[:2], T, *top[p].shape[2:]) for p in self.params}
        final, rows = {p: [] for p in self.params}, []
        steps_all = None
        if self.spec["linear"]:  # no gradient reads the memory: every step at once, at any anchor
            steps_all = self._steps({p: top[p].unsqueeze(2).unsqueeze(2) for p in self.params}, tok, lr,
                                    outers, sz)
        for v0 in range(0, V, Vc):
            v1 = min(v0 + Vc, V)
            cur = {p: left[p][:, :, v0:v1] for p in self.params}
            new_top, ys = {p: [] for p in self.params}, []
            for t0 in range(0, T, Tc):
                t1 = min(t0 + Tc, T)
                y, cur, bottom = self._tile(tok, kt, kv, lr, outers, sz, cur, top_row, steps_all, t0, t1, v0, v1)
                ys.append(y)
                for p in self.params:
                    new_top[p].append(bottom[p])
            rows.append(torch.cat(ys, dim=3))
            for p in self.params:
                top_row[p] = torch.cat(new_top[p], dim=2)
                final[p].append(cur[p])
        y = torch.cat(rows, dim=2).transpose(2, 3)  # [B, H, V, T, Dv] -> [B, H, T, V, Dv]
        return y, {p: torch.cat(final[p], dim=2) for p in self.params}

    def _tile(self, tok, kt, kv, lr, outers, sz, cur, top_row, steps_all, t0, t1, v0, v1):
        nt, nv = t1 - t0, v1 - v0
        n = nt * nv

        def cut(x):  # [B, H, T, V, ...] -> the tile's cells, variate-major: [B, H, nv * nt, ...]
            x = x[:, :, t0:t1, v0:v1].transpose(2, 3)
            return x.reshape(*x.shape[:2], n, *x.shape[4:])

        kt_t, kv_t = kt[:, :, t0:t1, v0:v1], kv[:, :, t0:t1, v0:v1]
        K = transfer(kt_t, kv_t)  # [B, H, n, n]
        cells = {name: cut(x) for name, x in tok.items()}
        A = {}
        for p in self.params:
            shape = cur[p].shape[3:]
            # what flows in: the left column through kt at t0, the row above through kv at v0
            src = torch.zeros(*kt.shape[:2], nv, nt, *shape, dtype=kt.dtype, device=kt.device)
            src = src.index_add(3, torch.tensor([0], device=kt.device),
                                (self._scalar(kt_t[:, :, 0], p) * cur[p]).unsqueeze(3))
            src = src.index_add(2, torch.tensor([0], device=kt.device),
                                (self._scalar(kv_t[:, :, :, 0], p) * top_row[p][:, :, t0:t1]).unsqueeze(2))
            A[p] = _apply(K, src.reshape(*src.shape[:2], n, *shape))  # the zero-update response
        if steps_all is not None:
            steps = {p: cut(s) for p, s in steps_all.items()}
        else:
            steps = self._steps(A, cells, cut(lr), outers, sz)
        A = {p: A[p] + _apply(K, steps[p]) for p in self.params}
        y = self._read(A, cells, outers, sz)
        y = y.reshape(*y.shape[:2], nv, nt, *y.shape[3:])
        grid = {p: A[p].reshape(*A[p].shape[:2], nv, nt, *A[p].shape[3:]) for p in self.params}
        return y, {p: g[:, :, :, -1] for p, g in grid.items()}, {p: g[:, :, -1] for p, g in grid.items()}

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


def transfer(kt, kv):
    """The tile's linear 2-D scan as one matrix: K[b, h, n(t, v), n(s, u)] = sum over monotone lattice paths
    from (s, u) to (t, v) of the product of the keeps they pass (kt per time step, kv per variate step),
    1 on the diagonal; n(t, v) = v * nt + t. kt, kv: [B, H, nt, nv]. Built as nv time scans (one per variate,
    a triangular decay matrix each) and a pass over variates."""
    nt, nv = kt.shape[2], kt.shape[3]
    n = nt * nv
    cum = torch.log(kt.clamp_min(1e-30)).cumsum(dim=2)  # [B, H, nt, nv]
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # [B, H, i, j, nv]
    mask = torch.ones(nt, nt, dtype=torch.bool, device=kt.device).tril()
    D = torch.exp(diff.masked_fill(~mask[:, :, None], -math.inf))  # D[i, j, v] = prod_{j < l <= i} kt[l, v]
    D = D.permute(0, 1, 4, 2, 3).contiguous()  # [B, H, nv, i, j]: a strided last axis sends bmm to a slow path
    eye = torch.eye(n, dtype=kt.dtype, device=kt.device).reshape(nv, nt, n)
    rows, prev = [], None
    # unbind once: indexing per variate would make the backward allocate a full-size zero gradient each time
    for v, (Dv, kvv) in enumerate(zip(D.unbind(2), kv.unbind(3), strict=True)):
        src = eye[v] if prev is None else kvv.unsqueeze(-1) * prev + eye[v]
        prev = Dv @ src
        rows.append(prev)
    return torch.cat(rows, dim=2)


def _apply(K, x):
    """K @ x over the cell axis for a state batch x: [B, H, n, *shape]."""
    flat = x.reshape(*x.shape[:3], -1)
    return (K @ flat).reshape(x.shape)
