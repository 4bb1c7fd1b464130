# memdsl runtime (torch): the generic execution algorithms for compiled memory rules.
#
# This file is pure torch and imports nothing from memdsl: `memdsl compile -o` copies it verbatim
# into standalone modules. A rule plugs in through SPEC (plain data) and four emitted functions:
#   grads(env, sz)  -> {"grad.<param>": d loss / d param}, per token, batched over leading axes
#   read(env, sz)   -> {"read": y}
#   hyper(env, sz)  -> learning rates, decays, keeps, scales (functions of gates and outers)
#   shapes(sz)      -> {"<param>": shape} and sizes(sz) -> every size, derived ones included
#
# Layout inside the runtime: tokens [B, H, T, D]; scalar gates [B, H, T]; channel gates
# [B, H, T, n]; state tensors [B, H, *shape]; outers [H, *shape]. Semantics (MATH.md §1.2–1.4):
#   anchor  = P(A) at the segment start (exact: the previous state)
#   g_t     = sum over the window of gamma_l * grad loss(anchor; k_l, v_l)
#   gd: delta = -lr g | momentum: S = mu S - lr g, delta = S | muon: S = mu S + g, delta = -lr NS(S)
#   A_t     = keep_t * A_{t-1} + rate_t * (A_init - A_{t-1}) + delta      (scale: A_0 + s_i * sum delta)
#   y_t     = read(P(A_t), q_t)        (P: identity, lq-normalise, row softmax, soft threshold)
#   clip    : each token's loss gradient (per param, before the window sum) scaled to norm <= clip
import math

import torch

_NS_COEFFS = (3.4445, -4.7750, 2.0315)  # the Muon quintic (Jordan et al.), as in titans-pytorch


def newton_schulz(x, steps):
    """Approximate the polar factor U V^T of each matrix in the batch (Muon's orthogonalisation)."""
    a, b, c = _NS_COEFFS
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def segments(T, chunk, lag, start=0):
    """Anchor segments [s, e) of positions start..T-1 (earlier positions are window history only).
    Memora's lag token splits each chunk into [1, chunk - 1]."""
    out = []
    for s in range(start, T, chunk):
        e = min(s + chunk, T)
        if lag and e - s > 1:
            out += [(s, s + 1), (s + 1, e)]
        else:
            out.append((s, e))
    return out


