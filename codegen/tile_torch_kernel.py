"""The torch-printed chunk programs as kernels: graphs, layouts and the Triton calling convention.

`TorchChunkKernel` builds a rule's forward or backward tile graph (the ones triton_gen.py prints as
Triton), prints it with `tile_torch.print_program`, and runs it like a generated kernel:
`kernel[grid](*tensors, CU, T, H, NC, C=..., VARLEN=..., SAVE=...)`, so `triton_launch.launch` /
`TritonChunk` drive it unchanged (`run_tiles`). It converts the kernels' layouts ([B, T, H, d]
tokens, [B, H, *shape] states, [B, H, NC, *shape] saved states) to tiles [B, H, NC, r, c] and back.
"""

from __future__ import annotations

import linecache

import torch
import torch.nn.functional as F

from .chunk_tiles import Unsupported, pad
from .tile_eval import mask_value
from .tile_grad import backward
from .tile_ir import TileGraph
from .tile_torch import _live, _Plan, _specialise_full, print_program
from .tile_torch_fusion import INPLACE_HELPERS, _addmm
from .torch_activations import PRELUDE
from .triton_gen import HYPER, TOKENS, _graph, _Layout, supported

STASH = "_memdsl_tiles_stash"  # attribute of the first saved-state tensor: (forward key, T, {t<i>: values})
FILL = {"lr": 0.0, "mu": 1.0, "keep": 1.0, "scale": 0.0}  # hyper-parameters on padded rows (as the kernels load)


def _compile(source: str, name: str, key: str):
    filename = f"<memdsl tiles {key}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns = {"torch": torch, "_addmm": _addmm, **INPLACE_HELPERS}
    exec(PRELUDE, ns)  # _gelu_grad, for the fused gelu derivative the printer emits
    exec(compile(source, filename, "exec"), ns)
    return ns[name]


