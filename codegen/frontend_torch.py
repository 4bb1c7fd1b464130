# memdsl frontend (torch): the public call shape of a compiled rule, with input validation.
#
# Pure torch, copied verbatim into standalone modules together with runtime_torch.py.
# Tensors use flash-linear-attention's layout: q, k, v [B, T, H, D]; gates [B, T, H] or
# [B, T, H, n]; outers and initial memory in `params` as [*shape] or [H, *shape]; the state is a
# dict of [B, H, ...] tensors. Compute runs in float32 (inputs may be bf16/fp16); outputs come back
# in the dtype of q.
import math

import torch


class _NoContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def no_autocast(x):
    """A context without autocast on x's device: a rule's programs choose their own precision (under autocast a
    bf16 matmul feeds an fp32 in-place state update, which fails; and states must not silently drop to bf16).
    The rule computes in its inputs' dtype, as without autocast."""
    device = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else _NoContext()


class CompiledRuleModule:
    BACKENDS = ("auto", "loop", "anchored_loop", "chunk", "materialized", "dual", "wy")

    def __init__(self, spec, fns):
        self.spec = spec
        self.runtime = Runtime(spec, fns)  # noqa: F821 - defined by runtime_torch.py in the same module
        self.fns = fns

    # ---- sizes and validation ------------------------------------------------------------------
    def sizes(self, k=None, v=None, q=None, sizes=None):
        given = dict(sizes or {})
        toks = {"k": k, "v": v, "q": q}
        for name, tok in self.spec["size_from"].items():
            if name not in given and toks[tok] is not None:
                given[name] = toks[tok].shape[-1]
        missing = [n for n in self.spec["free_sizes"] if n not in given]
        if missing:
            raise ValueError(f"rule {self.spec['name']}: pass the size(s) {missing} as sizes={{...}}")
        return self.fns["sizes"](given)

    def _check_tokens(self, q, k, v, shapes):
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"`{name}` must be a tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"`{name}` must be [B, T, H, D], got shape {tuple(t.shape)}")
            if not t.is_floating_point():
                raise ValueError(f"`{name}` must be floating point, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"`{name}` is on {t.device} but q is on {q.device}")
            if tuple(t.shape[:3]) != tuple(q.shape[:3]):
                raise ValueError(f"`{name}` has [B, T, H] = {tuple(t.shape[:3])}, q has {tuple(q.shape[:3])}")
            want = shapes[name][-1]
            if t.shape[-1] != want:
                src = [f"{n} = {shapes[tok][-1]} from `{tok}`" for n, tok in self.spec["size_from"].items()
                       if tok != name]
                raise ValueError(f"`{name}` must have {want} features per head, got {t.shape[-1]}"
                                 + (f" (sizes taken from the other inputs: {', '.join(src)})" if src else ""))

    def _gates(self, gates, B, T, H, shapes, device):
        _check_dict("gates", gates)
        gates = dict(gates or {})
        out = {}
        for name in self.spec["gates"]:
            if name not in gates:
                lead = "[B, T, H" + "".join(f", {int(n)}" for n in shapes[name]) + "]"
                raise ValueError(f"missing gate `{name}`: expected a {lead} tensor "
                                 f"(rule {self.spec['name']} declares gates {list(self.spec['gates'])})")
            g = gates.pop(name)
            want = (B, T, H, *shapes[name])
            if not isinstance(g, torch.Tensor) or tuple(g.shape) != want:
                got = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"gate `{name}` must have shape {want}, got {got}")
            if not g.is_floating_point():
                raise ValueError(f"gate `{name}` must be floating point, got {g.dtype}")
            if g.device != device:
                raise ValueError(f"gate `{name}` is on {g.device}, expected {device}")
            out[name] = g.transpose(1, 2)
        if gates:
            raise ValueError(f"unknown gate(s) {sorted(gates)}; the rule declares {list(self.spec['gates'])}")
        return out

    def _outers(self, params, H, shapes, device):
        out = {}
        for name, info in self.spec["outers"].items():
            if name in params:
                o = torch.as_tensor(params[name], device=device)
            elif info["init"] is not None:
                o = make_init(info["init"], shapes[name], torch.float32, device, shapes, None)
            else:
                raise ValueError(f"missing outer constant `{name}` in params (shape {tuple(shapes[name])})")
            if tuple(o.shape) == tuple(shapes[name]):
                o = o.expand(H, *o.shape)
            if tuple(o.shape) != (H, *shapes[name]):
                raise ValueError(f"params[`{name}`] must be {tuple(shapes[name])} or {(H, *shapes[name])}, "
                                 f"got {tuple(o.shape)}")
            out[name] = o
        return out

    # ---- state ---------------------------------------------------------------------------------
    def init_state(self, B, H, d=None, sizes=None, dtype=torch.float32, device=None, params=None,
                   generator=None):
        """A fresh state: the initial memory from params[<param>] ([*shape] or [H, *shape]) when given,
        else the rule's declared initializer (drawn with `generator`, default seed 0)."""
        sz = self.sizes(sizes=dict(sizes or {}, **({"d": d} if d is not None else {})))
        shapes = self.fns["shapes"](sz)
        params = params or {}
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(0)
        state = {}
        for p, info in self.spec["params"].items():
            if p in params:
                w = torch.as_tensor(params[p], device=device).to(dtype)
                if tuple(w.shape) == tuple(shapes[p]):
                    w = w.expand(H, *w.shape)
                if tuple(w.shape) != (H, *shapes[p]):
                    raise ValueError(f"initial memory params[`{p}`] must be {tuple(shapes[p])} or "
                                     f"{(H, *shapes[p])}, got {tuple(w.shape)}")
            else:
                w = make_init(info["init"], (H, *shapes[p]), dtype, device, shapes, generator)
            state[f"A.{p}"] = w.unsqueeze(0).expand(B, *w.shape)
            if self.spec["optim"] != "gd":
                state[f"S.{p}"] = torch.zeros(B, H, *shapes[p], dtype=dtype, device=device)
            if any(r.get("rate") for r in self.spec["retain"]):
                state[f"init.{p}"] = state[f"A.{p}"]
        return state

    def _check_state(self, state, B, H, shapes, device=None):
        for p in self.spec["params"]:
            for prefix in ("A", "S") if self.spec["optim"] != "gd" else ("A",):
                key = f"{prefix}.{p}"
                if key not in state:
                    raise ValueError(f"state is missing `{key}` (make one with init_state)")
                t = state[key]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, H, *shapes[p]):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"state[`{key}`] must be {(B, H, *shapes[p])}, got {got}")
                if device is not None and t.device != device:
                    raise ValueError(f"state[`{key}`] is on {t.device}, expected {device}")
                if not t.is_floating_point():
                    raise ValueError(f"state[`{key}`] must be floating point, got {t.dtype}")

    # ---- calls ---------------------------------------------------------------------------------
    def __call__(self, q, k, v, gates=None, params=None, state=None, *, chunk=None, backend="auto", sizes=None,
                 read_order=None, check_finite=False):
        """y, state = rule(q, k, v, gates, params, state). Tensors [B, T, H, D]; y is [B, T, H, Dv].
        check_finite=True: stop at the first NaN/Inf with a NonFiniteError naming the tensor and chunk."""
        with no_autocast(q):
            return self._call(q, k, v, gates, params, state, chunk=chunk, backend=backend, sizes=sizes,
                              read_order=read_order, check_finite=check_finite)

    def _call(self, q, k, v, gates, params, state, *, chunk, backend, sizes, read_order, check_finite):
        if check_finite:
            return self._call_checked(q, k, v, gates, params, state, chunk=chunk, backend=backend, sizes=sizes,
                                      read_order=read_order)
        sz = self.sizes(k=k, v=v, q=q, sizes=sizes)
        shapes = self.fns["shapes"](sz)
        self._check_tokens(q, k, v, shapes)
        B, T, H = q.shape[:3]
        _check_dict("params", params)
        _check_dict("state", state)
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.spec["outers"]) - set(self.spec["params"]))
        if unknown:
            raise ValueError(f"unknown params {unknown}; rule {self.spec['name']} takes outers "
                             f"{list(self.spec['outers'])} and initial memories {list(self.spec['params'])}")
        gates = self._gates(gates, B, T, H, shapes, q.device)
        outers = self._outers(params, H, shapes, q.device)
        work = torch.float64 if q.dtype == torch.float64 else torch.float32  # bf16/fp16 compute in fp32
        if state is None:
            state = self.init_state(B, H, sizes=sz, device=q.device, params=params, dtype=work)
        self._check_state(state, B, H, shapes, q.device)
        chunk = self.spec["chunk"] if chunk is None else chunk
        if isinstance(chunk, (bool, str, bytes)) or not hasattr(chunk, "__index__") or int(chunk) < 1:
            raise ValueError(f"chunk must be an integer ≥ 1, got {chunk!r}")
        chunk = int(chunk)
        # [B, H, T, D] contiguous once, so every chunk's slice folds (B, H) into one GEMM batch without a copy
        qf, kf, vf = (t.to(work).transpose(1, 2).contiguous() for t in (q, k, v))
        gates = {n: g.to(work) for n, g in gates.items()}
        outers = {n: o.to(work) for n, o in outers.items()}
        state = {key: t.to(work) for key, t in state.items()}
        if read_order not in (None, "after", "before", "chunk_start"):
            raise ValueError(f"read_order must be 'after', 'before' or 'chunk_start', got {read_order!r}")
        if backend == "wy" and read_order not in (None, "after"):  # the WY algorithm reads after the write
            raise ValueError(f"backend 'wy' reads after the write; read_order={read_order!r} needs backend='chunk' "
                             "(anchored chunks) or 'loop' (exact, token by token)")
        resolved = self._resolve(backend)
        # "auto" on a delta rule read before the write (or at the chunk start): the anchored chunk program
        backend = "chunk" if resolved == "wy" and read_order not in (None, "after") else resolved
        qf, kf, vf, gates, start = self._with_history(qf, kf, vf, gates, state)
        if backend == "wy":
            y, new_state = self._wy(qf, kf, vf, gates, outers, state, sz, chunk)
        elif backend == "loop":
            y, new_state = self.runtime.token_loop(qf, kf, vf, gates, outers, state, sz, 1, start, read_order)
        elif backend == "anchored_loop":
            y, new_state = self.runtime.token_loop(qf, kf, vf, gates, outers, state, sz, chunk, start, read_order)
        elif backend == "dual" or (backend == "chunk" and self.spec["dual"]):
            y, new_state = chunk_dual(self.runtime, qf, kf, vf, gates, outers, state, sz, chunk, start,  # noqa: F821
                                      read_order)
        else:
            y, new_state = self.runtime.chunkwise(qf, kf, vf, gates, outers, state, sz, chunk, start, read_order)
        if self.spec["window"] > 1:  # the last c - 1 tokens: the next call's windows reach into them
            keep = self.spec["window"] - 1
            new_state.update({"hist.k": kf[:, :, -keep:], "hist.v": vf[:, :, -keep:]})
            new_state.update({f"hist.{n}": g[:, :, -keep:] for n, g in gates.items()})
        return y.transpose(1, 2).to(q.dtype), new_state

    def _call_checked(self, q, k, v, gates, params, state, chunk, backend, sizes, read_order):
        """The same computation, one chunk per call (the state carries across calls exactly, chunks stay
        aligned), checking the inputs first and then every chunk's state and output."""
        sz = self.sizes(k=k, v=v, q=q, sizes=sizes)
        shapes = self.fns["shapes"](sz)
        self._check_tokens(q, k, v, shapes)
        B, T, H = q.shape[:3]
        self._gates(gates, B, T, H, shapes, q.device)
        named = {"q": q, "k": k, "v": v, **{f"gate {n}": g for n, g in (gates or {}).items()},
                 **{f"params[{n!r}]": p for n, p in (params or {}).items() if isinstance(p, torch.Tensor)},
                 **{f"state[{n!r}]": t for n, t in (state or {}).items()}}
        for name, t in named.items():
            if not torch.isfinite(t).all():
                raise NonFiniteError(f"rule {self.spec['name']}: input {name} is not finite: {_count_bad(t)}, "
                                     f"the first at index {tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0])}")
        C = int(chunk or self.spec["chunk"])
        ys, n_chunks = [], -(-T // C)
        for i, s in enumerate(range(0, T, C)):
            e = min(s + C, T)
            y, state = self(q[:, s:e], k[:, s:e], v[:, s:e], {n: g[:, s:e] for n, g in (gates or {}).items()}, params,
                            state, chunk=C, backend=backend, sizes=sizes, read_order=read_order)
            # the momentum feeds the memory, the memory feeds the read: name the earliest in that order
            order = sorted((n for n in state if not n.startswith("hist.")), key=lambda n: (n[0] != "S", n))
            bad = [n for n in order if not torch.isfinite(state[n]).all()]
            bad += ["y"] if not torch.isfinite(y).all() else []
            if bad:
                first = state[bad[0]] if bad[0] != "y" else y
                raise NonFiniteError(
                    f"rule {self.spec['name']}: {'the output y' if bad[0] == 'y' else f'state {bad[0]!r}'} is not "
                    f"finite after chunk {i} of {n_chunks} (tokens {s}..{e - 1}, chunk size {C}): "
                    f"{_count_bad(first)}" + (f"; also non-finite: {', '.join(bad[1:])}" if bad[1:] else "")
                    + ". The inputs were finite: lower the learning-rate gates, or bound each step with "
                    "`optim ...(clip = ...)`")
            ys.append(y)
        return torch.cat(ys, dim=1), state

    def _with_history(self, q, k, v, gates, state):
        """Prepend the previous call's last tokens (Omega windows reach c - 1 tokens back)."""
        if "hist.k" not in state:
            return q, k, v, gates, 0
        hk, hv = state["hist.k"], state["hist.v"]
        m = hk.shape[2]
        q = torch.cat([q.new_zeros(*q.shape[:2], m, q.shape[-1]), q], dim=2)
        k, v = torch.cat([hk, k], dim=2), torch.cat([hv, v], dim=2)
        gates = {n: torch.cat([state[f"hist.{n}"], g], dim=2) for n, g in gates.items()}
        return q, k, v, gates, m

    def _resolve(self, backend):
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        if backend == "dual" and not self.spec["dual"]:
            raise ValueError(f"rule {self.spec['name']} has no dual form (a state projection, muon, or a "
                             "gradient that is not a sum of outer products)")
        if backend == "wy" and self.spec["algorithm"] != "wy":
            raise ValueError(f"rule {self.spec['name']} is not a delta rule: no WY backend "
                             f"(its algorithm is {self.spec['algorithm']})")
        if backend != "auto":
            return backend
        return {"wy": "wy", "loop": "loop"}.get(self.spec["algorithm"], "chunk")

    def _wy(self, q, k, v, gates, outers, state, sz, chunk):
        spec, H = self.spec, q.shape[1]
        env = {"k": k, "v": v, "q": q, **gates}
        env.update({n: o.reshape(1, H, 1, *o.shape[1:]) for n, o in outers.items()})
        terms = self.fns["wy_terms"](env, sz)
        hyp = self.runtime.hyper_values(gates, outers, sz, q.shape[2], chunk, q)
        lr = hyp[spec["lr"]][..., 0]
        slope = torch.as_tensor(terms["wy.slope"], dtype=q.dtype).expand_as(lr)
        keep, _ = self.runtime.keep_rate(hyp)
        keep = torch.ones_like(lr) if keep is None else keep[..., 0]
        key = terms["wy.key"].expand(*q.shape[:3], terms["wy.key"].shape[-1])
        query = terms["wy.query"].expand(*q.shape[:3], terms["wy.query"].shape[-1])
        offset = terms["wy.offset"].expand(*v.shape[:3], terms["wy.offset"].shape[-1])
        p = next(iter(spec["params"]))
        y, S = wy_chunks(query, key, -lr.unsqueeze(-1) * offset, lr * slope, keep,  # noqa: F821
                         state[f"A.{p}"].mT, chunk)
        return y, {f"A.{p}": S.mT}

    def step(self, q, k, v, gates=None, state=None, params=None, sizes=None):
        """One token of exact decoding: q, k, v [B, H, D]; gates [B, H] or [B, H, n]."""
        g1 = {n: t.unsqueeze(1) for n, t in (gates or {}).items()}
        y, state = self(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), g1, params, state, chunk=1,
                        backend="loop", sizes=sizes)
        return y[:, 0], state


