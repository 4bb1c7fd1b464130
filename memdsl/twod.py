"""2-D rules over time × variate (Chimera, Hydra, 2-D Mamba): checks, classification and the callable.

A 2-D rule is an ordinary rule (model, loss, gd, read) plus `axes time, variate [bidirectional]` and one
retention per axis (`retain time decay(kt)`, `retain variate decay(kv)`). The state at cell (t, v) is
built from its time predecessor (t-1, v) and its variate predecessor (t, v-1) (docs/language.md §12;
the runtime is codegen/runtime_2d.py). The per-token IR (loss, gradients, read, gates) is the 1-D
compiler's, unchanged; only the recurrence around it is 2-D.
"""

from __future__ import annotations

import dataclasses
import os
import types
import warnings

import torch

from codegen.runtime_2d import Runtime2D
from codegen.triton_launch import raised_by_triton

from . import ast as A
from .build import Builder, _chunk
from .errors import (
    ArityError,
    DuplicateNameError,
    MissingClauseError,
    ScheduleError,
    ShapeError,
    UnsupportedError,
    ValueRangeError,
)
from .program import AxesSpec, Program, ScheduleSpec

DEFAULT_TILE = (16, 8)
# backend="auto" takes the generated Triton kernels for CUDA calls they cover; False keeps the torch tile
# program there (the kernels are tested under the CPU interpreter; set it while a GPU run is outstanding)
AUTO_TRITON = True
AXES = ("time", "variate")


class Builder2D(Builder):
    """The 1-D checks and IR, then the 2-D clauses: axes, per-axis decay, the tile schedule."""

    def build(self) -> Program:
        stmts = self.mem.stmts
        axes = [s for s in stmts if isinstance(s, A.Axes)]
        per_axis = [s for s in stmts if isinstance(s, A.AxisRetain)]
        if not axes:
            raise MissingClauseError(f"`retain {per_axis[0].axis}` is a 2-D retention, but the rule has no `axes`",
                                     per_axis[0].span, "add `axes time, variate`, or write `retain decay(...)`")
        if len(axes) > 1:
            raise DuplicateNameError("more than one `axes` clause", axes[1].span, "keep exactly one")
        ax = axes[0]
        if ax.names != AXES:
            raise UnsupportedError(f"2-D rules run over `axes time, variate`, not `axes {', '.join(ax.names)}`",
                                   ax.span, "write `axes time, variate` (add `bidirectional` for a backward pass)")
        for s in stmts:
            if isinstance(s, A.Retain):
                raise UnsupportedError("a 2-D rule retains per axis", s.span,
                                       "write `retain time decay(...)` and `retain variate decay(...)`")
            if isinstance(s, A.Window):
                raise UnsupportedError("an Omega window in a 2-D rule", s.span,
                                       "a 2-D step takes one cell's gradient: drop the window")
        p = super().build()
        optim = self._one(A.Optim, "optim")
        if p.optim.kind != "gd" or p.optim.scale is not None or getattr(p.optim, "clip", None) is not None:
            raise UnsupportedError("2-D rules take plain `gd(lr = ...)`", optim.span,
                                   "momentum, muon, scale and clip are 1-D only for now")
        if p.read_order != "after":
            raise UnsupportedError("2-D rules read after the write", self._one(A.Read, "read").span,
                                   "drop `before`")
        keeps = {axis: self.axis_keeps(axis, [s for s in per_axis if s.axis == axis], ax) for axis in AXES}
        p.axes = AxesSpec(keeps["time"], keeps["variate"], ax.bidirectional)
        return p

    def axis_keeps(self, axis: str, found: list[A.AxisRetain], ax: A.Axes) -> tuple[str, ...]:
        if not found:
            raise MissingClauseError(f"the 2-D rule has no `retain {axis}` clause", ax.span,
                                     f"every axis needs its keep factor, e.g. `retain {axis} decay(exp(-dt))`")
        if len(found) > 1:
            raise DuplicateNameError(f"more than one `retain {axis}` clause", found[1].span,
                                     "merge the keep factors into one `decay(...)`")
        names = []
        for i, c in enumerate(found[0].calls):
            if c.func != "decay":
                raise UnsupportedError(f"`{c.func}` along an axis of a 2-D rule", c.span,
                                       "2-D retention is linear: `decay(keep)` per axis")
            if len(c.args) + len(c.kwargs) != 1 or (c.kwargs and c.kwargs[0][0] != "keep"):
                raise ArityError("a 2-D `decay` takes exactly its keep factor", c.span,
                                 f"write `retain {axis} decay(keep)`")
            keep = c.args[0] if c.args else c.kwargs[0][1]
            name = self.hyper(f"retain_{axis}{i}.keep", keep, c.span)
            if self.g.node(self.g.outputs[name]).shape:
                raise ShapeError(f"the {axis} keep of a 2-D rule must be a per-token scalar", keep.span,
                                 "a scalar gate, or an expression of scalar gates")
            names.append(name)
        return tuple(names)

    def schedule(self) -> ScheduleSpec:
        s = self.rule.schedule
        tile, sem = None, None
        for st in s.stmts if s is not None else ():
            if isinstance(st, A.Tile):
                if tile is not None:
                    raise ScheduleError("`tile` is given twice", st.span, "keep one")
                tile = (_chunk(st.time, st.span), _chunk(st.variate, st.span))
            elif isinstance(st, A.Semantics):
                if st.mode not in ("exact", "anchored"):
                    raise ValueRangeError("semantics is `exact` or `anchored`", st.span)
                sem = st.mode
            else:
                raise ScheduleError("a 2-D rule is scheduled in tiles, not chunks", st.span,
                                    "use `tile time T variate V`")
        return ScheduleSpec(tile=tile or DEFAULT_TILE, semantics=sem)