class TorchChunkKernel:
    """The chunk program of one rule, sizes and chunk as batched torch code, called like a Triton kernel:
    `kernel[grid](*tensors, CU, T, H, NC, C=..., VARLEN=..., SAVE=...)` (the grid is ignored: every
    (batch, head) program runs at once). `source(variant)` is the generated function's text; variants:
    full or ragged chunks, and for the forward whether the chunk-start states are saved."""

    def __init__(self, p, spec: dict, sizes: dict[str, int], chunk: int, direction: str,
                 read_order: str | None = None):
        why = supported(p, spec, read_order)
        if why:
            raise Unsupported(why)
        self.lay = lay = _Layout(p, spec, sizes)
        self.direction, self.chunk = direction, chunk
        graph = _graph(p, spec, lay, chunk, read_order)
        self.window = graph.shape(graph.inputs["hist_valid"])[0] if "hist_valid" in graph.inputs else 0
        if direction == "fwd":
            results = {"y": graph.outputs["y"]}
            carried = {s: graph.outputs[s] for s in lay.states}
        else:
            seeds = [(graph.outputs["y"], graph.input("dy", graph.shape(graph.outputs["y"])))]
            seeds += [(graph.outputs[s], graph.input(f"d{s}", graph.shape(graph.outputs[s]))) for s in lay.states]
            wrt = [f"{prefix}_{n}" for prefix in ("tok", "hist") for n in (*TOKENS, *lay.gates)]
            wrt = [n for n in wrt + list(HYPER) + [f"out_{n}" for n in lay.outers] + lay.states if n in graph.inputs]
            adj = backward(graph, seeds, [graph.inputs[n] for n in wrt])
            results = {n: adj[graph.inputs[n]] for n in wrt if n not in lay.states}
            for n in [n for n in results if n.startswith("hist_")]:  # rows before the sequence get nothing
                results[n] = graph.where(graph.inputs["hist_valid"], results[n], graph.const(0.0))
            carried = {f"d{s}": adj[graph.inputs[s]] for s in lay.states}
        chunked = {n for n in graph.inputs if n.startswith(("tok_", "hist_")) or n in HYPER or n in
                   ("valid", "is_last", "hist_valid", "dy")}
        if direction == "bwd":
            chunked |= set(lay.states)  # every chunk-start state was saved by the forward
        self._check_inputs(graph, chunk)
        self.graph, self.results, self.carried, self.chunked = graph, results, carried, chunked
        self.inputs = set(graph.inputs)
        self._sources: dict[tuple, str] = {}
        self._fns: dict[tuple, object] = {}
        self._variants: dict[bool, tuple] = {}
        self._wanted: dict[bool, frozenset[int]] = {}
        self.partner = None  # forward: a callable giving its backward kernel (kernel_for sets it)
        self.masks = {n: mask_value(d) for n, d in graph.mask_defs.items()}
        ii = torch.arange(chunk)
        self.masks.update(lower=ii[:, None] >= ii[None, :], strict=ii[:, None] > ii[None, :],
                          shift=ii[:, None] == ii[None, :] + 1, first=(ii == 0)[:, None])
        self.full_masks = {"valid": torch.ones(chunk, 1, dtype=torch.bool), "is_last": (ii == chunk - 1)[:, None]}
        self.key = f"{p.name}-{sorted(sizes.items())}-{chunk}-{direction}-{read_order}"
        self.source(ragged=True)  # every node printed once now: an op without a torch spelling is Unsupported here
        self._sources.clear()  # printed again on use, once `partner` is known

    def _check_inputs(self, graph: TileGraph, C: int) -> None:
        """Every graph input must be one this driver prepares, in the shape it prepares it (the per-position
        state kernels of state_tiles.py bind more: per-channel hyper-parameters, lag masks)."""
        lay, hh = self.lay, self.window
        want = {"valid": (C, 1), "is_last": (C, 1), "hist_valid": (hh, 1), "lower": (C, C), "strict": (C, C),
                "shift": (C, C), "first": (C, 1), "dy": (C, pad(lay.shape["v"][0]))}
        want.update({n: (C, 1) for n in HYPER})
        for prefix, rows in (("tok", C), ("hist", hh)):
            want.update({f"{prefix}_{n}": (rows, pad(lay.shape[n][0])) for n in TOKENS})
            want.update({f"{prefix}_{n}": (rows, 1) for n in lay.gates})
        want.update({f"out_{n}": lay.tile_of(n) for n in lay.outers})
        for s in lay.states:
            want[s] = want[f"d{s}"] = lay.tile_of(s[2:])
        for name, i in graph.inputs.items():
            if name not in graph.mask_defs and want.get(name) != graph.shape(i):
                raise Unsupported(f"tile input {name} {list(graph.shape(i))} is not one the torch driver prepares")

    def _variant(self, ragged: bool):
        """(graph, results, carried, chunked) for ragged sequences, or specialised to full chunks."""
        if ragged not in self._variants:
            g, res, car, chk = self.graph, self.results, self.carried, self.chunked
            if not ragged:
                g = _specialise_full(self.graph)
                res = {n: g._renamed[i] for n, i in res.items()}
                car = {n: g._renamed[i] for n, i in car.items()}
                chk = chk - {"valid", "is_last"}
            self._variants[ragged] = (g, res, car, chk)
        return self._variants[ragged]

    def wanted(self, ragged: bool) -> frozenset[int]:
        """Backward: the forward values it reads that the forward holds for every chunk anyway (its graph is
        the forward graph with the adjoints appended, so node ids agree); the forward hands them over
        instead of the backward recomputing them."""
        if ragged not in self._wanted:
            g, res, car, chk = self._variant(ragged)
            states = self.lay.states
            fwd = _Plan(g, {s: g.outputs[s] for s in states}, chk - set(states) - {"dy"}, {"y": g.outputs["y"]},
                        saved=tuple(states))
            held = fwd.available()
            reached = _live(g, list(res.values()) + list(car.values()), held)
            self._wanted[ragged] = frozenset(i for i in reached if i in held)
        return self._wanted[ragged]

    def source(self, ragged: bool, save: bool = True, stash: bool = False, wrt: frozenset[str] | None = None) -> str:
        """The generated function for full (T a multiple of C) or ragged sequences. Forward: `save` keeps every
        chunk-start state (for the backward) and reads after the loop, else reads inside it; with a backward
        partner it also returns the values that backward wants. Backward: `stash` takes those values as inputs
        instead of recomputing them; `wrt` (result names) computes only those gradients (and the state
        cotangents): what feeds only the others — for hyper-parameters that need none, the decay products'
        adjoints (state inner products in the loop, the C×C algebra after it) — is not printed."""
        key = (ragged, save or self.direction == "bwd", stash, wrt if self.direction == "bwd" else None)
        if key not in self._sources:
            g, res, car, chk = self._variant(ragged)
            given: frozenset[int] = frozenset()
            if self.direction == "fwd" and key[1] and self.partner is not None:
                res = {**res, **{f"t{i}": i for i in sorted(self.partner().wanted(ragged))}}
            if self.direction == "bwd" and stash:
                given = self.wanted(ragged)
            if key[3] is not None:
                res = {n: i for n, i in res.items() if n in key[3]}
            name = f"chunk_{self.direction}_{'ragged' if ragged else 'full'}{'' if key[1] else '_nosave'}" + \
                ("_stash" if stash else "") + ("" if key[3] is None else "_wrt_" + "_".join(sorted(key[3])))
            self._sources[key] = print_program(g, car, chk, res, self.direction == "bwd", name, after_loop=key[1],
                                               saved=tuple(car) if self.direction == "fwd" and key[1] else (),
                                               given=given)
        return self._sources[key]

    def function(self, ragged: bool, save: bool = True, stash: bool = False, wrt: frozenset[str] | None = None):
        key = (ragged, save or self.direction == "bwd", stash, wrt if self.direction == "bwd" else None)
        if key not in self._fns:
            src = self.source(*key)
            name = src[4:src.index("(")]
            self._fns[key] = _compile(src, name, f"{self.key}-{name}")
        return self._fns[key]

    def __getitem__(self, grid):
        return self

    # ---- the kernels' layouts <-> tiles [B, H, NC, r, c] --------------------------------------------
    def _tiles(self, x, NC: int, width: int, fill: float = 0.0):
        """[B, T, H, d] -> [B, H, NC, C, width] (rows past T filled with `fill`, columns past d with 0)."""
        B, T, H, d = x.shape
        C = self.chunk
        if width != d:
            x = F.pad(x, (0, width - d))
        if NC * C != T:
            x = F.pad(x, (0, 0, 0, 0, 0, NC * C - T), value=fill)
        return x.reshape(B, NC, C, H, width).permute(0, 3, 1, 2, 4).contiguous()

    def _untile(self, x, T: int, width: int):
        """[B, H, NC, C, w] -> [B, T, H, width]."""
        B, H, NC, C, w = x.shape
        return x.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, w)[:, :T, :, :width]

    def _history(self, x, NC: int, width: int):
        """The `window` rows before each chunk: [B, T, H, d] -> [B, H, NC, Hh, width]."""
        B, T, H, d = x.shape
        C, hh = self.chunk, self.window
        x = F.pad(x, (0, width - d, 0, 0, hh, NC * C - T))
        return x[:, :NC * C].reshape(B, NC, C, H, width)[:, :, :hh].permute(0, 3, 1, 2, 4).contiguous()

    def _state(self, x, name: str, *lead: int):
        """[*lead, *shape] -> [*lead, pm, pn] (zero padding)."""
        (pm, pn), (m, n) = self.lay.tile_of(name), self.lay.logical(name)
        x = x.reshape(*lead, m, n)
        return F.pad(x, (0, pn - n, 0, pm - m)) if (pm, pn) != (m, n) else x

    def _unstate(self, x, name: str):
        (m, n) = self.lay.logical(name)
        return x[..., :m, :n]

    def _inputs(self, x: dict, NC: int, T: int, B: int, H: int) -> dict:
        I: dict[str, torch.Tensor] = {}
        for n in TOKENS:
            width = pad(self.lay.shape[n][0])
            if f"tok_{n}" in self.inputs:
                I[f"tok_{n}"] = self._tiles(x[n], NC, width)
            if f"hist_{n}" in self.inputs:
                I[f"hist_{n}"] = self._history(x[n], NC, width)
        for n in self.lay.gates:
            g = x[f"G_{n}"].unsqueeze(-1)
            if f"tok_{n}" in self.inputs:
                I[f"tok_{n}"] = self._tiles(g, NC, 1)
            if f"hist_{n}" in self.inputs:
                I[f"hist_{n}"] = self._history(g, NC, 1)
        for n in HYPER:
            if n in self.inputs:
                I[n] = self._tiles(x[n].unsqueeze(-1), NC, 1, FILL[n])
        for n in self.lay.outers:
            I[f"out_{n}"] = self._state(x[f"O_{n}"], n, H, 1)
        I.update({n: m for n, m in self.masks.items() if n in self.inputs})
        C = self.chunk
        if T % C == 0:
            I.update({n: m for n, m in self.full_masks.items() if n in self.inputs})
        else:
            start = (torch.arange(NC) * C).reshape(1, 1, NC, 1, 1)  # chunked inputs are [B, H, NC, r, c]
            rows = start + torch.arange(C).reshape(C, 1)
            I["valid"], I["is_last"] = rows < T, rows == torch.clamp(start + C, max=T) - 1
        if self.window:
            hh, c = self.window, self.lay.window
            start = (torch.arange(NC) * C).reshape(1, 1, NC, 1, 1)
            rows_h = start - hh + torch.arange(hh).reshape(hh, 1)
            I["hist_valid"] = (rows_h >= 0) & (rows_h > start - c)
        return I

    def __call__(self, *args, C: int, VARLEN: bool, SAVE: bool = True):
        if VARLEN:
            raise Unsupported("packed sequences (cu_seqlens): run one call per sequence")
        if C != self.chunk:
            raise ValueError(f"kernel built for chunk {self.chunk}, called with {C}")
        lay = self.lay
        head = ["q", "k", "v", *HYPER, *[f"G_{n}" for n in lay.gates], *[f"O_{n}" for n in lay.outers]]
        if self.direction == "fwd":
            names = head + ["Y"] + [f"P_{s}" for s in lay.states] + [f"SAVE_{s}" for s in lay.states]
        else:
            names = head + [f"SAVE_{s}" for s in lay.states] + ["DY"] + [f"D{s}" for s in lay.states]
            names += ["DQ", "DK", "DV", *[f"D_{n}" for n in HYPER], *[f"DG_{n}" for n in lay.gates]]
            names += [f"DO_{n}" for n in lay.outers]
        if len(args) != len(names) + 4:
            raise TypeError(f"expected {len(names) + 4} arguments ({', '.join(names)}, CU, T, H, NC)")
        x = dict(zip(names, args[:-4], strict=True))
        T, H = args[-3], args[-2]
        B, NC = x["q"].shape[0], -(-T // self.chunk)
        I = self._inputs(x, NC, T, B, H)
        ragged, DT = T % self.chunk != 0, x["q"].dtype
        if self.direction == "fwd":
            I.update({s: self._state(x[f"P_{s}"], s[2:], B, H, 1) for s in lay.states})
            for s in lay.states:  # the saved states are written in place when they need no padding
                exact = lay.tile_of(s[2:]) == lay.logical(s[2:])
                I[f"start:{s}"] = self._state(x[f"SAVE_{s}"], s[2:], B, H, NC) if SAVE and exact else \
                    torch.empty(B, H, NC, *lay.tile_of(s[2:]), dtype=DT)
            out = self.function(ragged, SAVE)(I, B, H, NC, DT)
            if SAVE and self.partner is not None:  # handed to the backward with the saved states (STASH)
                setattr(x[f"SAVE_{lay.states[0]}"], STASH, (self.key, T, {n: v for n, v in out.items()
                                                                          if n.startswith("t")}, self._wrt(x)))
            x["Y"].copy_(self._untile(out["y"].expand(B, H, NC, C, -1), T, x["v"].shape[-1]))
            for s in lay.states:
                x[f"P_{s}"].copy_(self._unstate(out[f"final:{s}"], s[2:]).reshape(x[f"P_{s}"].shape))
                if SAVE and lay.tile_of(s[2:]) != lay.logical(s[2:]):
                    x[f"SAVE_{s}"].copy_(self._unstate(I[f"start:{s}"], s[2:]).reshape(x[f"SAVE_{s}"].shape))
            return None
        for s in lay.states:
            I[s] = self._state(x[f"SAVE_{s}"], s[2:], B, H, NC)
            I[f"d{s}"] = self._state(x[f"D{s}"], s[2:], B, H, 1)
        I["dy"] = self._tiles(x["DY"], NC, pad(lay.shape["v"][0]))
        stash = getattr(x[f"SAVE_{lay.states[0]}"], STASH, None)
        use = stash is not None and stash[0] == self.key.replace("-bwd-", "-fwd-") and stash[1] == T
        if use:
            I.update(stash[2])
        out = self.function(ragged, stash=use, wrt=stash[3] if use else None)(I, B, H, NC, DT)
        for s in lay.states:
            x[f"D{s}"].copy_(self._unstate(out[f"final:d{s}"], s[2:]).reshape(x[f"D{s}"].shape))
        self._store_grads(out, x, NC, T, B, H)
        return None

    def _wrt(self, x: dict) -> frozenset[str] | None:
        """Forward: the backward's results whose inputs require a gradient (autograd keeps the flags on the
        tensors a Function's forward receives: TritonChunk); the others' buffers stay zero. None (every result)
        when no input requires one: a caller driving the kernels directly, as Triton's, gets every gradient."""
        def source(n: str) -> str:  # tok_q / hist_q -> q, tok_<gate> -> G_<gate>, out_<n> -> O_<n>, lr -> lr
            if n.startswith(("tok_", "hist_")):
                base = n.split("_", 1)[1]
                return base if base in TOKENS else f"G_{base}"
            return f"O_{n[4:]}" if n.startswith("out_") else n
        wrt = frozenset(n for n in self.partner().results if getattr(x.get(source(n)), "requires_grad", False))
        return wrt or None

    def _store_grads(self, out: dict, x: dict, NC: int, T: int, B: int, H: int):
        C, hh = self.chunk, self.window
        for n, dst in (("q", "DQ"), ("k", "DK"), ("v", "DV"), *[(g, f"DG_{g}") for g in self.lay.gates]):
            if f"tok_{n}" not in out:
                continue
            g = out[f"tok_{n}"]
            width = g.shape[-1]
            grad = self._untile(g.expand(B, H, NC, C, width), T, width)
            if hh and f"hist_{n}" in out:  # the window's rows before each chunk: add them back where they came from
                buf = g.new_zeros(B, hh + NC * C, H, width)
                buf[:, hh:hh + T] = grad
                hist = out[f"hist_{n}"].expand(B, H, NC, hh, width).permute(0, 2, 3, 1, 4)
                buf[:, :NC * C].view(B, NC, C, H, width)[:, :, :hh] += hist
                grad = buf[:, hh:hh + T]
            x[dst].copy_(grad[..., 0] if dst.startswith("DG_") else grad[..., :x[dst].shape[-1]])
        for n in HYPER:
            if n in out:
                x[f"D_{n}"].copy_(self._untile(out[n].expand(B, H, NC, C, 1), T, 1)[..., 0])
        for n in self.lay.outers:
            if f"out_{n}" not in out:
                continue
            g = out[f"out_{n}"]
            g = g.expand(B, H, NC, *g.shape[-2:]).sum(2)
            x[f"DO_{n}"].copy_(self._unstate(g, n).reshape(x[f"DO_{n}"].shape))


# ---- compiled rules ---------------------------------------------------------------------------------

_KERNELS: dict[str, TorchChunkKernel] = {}


def kernel_for(rule, sizes: dict[str, int], chunk: int, direction: str = "fwd",
               read_order: str | None = None) -> TorchChunkKernel:
    """The torch-printed forward or backward chunk program of a compiled rule (cached per process)."""
    from .triton_run import program_for
    read_order = read_order or rule.spec["read_order"]
    key = f"{rule.key}-{sorted(sizes.items())}-{chunk}-{direction}-{read_order}"
    if key not in _KERNELS:
        kernel = TorchChunkKernel(program_for(rule), rule.spec, sizes, chunk, direction, read_order)
        if direction == "fwd":
            kernel.partner = lambda: kernel_for(rule, sizes, chunk, "bwd", read_order)
        _KERNELS[key] = kernel
    return _KERNELS[key]


def tiles_reason(rule, read_order: str | None = None) -> str | None:
    """None when the tile graphs cover this rule; otherwise why the torch chunk path runs instead."""
    from .triton_run import program_for
    return supported(program_for(rule), rule.spec, read_order or rule.spec["read_order"])


def run_tiles(rule, q, k, v, gates, params, state, chunk=None, read_order=None):
    """A compiled rule through the torch-printed tile programs: [B, T, H, D] in, (y, state) out,
    differentiable (the generated backward, through triton_launch.TritonChunk)."""
    from .triton_launch import launch

    def get_kernel(direction: str, sizes: dict[str, int], c: int):
        return kernel_for(rule, sizes, c, direction, read_order)
    return launch(rule.impl, rule.spec, get_kernel, q, k, v, gates, params, state, chunk or rule.chunk)


__all__ = ["TorchChunkKernel", "Unsupported", "kernel_for", "run_tiles", "tiles_reason"]
