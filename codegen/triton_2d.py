"""The Triton path of a 2-D rule (memdsl/twod.py `backend="triton"`): generate, cache, launch, differentiate.

One direction of a 2-D rule is one launch of the generated forward kernel (triton_2d_gen.py): one
program per (batch, head) walks the tiles, variate chunk by variate chunk, each chunk's time tiles in
order (with several chunks every tile's last variate row goes to the tile below it through memory). The
backward is the generated backward kernel. The hyper-parameters kt, kv, lr are computed from the
gates in torch before the kernel (Rule2D.hyper), so their own derivatives are left to autograd, as in
the 1-D launcher (triton_launch.py). A bidirectional rule runs the two directions as two launches
(Rule2D flips the variates), their reads summed by Rule2D.
"""

from __future__ import annotations

import hashlib
import math
import os

import sympy as sp
import torch

from .chunk_tiles import Unsupported, tile_shape_of
from .tile2d_tiles import tile_sizes
from .triton_launch import import_kernel, raised_by_triton

_KERNELS: dict[str, object] = {}
_PROGRAMS: dict[str, object] = {}
_REASONS: dict[str, str | None] = {}


def _key(rule) -> str:
    return hashlib.sha256(rule.source.encode()).hexdigest()[:16]


def _program(rule):
    """The rule's program with its gradient factors exposed (the graph builder reads them)."""
    if _key(rule) not in _PROGRAMS:
        from memdsl.driver import load

        from .module import factor_outputs
        program = load(rule.source)
        factor_outputs(program)
        _PROGRAMS[_key(rule)] = program
    return _PROGRAMS[_key(rule)]


def _load(source: str, entry: str):
    """Import a generated kernel (triton_launch.import_kernel); on a GPU, autotuned over warps and stages
    (every output buffer is written whole: nothing to restore)."""
    kernel = import_kernel(source, entry, "triton2d")
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("MEMDSL_AUTOTUNE") == "0":
        return kernel
    import triton
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]
    return triton.autotune(configs=configs, key=["T", "NV", "H", "NT"])(kernel)


def kernel_source(rule, sz: dict, padded: tuple[int, int], direction: str, rows: bool = False) -> str:
    """The generated forward ("fwd") or backward ("bwd") kernel source for these sizes and padded tile
    (`rows`: several variate chunks)."""
    from .triton_2d_gen import generate_backward_2d, generate_forward_2d
    generate = generate_forward_2d if direction == "fwd" else generate_backward_2d
    program = _program(rule)
    sym, shapes = _sizes_and_shapes(program, sz)
    return generate(program, rule.spec1d, shapes, sym, padded, rows)


def _sizes_and_shapes(program, sz: dict) -> tuple[dict, dict[str, list[int]]]:
    """The sizes as the graph builders substitute them (sympy symbols) and every tensor's shape."""
    sym = {sp.Symbol(n, positive=True, integer=True): int(x) for n, x in sz.items()}
    return sym, {t.name: [int(sp.sympify(s).subs(sym)) for s in t.shape] for t in program.tensors.values()}


def kernel_for(rule, sz: dict, padded: tuple[int, int], direction: str, rows: bool = False):
    key = f"{_key(rule)}-{sorted((n, int(x)) for n, x in sz.items())}-{padded}-{direction}-{rows}"
    if key not in _KERNELS:
        _KERNELS[key] = _load(kernel_source(rule, sz, padded, direction, rows), f"memdsl_tile2d_{direction}")
    return _KERNELS[key]


MAX_CELLS = 128  # cells per kernel tile: the tile's [n, n] transfer matrix is one register / shared-memory tile