def classify_2d(p: Program) -> tuple[str, str]:
    """`scan2d` (exact for any tile), `anchored2d` (gradients at tile boundaries) or `wavefront` (exact)."""
    g, params = p.graph, [t.name for t in p.params]
    reads_state = any(g.depends_on(g.outputs[f"grad.{w}"], params) for w in params if f"grad.{w}" in g.outputs)
    wanted = p.schedule.semantics
    if not reads_state:
        if wanted == "anchored":
            return "anchored2d", "asked for by the schedule (it equals the exact rule here)"
        return "scan2d", ("no gradient reads the memory: the 2-D recurrence is linear, and the tiled 2-D scan "
                          "is exact for any tile")
    if wanted == "exact":
        return "wavefront", "asked for by the schedule: the exact 2-D recurrence, one anti-diagonal at a time"
    return "anchored2d", ("the gradient reads the memory: every cell of a tile takes its gradient at the tile's "
                          "boundary states carried in by the retention (the tile is part of the model)")


def is_2d(tree: A.RuleFile) -> bool:
    return any(isinstance(s, (A.Axes, A.AxisRetain)) for s in tree.memory.stmts)


# ---- the callable ---------------------------------------------------------------------------------
# Call2D and Memory2D use torch and their arguments only: codegen/module_2d.py carries their source verbatim
# into the standalone 2-D module (`memdsl compile hydra.mem -o ...`), so no memdsl name may appear in them.