class TimeSplit:
    """A [B, H, T, ...] tensor cut once along time, indexed like `x[:, :, t]` or `x[:, :, lo:hi]`.

    Slicing a tensor per chunk (or per token) makes autograd allocate a full-length zero gradient
    for every slice: O(T^2 / C) memory traffic in the backward pass. Cutting once with
    `torch.split` makes the backward a single concatenation."""

    def __init__(self, x, cuts):
        self.x = x
        bounds = sorted({0, x.shape[2], *[c for c in cuts if 0 < c < x.shape[2]]})
        self.starts = bounds[:-1]
        self.pieces = torch.split(x, [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=2)

    @property
    def shape(self):
        return self.x.shape

    @property
    def dtype(self):
        return self.x.dtype

    @property
    def device(self):
        return self.x.device

    def __getitem__(self, key):
        _, _, idx = key
        if isinstance(idx, int):
            i = _bisect(self.starts, idx)
            return self.pieces[i][:, :, idx - self.starts[i]]
        lo, hi = idx.start or 0, self.x.shape[2] if idx.stop is None else idx.stop
        parts, i = [], _bisect(self.starts, lo)
        while i < len(self.pieces) and self.starts[i] < hi:
            a = self.starts[i]
            piece = self.pieces[i]
            b = a + piece.shape[2]
            parts.append(piece if (lo <= a and b <= hi) else piece[:, :, max(lo, a) - a: min(hi, b) - a])
            i += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _bisect(starts, t):
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _split_all(rt, cuts, q, k, v, gates, hyp):
    """Cut every time-indexed tensor once; returns them with the combined keep and l2 rate."""
    keep, rate = rt.keep_rate(hyp)
    hyp = {**hyp, "__keep": keep, "__rate": rate}
    hyp = {n: TimeSplit(h, cuts) for n, h in hyp.items() if h is not None}
    return (TimeSplit(q, cuts), TimeSplit(k, cuts), TimeSplit(v, cuts),
            {n: TimeSplit(g, cuts) for n, g in gates.items()}, hyp, hyp.get("__keep"), hyp.get("__rate"))


def _ratio(x):
    """R[..., i, j, :] = prod_{j < l <= i} x_l for j <= i, else 0, and the running product prod_{l <= i} x_l.
    x: [B, H, n, ch]. Positive factors (the usual case) multiply in log space, as the Triton kernels do, so
    the two paths round alike. A factor <= 0 — a float32 sigmoid saturates to exactly 1 past x ≈ 17, so a
    keep 1 - alpha becomes 0; or a rule whose keep can be negative — has no log: those chunks take the
    products in linear space, where cumprod's backward is exact even at zeros (a log of a clamped factor
    would silently drop the gradient, and a clamp would turn a negative keep into 1e-30)."""
    n = x.shape[2]
    idx = torch.arange(n, device=x.device)
    tril = (idx[:, None] >= idx[None, :])[None, None, :, :, None]
    if bool((x > 0).all()):
        cum = torch.log(x).cumsum(dim=2)
        diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # [B, H, i, j, ch]
        return torch.exp(diff.masked_fill(~tril, -math.inf)), torch.exp(cum)
    after = (idx[None, :] > idx[:, None])[None, None, :, :, None]  # [j, l]: l > j
    rows = torch.where(after, x.unsqueeze(2), torch.ones_like(x).unsqueeze(2))  # [B, H, j, l, ch]
    return rows.cumprod(dim=3).transpose(2, 3) * tril, x.cumprod(dim=2)


def _ratio_last(x):
    """The last row of `_ratio(x)` in O(n), what reads at the chunk start need (TNT's global memory, C_G =
    2048): R[..., n-1, j, :] as [B, H, 1, n, ch], the product up to n-1 as [B, H, 1, ch], and every running
    product [B, H, n, ch]."""
    if not bool((x > 0).all()):
        R, run = _ratio(x)
        return R[:, :, -1:], run[:, :, -1:], run
    # O(n) work, so in float64: a float32 cumsum over a 2048-token chunk loses ~|cum| * 6e-8 in every ratio
    cum = torch.log(x.double()).cumsum(dim=2)
    run = torch.exp(cum).to(x.dtype)
    return torch.exp(cum[:, :, -1:] - cum).unsqueeze(2).to(x.dtype), run[:, :, -1:], run


def _momentum_last(keep, mu):
    """Reads at the chunk start with momentum, in O(n): the last rows of D @ M (M = _ratio(mu)) and of M, of
    f = D @ mbar, and the last mbar. By a reverse log-cumsum-exp over l of D[n-1, l] * mbar_l:
    (D @ M)[n-1, j] = sum_{l >= j} D[n-1, l] mbar_l / mbar_j."""
    if not (bool((keep > 0).all()) and bool((mu > 0).all())):
        D, M, mbar = _ratio(keep)[0][:, :, -1:], *_ratio(mu)
        return (torch.einsum("bhilc,bhljc->bhijc", D, M), M[:, :, -1:], torch.einsum("bhilc,bhlc->bhic", D, mbar),
                mbar[:, :, -1])
    # O(n) work, so in float64: tail - cm subtracts two sums of ~n logs (float32 would lose ~|cm| * 6e-8)
    ck, cm = torch.log(keep.double()).cumsum(dim=2), torch.log(mu.double()).cumsum(dim=2)
    tail = (ck[:, :, -1:] - ck + cm).flip(2).logcumsumexp(dim=2).flip(2)  # log sum_{l >= j} D[n-1, l] mbar_l
    out = (torch.exp(tail - cm).unsqueeze(2), torch.exp(cm[:, :, -1:] - cm).unsqueeze(2), torch.exp(tail[:, :, :1]),
           torch.exp(cm[:, :, -1]))
    return tuple(t.to(keep.dtype) for t in out)


def clip_factor(sq, clip):
    """min(1, clip / sqrt(sq)) from a squared norm. Clamping before the sqrt keeps the backward finite
    at a zero gradient (d sqrt(0) = inf would otherwise meet a zero and give NaN)."""
    return clip / sq.clamp_min(clip * clip).sqrt()


class Runtime:
    def __init__(self, spec, fns):
        self.spec = spec
        self.grads_fn, self.read_fn, self.hyper_fn = fns["grads"], fns["read"], fns["hyper"]
        self.shapes_fn, self.sizes_fn = fns["shapes"], fns["sizes"]
        self.factors_fn = fns.get("factors")
        self.params = list(spec["params"])
        self.matrix_params = [p for p in self.params if len(spec["params"][p]["shape_rank"]) == 2]

    # ---- values at positions -------------------------------------------------------------------
    def hyper_values(self, gates, outers, sz, T, chunk, like, start=0):
        """Every hyper-parameter at every position: [B, H, T, ch] (ch = 1 for scalars)."""
        B, H = like.shape[:2]
        env = {n: g for n, g in gates.items()}
        env.update({n: o.reshape(1, H, 1, *o.shape[1:]) for n, o in outers.items()})
        pos = ((torch.arange(T, device=like.device) - start) % chunk + 1).to(like.dtype)
        env["pos"] = pos.reshape(1, 1, T)
        out = {}
        for name, value in self.hyper_fn(env, sz).items():
            value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
            if value.dim() == 3:  # a per-token scalar [B, H, T]
                value = value.reshape(*value.shape, 1)
            elif value.dim() < 3:  # a constant: a number, or a per-channel vector with no token in it
                value = value.reshape(1, 1, 1, -1)
            out[name] = value.expand(B, H, T, value.shape[-1])
        return out

    def align(self, coef, param, extra_lead=0):
        """Shape a [..., ch] coefficient to broadcast against a param [..., *shape] (channel axis rule)."""
        rank = len(self.spec["params"][param]["shape_rank"])
        ch = coef.shape[-1]
        if ch == 1:
            return coef.reshape(*coef.shape[:-1], *([1] * rank))
        axis = self.spec["params"][param]["channel_axis"]
        if axis == "row" and rank == 2:
            return coef.reshape(*coef.shape, 1)
        return coef.reshape(*coef.shape[:-1], *([1] * (rank - 1)), ch)

    def project(self, a, param, hyp_thr=None):
        kind = self.spec["projection"]
        rank = len(self.spec["params"][param]["shape_rank"])
        dims = tuple(range(-rank, 0))
        if kind == "lq":
            q = self.spec["lq"]
            # floor the sum before the root: at a zero state d(s^(1/q))/ds = inf would meet a zero gradient (NaN)
            norm = a.abs().pow(q).sum(dim=dims, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
            norm = norm.pow(1.0 / q).clamp_min(1e-12)
            return a / norm.pow(q - 2)
        if kind == "softmax":
            return a.softmax(dim=-1)
        if kind == "elastic":
            return torch.sign(a) * torch.relu(a.abs() - hyp_thr)
        return a

    def token_grads(self, grads, A, n):
        """Every per-parameter gradient as [B, H, n, *shape]: a gradient that does not depend on the token
        (a bias under a linear loss: a constant) comes back from the generated code without those axes."""
        out = dict(grads)
        for p in self.params:
            key = f"grad.{p}"
            if key in out:
                out[key] = torch.as_tensor(out[key], dtype=A[p].dtype, device=A[p].device).expand(
                    *A[p].shape[:2], n, *A[p].shape[2:])
        return out

    def token_env(self, k, v, q, gates, outers, sl):
        H = k.shape[1]
        env = {"k": k[:, :, sl], "v": v[:, :, sl], "q": q[:, :, sl]}
        env.update({n: g[:, :, sl] for n, g in gates.items()})
        env.update({n: o.reshape(1, H, 1, *o.shape[1:]) for n, o in outers.items()})
        return env

    def clip(self, g, param):
        """A per-token gradient [..., n, *shape] scaled to Frobenius norm <= spec["clip"]."""
        clip = self.spec.get("clip")
        if clip is None:
            return g
        rank = len(self.spec["params"][param]["shape_rank"])
        sq = g.pow(2).sum(dim=tuple(range(-rank, 0)), keepdim=True)
        return g * clip_factor(sq, clip)

    def threshold(self, hyp, param):
        name = self.spec.get("threshold")
        if name is None:
            return None
        return self.align(hyp[name][:, :, :1], param)[:, :, 0]

    # ---- state ---------------------------------------------------------------------------------
    def keep_rate(self, hyp):
        keep = rate = None
        for r in self.spec["retain"]:
            if r.get("keep"):
                keep = hyp[r["keep"]] if keep is None else keep * hyp[r["keep"]]
            if r.get("rate"):
                rate = hyp[r["rate"]]
        if rate is not None:
            keep = (1 - rate) if keep is None else keep * (1 - rate)
        return keep, rate

    # ---- the token loop: exact (chunk = 1) and the anchored oracle (chunk = C) -------------------
    def token_loop(self, q, k, v, gates, outers, state, sz, chunk, start=0, read_order=None):
        spec = self.spec
        read_order = read_order or spec["read_order"]
        T = q.shape[2]
        hyp = self.hyper_values(gates, outers, sz, T, chunk, q, start)
        q, k, v, gates, hyp, keep, rate = _split_all(self, range(T), q, k, v, gates, hyp)
        lr = hyp[spec["lr"]]
        mu = hyp[spec["decay"]] if spec["decay"] else None
        scale = hyp[spec["scale"]] if spec["scale"] else None
        c, weight = spec["window"], spec["window_weight"]
        A = {p: state[f"A.{p}"] for p in self.params}
        S = {p: state[f"S.{p}"] for p in self.params} if spec["optim"] != "gd" else {}
        init = {p: state[f"init.{p}"] for p in self.params} if rate is not None else {}
        starts = {s for s, _ in segments(T, chunk, spec["lag"], start)}
        ys = []
        for t in range(start, T):
            if t in starts:
                anchor = {p: self.project(A[p], p, self.threshold(hyp, p)) for p in self.params}
                base = dict(A)
                acc = {p: torch.zeros_like(A[p]) for p in self.params}
                cum_keep = torch.ones_like(hyp[spec["lr"]][:, :, t])
            if spec["grad_at_decayed"]:
                cum_keep = cum_keep * keep[:, :, t]
            lo = max(0, t - c + 1)
            env = self.token_env(k, v, q, gates, outers, slice(lo, t + 1))
            for p in self.params:
                w = anchor[p]
                if spec["grad_at_decayed"]:
                    w = self.align(cum_keep, p) * w
                env[p] = w.unsqueeze(2)
            grads = self.token_grads(self.grads_fn(env, sz), A, t + 1 - lo)
            old = A if read_order != "after" else None
            if old is not None:  # before: the previous state; chunk_start: the segment's anchor (TNT's global read)
                read_w = anchor if read_order == "chunk_start" else \
                    {p: self.project(A[p], p, self.threshold(hyp, p)) for p in self.params}
                ys.append(self.read_at(read_w, q, k, v, gates, outers, sz, slice(t, t + 1)))
            newA = {}
            for p in self.params:
                g = self.clip(grads[f"grad.{p}"], p)
                if weight is not None:
                    g = g * self.align(gates[weight][:, :, lo:t + 1].unsqueeze(-1), p)
                g = g.sum(dim=2)
                lr_t = self.align(lr[:, :, t], p)
                if spec["optim"] == "gd":
                    delta = -lr_t * g
                elif spec["optim"] == "momentum":
                    S[p] = self.align(mu[:, :, t], p) * S[p] - lr_t * g
                    delta = S[p]
                else:
                    S[p] = self.align(mu[:, :, t], p) * S[p] + g
                    delta = -lr_t * newton_schulz(S[p], spec["ns_steps"])
                if scale is not None:
                    acc[p] = acc[p] + delta
                    newA[p] = base[p] + self.align(scale[:, :, t], p) * acc[p]
                else:
                    a = A[p] if keep is None else self.align(keep[:, :, t], p) * A[p]
                    if rate is not None:
                        a = a + self.align(rate[:, :, t], p) * init[p]
                    newA[p] = a + delta
            A = newA
            if old is None:
                ys.append(self.read_at({p: self.project(A[p], p, self.threshold(hyp, p)) for p in self.params},
                                       q, k, v, gates, outers, sz, slice(t, t + 1)))
        out = {f"A.{p}": A[p] for p in self.params}
        out.update({f"S.{p}": S[p] for p in S})
        out.update({f"init.{p}": init[p] for p in init})
        return torch.cat(ys, dim=2), out

    def read_at(self, weights, q, k, v, gates, outers, sz, sl):
        env = self.token_env(k, v, q, gates, outers, sl)
        for p in self.params:
            w = weights[p]
            env[p] = w if w.dim() == 2 + len(self.spec["params"][p]["shape_rank"]) + 1 else w.unsqueeze(2)
        return self.read_fn(env, sz)["read"]

    # ---- the anchored chunk program -------------------------------------------------------------
    def coef_apply(self, coef, x, p):
        """sum_j coef[b, h, i, j, ch] * x[b, h, j, *shape] with the channel axis aligned to param p."""
        rank = len(self.spec["params"][p]["shape_rank"])
        if coef.shape[-1] == 1:
            return torch.einsum("bhij,bhj...->bhi...", coef[..., 0], x)
        axis = self.spec["params"][p]["channel_axis"]
        if rank == 1:
            return torch.einsum("bhijn,bhjn->bhin", coef, x)
        if axis == "row":
            return torch.einsum("bhijm,bhjmk->bhimk", coef, x)
        return torch.einsum("bhijk,bhjmk->bhimk", coef, x)

    def prologue(self, q, k, v, gates, outers, sz, chunk, start):
        """What every chunk program starts with: hyper-parameters, anchor segments, the time split."""
        T = q.shape[2]
        hyp = self.hyper_values(gates, outers, sz, T, chunk, q, start)
        segs = segments(T, chunk, self.spec["lag"], start)
        return (segs, *_split_all(self, [s for s, _ in segs], q, k, v, gates, hyp))

    def window_mix(self, gates, lo, s, e, like):
        """mix[i, l]: how much the gradient of window token lo + l counts for position s + i (banded)."""
        c, weight = self.spec["window"], self.spec["window_weight"]
        cols = torch.arange(lo, e, device=like.device)
        rows = torch.arange(s, e, device=like.device)
        mix = ((cols[None, :] <= rows[:, None]) & (cols[None, :] > rows[:, None] - c)).to(like.dtype)
        mix = mix.expand(*like.shape[:2], e - s, e - lo)
        return mix * gates[weight][:, :, lo:e].unsqueeze(2) if weight is not None else mix

    def chunkwise(self, q, k, v, gates, outers, state, sz, chunk, start=0, read_order=None):
        spec = self.spec
        read_order = read_order or spec["read_order"]
        segs, q, k, v, gates, hyp, keep, rate = self.prologue(q, k, v, gates, outers, sz, chunk, start)
        lr_all = hyp[spec["lr"]]
        c, weight = spec["window"], spec["window_weight"]
        A = {p: state[f"A.{p}"] for p in self.params}
        S = {p: state[f"S.{p}"] for p in self.params} if spec["optim"] != "gd" else {}
        init = {p: state[f"init.{p}"] for p in self.params} if rate is not None else {}
        ys = []
        for s, e in segs:
            n = e - s
            lo = max(0, s - c + 1)
            sl = slice(s, e)
            lr = lr_all[:, :, sl]
            ones = torch.ones_like(lr[..., :1])
            D, abar = _ratio(keep[:, :, sl] if keep is not None else ones)  # prod_{j<l<=i} keep_l, prod_{l<=i}
            env = self.token_env(k, v, q, gates, outers, slice(lo, e))
            for p in self.params:
                w = self.project(A[p], p, self.threshold(hyp, p)).unsqueeze(2)
                if spec["grad_at_decayed"]:
                    w = self.align(abar, p) * w
                env[p] = w
            U = self.token_grads(self.grads_fn(env, sz), A, e - lo)
            U = {f"grad.{p}": self.clip(U[f"grad.{p}"], p) for p in self.params}
            if c > 1 or weight is not None:
                mix = self.window_mix(gates, lo, s, e, lr)
                G = {p: torch.einsum("bhjl,bhl...->bhj...", mix, U[f"grad.{p}"]) for p in self.params}
            else:
                G = {p: U[f"grad.{p}"] for p in self.params}
            if spec["optim"] == "momentum" or spec["optim"] == "muon":
                Mmu, mbar = _ratio(hyp[spec["decay"]][:, :, sl])
            if read_order == "chunk_start":  # reads use the chunk start: only the last row of A is needed
                D, abar = D[:, :, -1:], abar[:, :, -1:]
            newA = {}
            for p in self.params:
                if spec["optim"] == "muon":
                    Sall = self.align(mbar, p) * S[p].unsqueeze(2) + self.coef_apply(Mmu, G[p], p)
                    X = -self.align(lr, p) * newton_schulz(Sall, spec["ns_steps"])
                    S[p] = Sall[:, :, -1]
                    Aall = self.coef_apply(D, X, p)
                elif spec["optim"] == "momentum" and read_order == "chunk_start":
                    X = -self.align(lr, p) * G[p]  # closed forms of the last rows (MATH.md §1.4)
                    Kl = torch.einsum("bhilc,bhljc->bhijc", D, Mmu)
                    f = torch.einsum("bhilc,bhlc->bhic", D, mbar)
                    Aall = self.coef_apply(Kl, X, p) + self.align(f, p) * S[p].unsqueeze(2)
                    S[p] = self.align(mbar[:, :, -1:], p) * S[p].unsqueeze(2) + self.coef_apply(Mmu[:, :, -1:], X, p)
                    S[p] = S[p][:, :, 0]
                elif spec["optim"] == "momentum":
                    X = -self.align(lr, p) * G[p]
                    Sall = self.align(mbar, p) * S[p].unsqueeze(2) + self.coef_apply(Mmu, X, p)
                    S[p] = Sall[:, :, -1]
                    Aall = self.coef_apply(D, Sall, p)
                elif spec["scale"] is not None:
                    scale = hyp[spec["scale"]][:, :, sl]
                    tri = torch.ones(n, n, dtype=q.dtype, device=q.device).tril()
                    K = scale.unsqueeze(3) * tri[None, None, :, :, None] * lr.unsqueeze(2)
                    Aall = -self.coef_apply(K[:, :, -D.shape[2]:], G[p], p)
                else:
                    Aall = -self.coef_apply(D * lr.unsqueeze(2), G[p], p)
                Aall = Aall + self.align(abar, p) * A[p].unsqueeze(2)
                if rate is not None:
                    e_coef = torch.einsum("bhijc,bhjc->bhic", D, rate[:, :, sl])
                    Aall = Aall + self.align(e_coef, p) * init[p].unsqueeze(2)
                newA[p] = Aall
            if read_order == "chunk_start":
                read_w = {p: A[p].unsqueeze(2) for p in self.params}
                newA = {p: a[:, :, -1:] for p, a in newA.items()}
            elif read_order == "before":
                read_w = {p: torch.cat([A[p].unsqueeze(2), newA[p][:, :, :-1]], dim=2) for p in self.params}
            else:
                read_w = newA
            thr = {p: self.threshold(hyp, p) for p in self.params}
            proj = {p: self.project(read_w[p], p, None if thr[p] is None else thr[p].unsqueeze(2))
                    for p in self.params}
            ys.append(self.read_at(proj, q, k, v, gates, outers, sz, sl))
            A = {p: newA[p][:, :, -1] for p in self.params}
        out = {f"A.{p}": A[p] for p in self.params}
        out.update({f"S.{p}": S[p] for p in S})
        out.update({f"init.{p}": init[p] for p in init})
        return torch.cat(ys, dim=2), out


# ---- the exact WY/UT chunk algorithm for (gated) delta rules (MATH.md §9.3) ---------------------

def wy_chunks(q, k, v_beta, beta, keep, S0, chunk):
    """Exact chunked delta rule. q, k: [B, H, T, dk]; v_beta = beta * target: [B, H, T, dv];
    beta: [B, H, T]; keep: [B, H, T] (ones: no decay); S0: [B, H, dk, dv] (S = W^T)."""
    T = q.shape[2]
    S = S0
    outs = []
    for s in range(0, T, chunk):
        sl = slice(s, min(s + chunk, T))
        Q, K, VB, b = q[:, :, sl], k[:, :, sl], v_beta[:, :, sl], beta[:, :, sl]
        n = Q.shape[2]
        R, run = _ratio(keep[:, :, sl].unsqueeze(-1))
        Gam, g, tail = R[..., 0], run[..., 0], R[:, :, -1, :, 0]  # prod_(j,i], prod_[0,i], prod_(i,n-1]
        L = ((b.unsqueeze(-1) * (K @ K.mT)) * Gam).tril(-1)
        eye = torch.eye(n, dtype=q.dtype, device=q.device)
        U = torch.linalg.solve_triangular(eye + L, VB, upper=False, unitriangular=True)
        Wt = torch.linalg.solve_triangular(eye + L, b.unsqueeze(-1) * K * g.unsqueeze(-1), upper=False,
                                           unitriangular=True)
        Vn = U - Wt @ S
        outs.append((Q * g.unsqueeze(-1)) @ S + ((Q @ K.mT) * Gam) @ Vn)
        S = g[..., -1:].unsqueeze(-1) * S + (K * tail.unsqueeze(-1)).mT @ Vn
    return torch.cat(outs, dim=2), S


# ---- the dual form: chunk-affine weights that are never materialised per token ------------------

class DualWeight:
    """The n per-position weights of a chunk, W_i = sum_t coef_t[i] * M_t - sum_l K[i, l] a_l b_l^T,
    kept as their parts (MATH.md §1.4, §3.4). `matvec` costs O(n m k + n L (m + k)) instead of the
    O(n L m k) of materialising every W_i. coef_t: [B, H, n, ch]; M_t: [B, H, m, k]; K: [B, H, n, L, ch];
    a: [B, H, L, m]; b: [B, H, L, k]; `axis` says which side a per-channel coefficient scales."""

    def __init__(self, terms, K, a, b, axis):
        self.terms, self.K, self.a, self.b, self.axis = terms, K, a, b, axis

    def matvec(self, x):
        out = 0
        for coef, M in self.terms:
            if coef.shape[-1] == 1:
                out = out + coef * (x @ M.mT)
            elif self.axis == "row":
                out = out + coef * (x @ M.mT)
            else:
                out = out + (coef * x) @ M.mT
        K = self.K
        if K.shape[-1] == 1:
            return out - (K[..., 0] * (x @ self.b.mT)) @ self.a
        if self.axis == "row":
            return out - torch.einsum("bhil,bhilm,bhlm->bhim", x @ self.b.mT, K, self.a)
        return out - torch.einsum("bhilk,bhlk,bhik->bhil", K, self.b, x) @ self.a


def _decay_minus_outer_sum(terms, krow, a, b, axis):
    """sum_t coef_t * M_t - sum_l krow[l] a_l b_l^T in two passes over the state: the scaled sum (one
    multiply, one addcmul per further term), then one batched GEMM that accumulates into it in place.
    terms: [(coef broadcastable to M, M [B, H, m, k])]; krow: [B, H, L, ch] with a per-channel krow aligned to
    rows or columns. The sum is built in the GEMM's 3-D shape, so the in-place GEMM acts on a fresh tensor and
    not on a view (autograd would replay an in-place op on a view with a zero-filled copy of the base in the
    backward); out-of-place baddbmm would copy the sum once more. The GEMM's backward needs only its factors."""
    lead, mk = terms[0][1].shape[:-2], terms[0][1].shape[-2:]

    def flat(x):
        return x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])
    (c0, m0), *rest = terms
    base = flat(c0) * flat(m0)
    for c, m in rest:
        base = torch.addcmul(base, flat(c), flat(m))
    if krow.shape[-1] == 1 or axis == "row":
        left, right = (a * krow).mT, b
    else:
        left, right = a.mT, krow * b
    base.baddbmm_(left.reshape(-1, *left.shape[-2:]), right.reshape(-1, *right.shape[-2:]), alpha=-1)
    return base.reshape(*lead, *mk)