def _check_dict(what, value):
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"`{what}` must be a dict of tensors (name -> tensor), got {type(value).__name__}")


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in a `check_finite=True` call; the message names the tensor and the chunk."""


def _count_bad(t):
    return f"{int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} Inf of {t.numel()} values"


def make_init(init, shape, dtype, device, shapes, generator):
    """Draw an initial value: zeros, ones, eye, normal(std), taylor(degree) (blocks of sqrt(1/i!))."""
    kind, args = (init or ["zeros", {}])
    shape = tuple(int(s) for s in shape)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if kind == "eye":
        return torch.eye(shape[-2], shape[-1], dtype=dtype, device=device).expand(shape).clone()
    if kind == "normal":
        x = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (x * args["std"]).to(dtype=dtype, device=device)
    if kind == "taylor":
        d = shapes["k"][-1]
        blocks = [torch.full((d**i,), math.sqrt(1.0 / math.factorial(i))) for i in range(int(args["degree"]) + 1)]
        vec = torch.cat(blocks)
        if vec.numel() != shape[-1]:
            raise ValueError(f"taylor({int(args['degree'])}) fills {vec.numel()} entries but the tensor has "
                             f"{shape[-1]}")
        return vec.expand(shape).to(dtype=dtype, device=device).clone()
    raise ValueError(f"unknown initializer {kind}")


class MemoryModule(torch.nn.Module):
    """A compiled rule with its outer constants and initial memory as learnable parameters."""

    def __init__(self, rule, n_heads, d, **sizes):
        super().__init__()
        self.rule, self.n_heads = rule, n_heads
        self.sz = rule.sizes(sizes=dict(sizes, d=d))
        shapes = rule.fns["shapes"](self.sz)
        self.shapes = shapes
        gen = torch.Generator().manual_seed(0)
        self.outer = torch.nn.ParameterDict()
        for name, info in rule.spec["outers"].items():
            value = make_init(info["init"] or ["zeros", {}], (n_heads, *shapes[name]), torch.float32, None,
                              shapes, gen)
            self.outer[name] = torch.nn.Parameter(value)
        self.init_memory = torch.nn.ParameterDict()
        for name, info in rule.spec["params"].items():
            value = make_init(info["init"], (n_heads, *shapes[name]), torch.float32, None, shapes, gen)
            self.init_memory[name] = torch.nn.Parameter(value)

    def params(self):
        return {**dict(self.outer.items()), **dict(self.init_memory.items())}

    def size_kw(self) -> dict:
        """{"sizes": ...} when the rule has a size no token carries (`dim n` without a relation), else {}: the
        sizes option keeps a call on the torch paths, so it is passed only where it is needed."""
        given = self.rule.spec["size_from"]
        return {"sizes": self.sz} if any(n not in given for n in self.rule.spec["free_sizes"]) else {}

    def forward(self, q, k, v, gates=None, state=None, chunk=None, backend="auto"):
        return self.rule(q, k, v, gates, self.params(), state, chunk=chunk, backend=backend, sizes=self.sz)