class Call2D:
    """A 2-D rule's call on the torch backends. `y, state = rule(q, k, v, gates, params, state)` with tokens
    [B, T, V, H, D], gates [B, T, V, H] (or [..., n] per channel); y is [B, T, V, H, Dv]; the state holds the
    last time column per variate, `A.<param>` [B, H, V, *shape] (and `Ab.<param>` for the backward variate
    pass). Backends: `wavefront` (exact), `tiles` (the torch tile program), `anchored_loop` (its token
    oracle), `auto` (wavefront for an exact rule, else tiles).
    spec: name, algorithm, tile, bidirectional, keep_time / keep_variate / lr (names of the emitted `hyper`
    outputs), params {name: {"rank", "axis"}} in the rule's order. fns: the rule's emitted SPEC, grads,
    read, hyper, sizes, shapes, and make_init."""

    BACKENDS = ("auto", "wavefront", "tiles", "anchored_loop")

    def __init__(self, spec: dict, fns: dict):
        self.spec2d, self.fns, self.spec1d = spec, fns, fns["SPEC"]
        self.name, self.algorithm, self.tile = spec["name"], spec["algorithm"], tuple(spec["tile"])
        self.runtime = Runtime2D({"params": spec["params"], "linear": self.algorithm == "scan2d"},
                                 {"grads": fns["grads"], "read": fns["read"]})

    def __repr__(self) -> str:
        return (f"Rule2D {self.name}: {self.algorithm}, tile time {self.tile[0]} variate {self.tile[1]}"
                f"{', bidirectional' if self.spec2d['bidirectional'] else ''}")

    def sizes(self, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, sizes: dict | None = None) -> dict:
        given = dict(sizes or {})
        toks = {"k": k, "v": v, "q": q}
        for name, tok in self.spec1d["size_from"].items():
            given.setdefault(name, toks[tok].shape[-1])
        return self.fns["sizes"](given)

    def init_memory(self, H: int, sz: dict, params: dict, dtype, device) -> dict[str, torch.Tensor]:
        """The initial memory per head, [H, *shape]: from params[<name>] when given, else the initializer."""
        shapes = self.fns["shapes"](sz)
        gen = torch.Generator().manual_seed(0)
        out = {}
        for name in self.spec2d["params"]:
            if name in params:
                w = torch.as_tensor(params[name]).to(dtype=dtype, device=device)
                w = w.expand(H, *shapes[name]) if w.dim() == len(shapes[name]) else w
            else:
                w = self.fns["make_init"](self.spec1d["params"][name]["init"], (H, *shapes[name]), dtype, device,
                                          shapes, gen)
            if tuple(w.shape) != (H, *shapes[name]):
                raise ValueError(f"params[`{name}`] must be {tuple(shapes[name])} or {(H, *shapes[name])}")
            out[name] = w
        return out

    @torch.compiler.disable  # under torch.compile: one graph break, run eagerly (see CompiledRule.__call__)
    def __call__(self, q, k, v, gates=None, params=None, state=None, *, backend: str = "auto",
                 tile: tuple[int, int] | None = None, sizes: dict | None = None):
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {backend!r}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.dim() != 5 or tuple(x.shape[:4]) != tuple(q.shape[:4]):
                raise ValueError(f"`{name}` must be [B, T, V, H, D] like q, got {tuple(x.shape)}")
        B, T, V, H = q.shape[:4]
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        sz = self.sizes(k, v, q, sizes)
        params = dict(params or {})
        known = set(self.spec2d["params"]) | set(self.spec1d["outers"])
        if set(params) - known:
            raise ValueError(f"unknown params {sorted(set(params) - known)}; rule {self.name} takes {sorted(known)} "
                             "(the carried state goes in `state=`)")
        shapes = self.fns["shapes"](sz)
        outers = {}
        for name, info in self.spec1d["outers"].items():
            o = params[name] if name in params else self.fns["make_init"](info["init"], shapes[name], work,
                                                                          q.device, shapes, None)
            o = torch.as_tensor(o).to(work)
            outers[name] = o.expand(H, *shapes[name]) if o.dim() == len(shapes[name]) else o
        gates = dict(gates or {})
        if sorted(gates) != sorted(self.spec1d["gates"]):
            raise ValueError(f"rule {self.name} takes gates {sorted(self.spec1d['gates'])}, got {sorted(gates)}")
        # internal layout [B, H, T, V, ...]
        tok = {n: x.to(work).permute(0, 3, 1, 2, *range(4, x.dim())) for n, x in
               {"q": q, "k": k, "v": v, **gates}.items()}
        for n in gates:
            if tuple(tok[n].shape[:4]) != (B, H, T, V):
                raise ValueError(f"gate `{n}` must be [B, T, V, H] (or [B, T, V, H, n]), got {tuple(gates[n].shape)}")
        init = self.init_memory(H, sz, params, work, q.device)
        top = {p: w.unsqueeze(0).expand(B, *w.shape) for p, w in init.items()}
        tile = tuple(tile or self.tile)
        backend = self._backend(backend, q, sz, T, V, tile)
        y, new_state = self._direction(tok, outers, sz, state, top, "A", backend, tile, V)
        if self.spec2d["bidirectional"]:  # the same rule over the variates in reverse order
            flipped = {n: x.flip(3) for n, x in tok.items()}
            yb, back = self._direction(flipped, outers, sz, state, top, "Ab", backend, tile, V)
            y = y + yb.flip(3)
            new_state.update(back)
        return y.permute(0, 2, 3, 1, 4).to(q.dtype), new_state

    def _direction(self, tok, outers, sz, state, top, prefix, backend, tile, V):
        hyp = self.hyper(tok, outers, sz)
        left = {p: (state[f"{prefix}.{p}"] if state is not None else
                    w.unsqueeze(2).expand(*w.shape[:2], V, *w.shape[2:])) for p, w in top.items()}
        y, last = self._run(backend, (tok, hyp["kt"], hyp["kv"], hyp["lr"], outers, sz, left, top), tile)
        return y, {f"{prefix}.{p}": w for p, w in last.items()}

    def _run(self, backend, args, tile):
        if backend == "wavefront":
            return self.runtime.wavefront(*args)
        if backend == "tiles":
            return self.runtime.tiles(*args, tile)
        return self.runtime.anchored_loop(*args, tile)

    def _backend(self, backend: str, q: torch.Tensor, sz: dict, T: int, V: int, tile: tuple[int, int]) -> str:
        """`auto`: the exact wavefront for a `wavefront` rule, else the torch tiles program."""
        if backend == "auto":
            return "wavefront" if self.algorithm == "wavefront" else "tiles"
        return backend

    def hyper(self, tok: dict, outers: dict, sz: dict) -> dict[str, torch.Tensor]:
        """kt, kv [B, H, T, V] (products of the axis keeps) and lr [B, H, T, V, ch] from the emitted `hyper`."""
        like = tok["q"]
        B, H, T, V = like.shape[:4]
        env = {n: x for n, x in tok.items() if n not in ("q", "k", "v")}
        env.update({n: o.reshape(1, H, 1, 1, *o.shape[1:]) for n, o in outers.items()})
        values = self.fns["hyper"](env, sz)

        def grid(name):
            x = torch.as_tensor(values[name], dtype=like.dtype, device=like.device)
            return x.expand(B, H, T, V) if x.dim() <= 4 else x.expand(B, H, T, V, x.shape[-1])

        kt = torch.ones(B, H, T, V, dtype=like.dtype, device=like.device)
        kv = torch.ones_like(kt)
        for n in self.spec2d["keep_time"]:
            kt = kt * grid(n)
        for n in self.spec2d["keep_variate"]:
            kv = kv * grid(n)
        lr = grid(self.spec2d["lr"])
        return {"kt": kt, "kv": kv, "lr": lr if lr.dim() == 5 else lr.unsqueeze(-1)}