def _cat_tokens(parts, lead):
    """The factor vectors of every token of every pair, stacked along the token axis (no copy for one pair)."""
    parts = [x.expand(*lead, x.shape[-1]) for x in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _repeat_cols(K, reps, dim=3):
    """K's token columns once per factor pair (the pairs are stacked along the token axis)."""
    if reps == 1:
        return K
    return K.repeat(*([1] * dim), reps, *([1] * (K.dim() - dim - 1)))


def _combine(terms, align):
    return sum(align(c) * M for c, M in terms)


def _clip_factors(rt, F):
    """Clip each token's gradient in factored form: |sum_i a_i b_i^T|^2 = sum_ij (a_i.a_j)(b_i.b_j),
    and the per-token factor scales the a_i (the gradient is linear in them)."""
    clip = rt.spec.get("clip")
    if clip is None:
        return F
    F = dict(F)
    for p in rt.params:
        n = rt.spec["factors"].get(p) if len(rt.spec["params"][p]["shape_rank"]) == 2 else None
        if n is None:
            F[f"grad.{p}"] = rt.clip(F[f"grad.{p}"], p)
            continue
        a = [F[f"factor.{p}.{i}.a"] for i in range(n)]
        b = [F[f"factor.{p}.{i}.b"] for i in range(n)]
        sq = sum((a[i] * a[j]).sum(-1) * (b[i] * b[j]).sum(-1) for i in range(n) for j in range(n))
        scale = clip_factor(sq, clip).unsqueeze(-1)
        F.update({f"factor.{p}.{i}.a": a[i] * scale for i in range(n)})
    return F


def _per_segment(fn, segs, series):
    """fn over each segment's slice of the time series ({name: [B, H, T, ...]}), batched over every run of
    consecutive equal-length segments: one call per run instead of one per chunk keeps the state-independent
    work (coefficient matrices, log-space products) out of the sequential loop. fn maps {name: [B, X, n, ...]}
    to {name: [B, X, ...]} with X = H * segments; the result is one dict of [B, H, ...] views per segment."""
    out, i = [], 0
    while i < len(segs):
        s0, e0 = segs[i]
        n, j = e0 - s0, i + 1
        while j < len(segs) and segs[j][1] - segs[j][0] == n and segs[j][0] == segs[j - 1][1]:
            j += 1
        m = j - i
        parts = {}
        for name, x in series.items():
            xs = x[:, :, s0:s0 + m * n]
            B, H = xs.shape[:2]
            parts[name] = xs.reshape(B, H * m, n, *xs.shape[3:])
        res = fn(parts)
        split = {name: r.reshape(B, H, m, *r.shape[2:]).unbind(2) for name, r in res.items()}
        out.extend({name: split[name][t] for name in res} for t in range(m))
        i = j
    return out


def _shift_down(x, first):
    """Rows i -> i + 1 along the chunk axis (dim 2), row 0 filled with `first` (read before write)."""
    return torch.cat([torch.full_like(x[:, :, :1], first), x[:, :, :-1]], dim=2)


def _dual_coefficients(spec, rows, read_order, windowed, x):
    """Everything of a chunk that does not depend on the state, from its [B, X, n, ch] hyper-parameters:
    the decay ratios D (and momentum ratios), the gradient coefficients Kc / Ks, the coefficients of the
    chunk-start state in every row (tA) and, without a window, the read-shifted copies."""
    lr = x["lr"]
    keep = x["keep"] if "keep" in x else torch.ones_like(lr[..., :1])
    last = read_order == "chunk_start"  # only last rows are needed: O(n), not the n x n matrices
    if last:
        D, abar, abar_all = _ratio_last(keep)
    else:
        D, abar_all = _ratio(keep)
        D, abar = D[:, :, rows], abar_all[:, :, rows]
    out = {"abar_all": abar_all}
    if "scale" in x:
        n = lr.shape[2]
        tri = torch.ones(n, n, dtype=lr.dtype, device=lr.device).tril()[rows]
        out["Kc"] = x["scale"][:, :, rows].unsqueeze(3) * tri[None, None, :, :, None] * lr.unsqueeze(2)
        tA = [torch.ones_like(abar)]
    elif "decay" in x and last:
        Kl, Ml, f, out["mbar_last"] = _momentum_last(keep, x["decay"])
        out["Kc"], out["Ks"] = Kl * lr.unsqueeze(2), Ml * lr.unsqueeze(2)
        tA = [abar, f]
    elif "decay" in x:
        Mmu, mbar = _ratio(x["decay"])
        out["Kc"] = torch.einsum("bhilc,bhljc->bhijc", D, Mmu) * lr.unsqueeze(2)
        out["Ks"] = Mmu[:, :, rows] * lr.unsqueeze(2)
        out["mbar_last"] = mbar[:, :, -1]
        tA = [abar, torch.einsum("bhilc,bhlc->bhic", D, mbar)]
    else:
        out["Kc"] = D * lr.unsqueeze(2)
        tA = [abar]
    if "rate" in x:
        tA.append(torch.einsum("bhijc,bhjc->bhic", D, x["rate"]))
    for t, cf in enumerate(tA):
        out[f"tA.{t}"] = cf
        out[f"tA_last.{t}"] = cf[:, :, -1]
        if read_order == "before":  # position i reads the state after i - 1 tokens
            out[f"shift.{t}"] = _shift_down(cf, 1.0 if t == 0 else 0.0)
    if read_order == "before" and not windowed:
        out["Kr"] = _shift_down(out["Kc"], 0.0)
    return out


def chunk_dual(rt, q, k, v, gates, outers, state, sz, chunk, start=0, read_order=None):
    """The anchored chunk program in dual form (gd or momentum, no state projection)."""
    spec = rt.spec
    read_order = read_order or spec["read_order"]
    segs, q, k, v, gates, hyp, keep, rate = rt.prologue(q, k, v, gates, outers, sz, chunk, start)
    c, weight = spec["window"], spec["window_weight"]
    windowed = c > 1 or weight is not None
    A = {p: state[f"A.{p}"] for p in rt.params}
    S = {p: state[f"S.{p}"] for p in rt.params} if spec["optim"] == "momentum" else {}
    init = {p: state[f"init.{p}"] for p in rt.params} if rate is not None else {}
    # the sources the coefficients tA.0, tA.1, ... multiply: the chunk-start memory, its momentum, the init
    tags = [None] + (["S"] if S and spec["scale"] is None else []) + (["init"] if rate is not None else [])
    # with chunk-start reads only the last row of each coefficient matrix is needed: O(n^2), not n^3
    rows = slice(-1, None) if read_order == "chunk_start" else slice(None)
    series = {"lr": hyp[spec["lr"]], "keep": keep, "rate": rate,
              "scale": hyp[spec["scale"]] if spec["scale"] is not None else None,
              "decay": hyp[spec["decay"]] if spec["optim"] == "momentum" and spec["scale"] is None else None}
    coefs = _per_segment(lambda x: _dual_coefficients(spec, rows, read_order, windowed, x), segs,
                         {n: t for n, t in series.items() if t is not None})
    ys = []
    for (s, e), co in zip(segs, coefs, strict=True):
        lo = max(0, s - c + 1)
        mix = rt.window_mix(gates, lo, s, e, co["Kc"]) if windowed else None
        window, tokens = (rt.token_env(k, v, q, gates, outers, slice(a, e)) for a in (lo, s))
        y, A, S = _dual_step(rt, sz, read_order, tags, A, S, init, co, window, tokens, mix)
        ys.append(y)
    out = {f"A.{p}": A[p] for p in rt.params}
    out.update({f"S.{p}": S[p] for p in S})
    out.update({f"init.{p}": init[p] for p in init})
    return torch.cat(ys, dim=2), out


def _dual_step(rt, sz, read_order, tags, A, S, init, co, env, env_read, mix):
    """One chunk of the dual form: the gradient factors at the chunk-start state (A, S), the reads of the
    chunk's positions through never-materialised weights, the next chunk-start state. `co` holds the chunk's
    state-independent coefficients (`_dual_coefficients`), `env` the window's tokens, `mix` the window's
    banded weights (None without a window)."""
    spec = rt.spec
    for p in rt.params:
        w = A[p].unsqueeze(2)
        env[p] = rt.align(co["abar_all"], p) * w if spec["grad_at_decayed"] else w
    F = _clip_factors(rt, rt.token_grads(rt.factors_fn(env, sz), A, co["Kc"].shape[3] if mix is None else mix.shape[3]))
    Kc, Ks = co["Kc"], co.get("Ks")
    if mix is not None:
        Kw = torch.einsum("bhijc,bhjl->bhilc", Kc, mix)
        Ksw = torch.einsum("bhijc,bhjl->bhilc", Ks, mix) if S else None
        Kr = _shift_down(Kw, 0.0) if read_order == "before" else Kw
    else:
        Kw, Ksw = Kc, (Ks if S else None)
        Kr = co["Kr"] if read_order == "before" else Kw
    sources = {None: A, "S": S, "init": init}
    shifted = "shift" if read_order == "before" else "tA"
    newA, newS = {}, {}
    for p in rt.params:
        axis = spec["params"][p]["channel_axis"]
        terms = [(co[f"{shifted}.{t}"], sources[w][p]) for t, w in enumerate(tags)]
        last = [(co[f"tA_last.{t}"], sources[w][p]) for t, w in enumerate(tags)]
        if p in rt.matrix_params:
            pairs = [(F[f"factor.{p}.{i}.a"], F[f"factor.{p}.{i}.b"]) for i in range(spec["factors"][p])]
            lead = (*Kc.shape[:2], Kw.shape[3])
            a = _cat_tokens([x for x, _ in pairs], lead)
            b = _cat_tokens([x for _, x in pairs], lead)
            reps = len(pairs)
            env[p] = DualWeight(terms, _repeat_cols(Kr, reps), a, b, axis)
            newA[p] = _decay_minus_outer_sum([(rt.align(cf, p), M) for cf, M in last],
                                             _repeat_cols(Kw[:, :, -1], reps, dim=2), a, b, axis)
            if S:
                newS[p] = _decay_minus_outer_sum([(rt.align(co["mbar_last"], p), S[p])],
                                                 _repeat_cols(Ksw[:, :, -1], reps, dim=2), a, b, axis)
        else:
            g = F[f"grad.{p}"]
            per_row = _combine([(cf, M.unsqueeze(2)) for cf, M in terms], lambda cf, p=p: rt.align(cf, p))
            env[p] = per_row - rt.coef_apply(Kr, g, p)
            newA[p] = _combine(last, lambda cf, p=p: rt.align(cf, p)) - rt.coef_apply(Kw, g, p)[:, :, -1]
            if S:
                newS[p] = rt.align(co["mbar_last"], p) * S[p] - rt.coef_apply(Ksw, g, p)[:, :, -1]
    env_read.update({p: env[p] for p in rt.params})
    if read_order == "chunk_start":  # TNT's global memory: every position reads the chunk-start state
        env_read.update({p: A[p].unsqueeze(2) for p in rt.params})
    return rt.read_fn(env_read, sz)["read"], newA, (newS if S else S)