def kernel_tile(rule, tile: tuple[int, int], T: int, V: int) -> tuple[int, int] | None:
    """The tile the kernels run: the rule's, when its padded cells fit MAX_CELLS; for a `scan2d` rule, whose
    result does not depend on the tile (the exact 2-D scan), a smaller one that fits (chimera's 32 x 8 runs as
    16 x 8); None when an anchored rule's tile (part of its model) does not fit."""
    Tc, Vc, Tp, Vp = tile_sizes(tile, T, V)
    if Tp * Vp <= MAX_CELLS:
        return tuple(tile)
    if rule.algorithm != "scan2d":
        return None
    variates = min(tile[1], MAX_CELLS)
    return (min(tile[0], MAX_CELLS // tile_sizes((1, variates), T, V)[3]), variates)


def reason(rule, sz: dict, T: int, V: int, tile: tuple[int, int], lr_width: int = 1) -> str | None:
    """None when the kernels cover this call; else why not (the caller raises or takes the torch tiles)."""
    if rule.algorithm == "wavefront":
        return "the exact wavefront (semantics exact) has no tile kernel"
    if kernel_tile(rule, tile, T, V) is None:
        Tp, Vp = tile_sizes(tile, T, V)[2:]
        return (f"a tile of {Tp} x {Vp} cells (padded): the kernels hold a tile's {Tp * Vp} x {Tp * Vp} transfer "
                f"matrix, at most {MAX_CELLS} cells (e.g. tile 16 x 8)")
    if lr_width != 1:
        return "a per-channel learning rate"
    Tc, Vc, Tp, Vp = tile_sizes(kernel_tile(rule, tile, T, V), T, V)
    key = f"{_key(rule)}-{sorted((n, int(x)) for n, x in sz.items())}-{(Tp, Vp)}-{V > Vc}"
    if key not in _REASONS:
        try:  # the backward graph holds every tile of the forward: generating it checks both
            kernel_source(rule, sz, (Tp, Vp), "bwd", V > Vc)
            _REASONS[key] = None
        except Unsupported as why:
            _REASONS[key] = str(why)
    return _REASONS[key]


class Tile2D(torch.autograd.Function):
    """Forward and backward of one direction: the generated kernels. Tensors are fp32 contiguous (layouts in
    triton_2d_gen): q, k, v, gates, kt, kv, lr, outers, then (left, top) per param. `torch_backward`, when
    given, is `f(err, tensors, dy, dlast) -> the tensors' gradients`: what the backward runs instead when
    Triton cannot compile or launch the backward kernel here (it is compiled at the first backward)."""

    @staticmethod
    def forward(ctx, get_kernel, tiling, n_gates, n_outers, widths, save, torch_backward, *tensors):
        Tc, Vc, Tp = tiling
        q, v = tensors[0], tensors[2]
        B, H, T, V = q.shape[:4]
        NT, NVC = -(-T // Tc), -(-V // Vc)
        cells = 3 + n_gates + 3 + n_outers
        states = tensors[cells:]
        y = torch.full((B, H, T, V, v.shape[-1]), float("nan"), device=q.device, dtype=torch.float32)
        last = [torch.full_like(s, float("nan")) for s in states[0::2]]
        saved = [s.new_empty((B, H, NT, *s.shape[2:])) for s in states[0::2]]
        # several variate chunks: every tile's last variate row, the row above the tile below it
        rows = [q.new_empty((B, H, NVC, NT, Tp, w)) for w in widths] if NVC > 1 else []
        outs = [y]
        for c, s in zip(last, saved, strict=True):
            outs += [c, s]
        get_kernel("fwd", NVC > 1)[(B * H,)](*tensors, *outs, *rows, T, V, H, NT, NVC, TC=Tc, VC=Vc, SAVE=save)
        ctx.meta = (get_kernel, tiling, n_gates, n_outers, widths, torch_backward)
        if save:
            ctx.save_for_backward(*tensors, *saved, *rows)
        return (y, *last)

    @staticmethod
    def backward(ctx, dy, *dlast):
        get_kernel, (Tc, Vc, Tp), n_gates, n_outers, widths, torch_backward = ctx.meta
        q, v = ctx.saved_tensors[0], ctx.saved_tensors[2]
        B, H, T, V = q.shape[:4]
        NT, NVC = -(-T // Tc), -(-V // Vc)
        n_params = len(dlast)
        n_rows = n_params if NVC > 1 else 0
        n_in = len(ctx.saved_tensors) - n_params - n_rows
        tensors = ctx.saved_tensors[:n_in]
        saved, rows = ctx.saved_tensors[n_in:n_in + n_params], ctx.saved_tensors[n_in + n_params:]
        cells = 3 + n_gates + 3 + n_outers
        states = tensors[cells:]
        dy = torch.zeros((B, H, T, V, v.shape[-1]), device=q.device) if dy is None else dy.float()
        dc = [torch.zeros_like(s) if d is None else d.float().contiguous() for s, d in zip(states[0::2], dlast,
                                                                                            strict=True)]
        dcell = [torch.zeros_like(x) for x in tensors[:3 + n_gates + 3]]
        douter = [torch.zeros((B, *o.shape), device=o.device) for o in tensors[3 + n_gates + 3:cells]]
        dstates = [torch.zeros_like(s) for s in states]
        drows = [q.new_zeros((B, H, NT, Tp, w)) for w in widths] if NVC > 1 else []
        grads = [*dcell]
        for dleft, dtop in zip(dstates[0::2], dstates[1::2], strict=True):
            grads += [dleft, dtop]
        grads += douter
        try:
            get_kernel("bwd", NVC > 1)[(B * H,)](*tensors, *saved, *rows, dy.contiguous(), *dc, *grads, *drows,
                                                 T, V, H, NT, NVC, TC=Tc, VC=Vc)
        except Exception as err:
            if torch_backward is None or not raised_by_triton(err):
                raise
            return (None,) * 7 + tuple(torch_backward(err, tensors, dy, dc))
        return (None,) * 7 + (*dcell, *[d.sum(0) for d in douter], *dstates)


def tiles(rule, tok, kt, kv, lr, outers, sz, left, top, tile, torch_backward=None):
    """One direction on the kernels, with Runtime2D.tiles' calling convention: tok {name: [B, H, T, V, ...]},
    kt, kv [B, H, T, V], lr [B, H, T, V, 1], outers {o: [H, *shape]}, left {p: [B, H, V, *shape]},
    top {p: [B, H, *shape]} -> y [B, H, T, V, dv], {p: the last time column [B, H, V, *shape]}.
    `torch_backward`: Tile2D's fallback for a backward kernel that fails (Kernels2D.torch_backward)."""
    T, V = kt.shape[2], kt.shape[3]
    why = reason(rule, sz, T, V, tile, lr.shape[-1])
    if why:
        raise Unsupported(why)
    Tc, Vc, Tp, Vp = tile_sizes(kernel_tile(rule, tile, T, V), T, V)
    params = list(rule.runtime.params)
    gates = list(rule.spec1d["gates"])
    outer_names = list(rule.spec1d["outers"])
    work = kt.dtype

    def f32(x):
        return x.to(torch.float32).contiguous()

    tensors = [f32(tok[x]) for x in ("q", "k", "v")] + [f32(tok[g]) for g in gates]
    tensors += [f32(kt), f32(kv), f32(lr[..., 0])] + [f32(outers[o]) for o in outer_names]
    for p in params:
        tensors += [f32(left[p]), f32(top[p])]
    save = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    widths = tuple(math.prod(tile_shape_of(list(top[p].shape[2:]))) for p in params)  # padded flat state widths

    def get_kernel(direction, rows):
        return kernel_for(rule, sz, (Tp, Vp), direction, rows)

    y, *last = Tile2D.apply(get_kernel, (Tc, Vc, Tp), len(gates), len(outer_names), widths, save, torch_backward,
                            *tensors)
    return y.to(work), {p: c.to(work) for p, c in zip(params, last, strict=True)}


__all__ = ["Tile2D", "Unsupported", "MAX_CELLS", "kernel_for", "kernel_source", "kernel_tile", "reason", "tiles"]