class Memory2D(torch.nn.Module):
    """A compiled 2-D rule as an nn.Module: its outer constants and initial memory (one per head) are
    Parameters. forward(q, k, v, gates, state, tile=None, backend="auto") -> y, state."""

    def __init__(self, rule: Call2D, n_heads: int, d: int, **sizes):
        super().__init__()
        self.rule, self.n_heads = rule, n_heads
        self.sz = rule.fns["sizes"](dict(sizes, d=d))
        shapes = rule.fns["shapes"](self.sz)
        gen = torch.Generator().manual_seed(0)
        make_init = rule.fns["make_init"]
        self.outer = torch.nn.ParameterDict({
            name: torch.nn.Parameter(make_init(info["init"] or ["zeros", {}], (n_heads, *shapes[name]),
                                               torch.float32, None, shapes, gen))
            for name, info in rule.spec1d["outers"].items()})
        self.init_memory = torch.nn.ParameterDict({
            name: torch.nn.Parameter(make_init(rule.spec1d["params"][name]["init"], (n_heads, *shapes[name]),
                                               torch.float32, None, shapes, gen))
            for name in rule.spec2d["params"]})

    def params(self) -> dict:
        return {**dict(self.outer.items()), **dict(self.init_memory.items())}

    def forward(self, q, k, v, gates=None, state=None, tile=None, backend="auto"):
        return self.rule(q, k, v, gates, self.params(), state, backend=backend, tile=tile, sizes=self.sz)


def spec_2d(p: Program, spec1d: dict) -> dict:
    """The plain data Call2D needs (what a standalone 2-D module carries as SPEC2D)."""
    return {"name": p.name, "algorithm": p.algorithm, "tile": tuple(p.schedule.tile),
            "bidirectional": p.axes.bidirectional, "keep_time": tuple(p.axes.keep_time),
            "keep_variate": tuple(p.axes.keep_variate), "lr": p.optim.lr,
            "params": {t.name: {"rank": len(t.shape), "axis": spec1d["params"][t.name]["channel_axis"]}
                       for t in p.params}}


FNS = ("SPEC", "grads", "read", "hyper", "sizes", "shapes", "make_init")


class Kernels2D(Call2D):
    """Call2D plus backend="triton": generated Triton kernels for the calls `_kernel_reason` accepts (None),
    run by `_run_kernels(args, tile, torch_backward)` — both defined by a subclass (Rule2D; the standalone
    module's Call2DTriton, which carries this class). `auto` takes the kernels for CUDA calls of a non-exact
    rule when `auto_kernels` is true, and falls back to the torch tiles (one warning, remembered per sizes,
    tile and dtype) when Triton cannot compile or launch them on the device — in the forward, or in a backward
    kernel (compiled at the first backward, after its forward ran: the torch tiles then recompute that
    backward from the same inputs); backend="triton" and any error that is not Triton's raise."""

    BACKENDS = (*Call2D.BACKENDS, "triton")
    AUTO = "triton (auto)"  # what `auto` picks: the kernels, with the torch tiles as the fallback
    auto_kernels = True

    def _backend(self, backend: str, q: torch.Tensor, sz: dict, T: int, V: int, tile: tuple[int, int]) -> str:
        if backend == "auto" and self.algorithm != "wavefront":
            covered = self.auto_kernels and q.is_cuda and self._kernel_reason(sz, T, V, tile) is None
            return self.AUTO if covered else "tiles"
        if backend == "triton":
            if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("backend='triton' on CPU tensors runs only under TRITON_INTERPRET=1 (set before "
                                 "triton is imported); use backend='tiles'")
            why = self._kernel_reason(sz, T, V, tile)
            if why:
                raise ValueError(f"backend='triton' does not cover this call of {self.name}: {why}")
            return backend
        return super()._backend(backend, q, sz, T, V, tile)

    def _run(self, backend, args, tile):
        if backend not in ("triton", self.AUTO):
            return super()._run(backend, args, tile)
        key = (tuple(sorted((n, int(x)) for n, x in args[5].items())), tuple(tile), str(args[0]["q"].dtype))
        failures = self.__dict__.setdefault("_kernel_failures", {})  # key -> the kernels' error
        if backend == self.AUTO and key in failures:
            return super()._run("tiles", args, tile)

        def failed(err, stacklevel):
            if key in failures:  # a second kernel of the same call (the backward variate pass's) failed too
                return
            failures[key] = repr(err)
            warnings.warn(f"memdsl: the Triton kernels of rule {self.name} failed here ({type(err).__name__}: "
                          f"{err}); backend='auto' runs the torch tiles at these sizes from now on "
                          "(backend='triton' raises the error)", RuntimeWarning, stacklevel=stacklevel)
        torch_backward = None if backend == "triton" else self.torch_backward(args, tile, failed)
        try:
            return self._run_kernels(args, tile, torch_backward)
        except Exception as err:
            if backend == "triton" or not raised_by_triton(err):
                raise
            failed(err, 5)
            return super()._run("tiles", args, tile)

    def torch_backward(self, args, tile, failed):
        """Tile2D's fallback for one call: f(err, tensors, dy, dlast) reports the failure, recomputes the call on
        the torch tiles from the kernels' own fp32 inputs (tensors, in Tile2D's order) and returns their
        gradients for the cotangents dy (of y) and dlast (of each param's last time column)."""
        run_tiles, sz = super()._run, args[5]
        gates, outers = list(self.spec1d["gates"]), list(self.spec1d["outers"])
        params = list(self.spec2d["params"])

        def backward(err, tensors, dy, dlast):
            failed(err, 2)
            n = 3 + len(gates)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in tensors]
                tok = dict(zip(("q", "k", "v", *gates), leaves[:n], strict=True))
                states = leaves[n + 3 + len(outers):]
                y, last = run_tiles("tiles", (tok, leaves[n], leaves[n + 1], leaves[n + 2][..., None],
                                              dict(zip(outers, leaves[n + 3:n + 3 + len(outers)], strict=True)),
                                              sz, dict(zip(params, states[0::2], strict=True)),
                                              dict(zip(params, states[1::2], strict=True))), tile)
                grads = torch.autograd.grad([y, *(last[p] for p in params)], leaves, [dy, *dlast],
                                            allow_unused=True)
            return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]
        return backward


class Rule2D(Kernels2D):
    """A compiled 2-D rule (Call2D) plus its Program and the `triton` backend (the tile program's generated
    kernels, codegen/triton_2d.py; `triton_reason` says when not); `auto` takes triton for covered CUDA
    calls of a non-exact rule."""

    def __init__(self, program: Program, module: types.ModuleType):
        self.program, self.module = program, module
        super().__init__(spec_2d(program, module.SPEC), {n: getattr(module, n) for n in FNS})

    def __deepcopy__(self, memo) -> Rule2D:
        return self  # immutable and shared, as memdsl.api.CompiledRule

    @property
    def auto_kernels(self) -> bool:  # the module switch, read at each call
        return AUTO_TRITON

    def _run_kernels(self, args, tile, torch_backward=None):
        from codegen import triton_2d
        return triton_2d.tiles(self, *args, tile, torch_backward)

    def triton_reason(self, sizes: dict, T: int, V: int, tile: tuple[int, int] | None = None) -> str | None:
        """None when the generated Triton kernels (codegen/triton_2d.py) cover a call over T x V cells at these
        sizes (`self.sizes(...)`) and tile; else why not."""
        from codegen import triton_2d
        return triton_2d.reason(self, sizes, T, V, tuple(tile or self.tile))

    _kernel_reason = triton_reason

    def module_class(self) -> type:
        """An nn.Module class for this rule: Memory(n_heads, d, **sizes), outers and initial memory learnable."""
        rule = self

        class Memory(Memory2D):
            def __init__(self, n_heads: int, d: int, **sizes):
                super().__init__(rule, n_heads, d, **sizes)
        return Memory


_MEMO: dict[tuple, Rule2D] = {}


def program_2d(path_or_source: str, tile: tuple[int, int] | None = None, semantics: str | None = None) -> Program:
    """The checked Program of a 2-D rule with the tile and semantics overrides applied."""
    from .driver import load
    p = load(path_or_source, schedule={"semantics": semantics} if semantics else None)
    if p.axes is None:
        raise ValueError(f"rule {p.name} is 1-D (no `axes time, variate`): use memdsl.compile")
    if tile is not None:
        p.schedule = dataclasses.replace(p.schedule, tile=_checked_tile(tile))
    return p


def _checked_tile(tile) -> tuple[int, int]:
    if not isinstance(tile, (tuple, list)) or len(tile) != 2 or \
            not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 16 for x in tile):
        raise ValueError(f"tile must be two integers from 1 to 65536, got {tile!r}")
    return tuple(tile)


def compile_2d(path_or_source: str, tile: tuple[int, int] | None = None, semantics: str | None = None) -> Rule2D:
    """Compile a 2-D rule (path or text). `tile` and `semantics` override the file's schedule. Compiled rules
    are kept per process by source text (compiling takes 20-150 ms: no disk cache)."""
    from codegen.module import generate

    from .driver import read_source
    source, _ = read_source(path_or_source)
    key = (source, None if tile is None else _checked_tile(tile), semantics)
    if key in _MEMO:
        return _MEMO[key]
    p = program_2d(path_or_source, tile, semantics)
    from .api import new_module
    mod = new_module(f"memdsl_rule2d_{p.name}")
    exec(compile(generate(p), f"<memdsl 2-D rule {p.name}>", "exec"), mod.__dict__)  # our own generated code
    rule = Rule2D(p, mod)
    rule.source = source  # the Triton path rebuilds the program with its gradient factors exposed
    _MEMO[key] = rule
    return rule
