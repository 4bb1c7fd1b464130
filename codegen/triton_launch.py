# memdsl Triton launcher: load generated kernel sources, launch them, differentiate through them.
#
# Pure torch and the standard library (triton is imported by the kernel sources themselves, when
# first loaded): `memdsl compile --triton` copies this file verbatim into standalone modules, next
# to runtime_torch.py. A rule plugs in through its runtime object (`impl`: sizes, gates, outers,
# init_state, hyper-parameter formulas), its SPEC, and `get_kernel(direction, sizes, chunk)`.
#
# Both directions are generated kernels: the forward saves every chunk-start state (`SAVE`), the
# backward walks the chunks in reverse, recomputes each chunk from its saved state and carries the
# state cotangent. Hyper-parameters (learning rates, decays, keeps, position scales) are computed
# from the gates in torch before the kernel and enter it as [B, T, H] tensors ([B, T, H, channels] for
# per-channel ones), so their own derivatives (through sigmoid gates, outer constants, ...) are left to
# torch autograd.
import hashlib
import importlib.util
import itertools
import os
from pathlib import Path

import torch

from .frontend_torch import no_autocast

HYPER_NAMES = ("lr", "mu", "keep", "scale")  # the kernels' hyper-parameter inputs, in signature order


def kernel_cache_dir():
    root = os.environ.get("MEMDSL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "memdsl")
    return Path(root)


def raised_by_triton(err: BaseException) -> bool:
    """An error of Triton's own (compiling or launching a kernel), not of the call: a triton exception class
    (OutOfResources, CompilationError), or any error whose innermost frame is in the triton package (its
    MLIR passes raise plain RuntimeErrors)."""
    if type(err).__module__.split(".")[0] == "triton":
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}triton{os.sep}" in tb.tb_frame.f_code.co_filename


def load_kernel(source, entry):
    """Import a generated kernel source, autotuned (see `autotuned`)."""
    return autotuned(import_kernel(source, entry))


def import_kernel(source, entry, prefix="triton"):
    """Import a generated kernel source from a file in the cache directory (Triton's JIT reads a function's
    source from its file)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = kernel_cache_dir() / f"{prefix}_{digest}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # atomic: concurrent processes never see a partial file
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"memdsl_{prefix}_{digest}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, entry)


def autotuned(kernel):
    """Wrap a kernel in triton.autotune over warps and pipeline stages, keyed on the sequence length
    and head count (the chunk and every tile shape are fixed by the rule). The kernels update state
    buffers in place (P_* forward, D* backward), so those are restored between trials. The CPU
    interpreter cannot time kernels, and MEMDSL_AUTOTUNE=0 turns tuning off (first call is faster)."""
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("MEMDSL_AUTOTUNE") == "0":
        return kernel
    import triton
    in_place = [a for a in kernel.arg_names if a.startswith(("P_", "DA_", "DS_"))]
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (1, 2, 3)]
    return triton.autotune(configs=configs, key=["T", "H", "NC"], restore_value=in_place)(kernel)


def _state_keys(spec) -> list[str]:
    keys = [f"A.{p}" for p in spec["params"]]
    if spec["optim"] in ("momentum", "muon"):
        keys += [f"S.{p}" for p in spec["params"]]
    return keys


class TritonChunk(torch.autograd.Function):
    """Forward and backward: the generated kernels. Inputs are fp32, contiguous, kernel layouts."""

    @staticmethod
    def forward(ctx, get_kernel, chunk, sizes, save, n_gates, n_outers, cu_seqlens, *tensors):
        fwd = get_kernel("fwd", sizes, chunk)
        q, k, v, lr, mu, keep, scale = tensors[:7]
        gates = tensors[7:7 + n_gates]
        outers = tensors[7 + n_gates:7 + n_gates + n_outers]
        states = tensors[7 + n_gates + n_outers:]
        B, T, H, _ = q.shape
        N, NC, cu = _programs(B, T, chunk, cu_seqlens, q.device)
        # poisoned: an element the kernel fails to write stays NaN and fails every comparison
        y = torch.full((B, T, H, v.shape[-1]), float("nan"), device=q.device, dtype=torch.float32)
        new_states = [s.clone() for s in states]
        saved = [s.new_empty((N, H, NC, *s.shape[2:])) if save else s for s in states]
        fwd[(N * H,)](q, k, v, lr, mu, keep, scale, *gates, *outers, y, *new_states, *saved,
                      cu, T, H, NC, C=chunk, VARLEN=cu_seqlens is not None, SAVE=save)
        ctx.meta = (get_kernel, chunk, sizes, n_gates, n_outers, cu_seqlens)
        if save:
            ctx.save_for_backward(q, k, v, lr, mu, keep, scale, *gates, *outers, *saved)
        return (y, *new_states)

    @staticmethod
    def backward(ctx, dy, *dstates):
        grad = next((t for t in (dy, *dstates) if t is not None), None)
        with no_autocast(grad):  # a backward called under autocast: the programs keep their own precision
            return TritonChunk._backward(ctx, dy, *dstates)

    @staticmethod
    def _backward(ctx, dy, *dstates):
        get_kernel, chunk, sizes, n_gates, n_outers, cu_seqlens = ctx.meta
        bwd = get_kernel("bwd", sizes, chunk)
        q, k, v, lr, mu, keep, scale, *rest = ctx.saved_tensors
        gates, outers, saved = rest[:n_gates], rest[n_gates:n_gates + n_outers], rest[n_gates + n_outers:]
        B, T, H, _ = q.shape
        N, NC, cu = _programs(B, T, chunk, cu_seqlens, q.device)
        dy = torch.zeros((B, T, H, v.shape[-1]), device=q.device) if dy is None else dy.float().contiguous()
        dstate = [torch.zeros(s.shape[:2] + s.shape[3:], device=s.device) if d is None else d.float().contiguous()
                  .clone() for s, d in zip(saved, dstates, strict=True)]
        dq, dk, dv = (torch.zeros_like(x) for x in (q, k, v))
        dhyper = [torch.zeros_like(x) for x in (lr, mu, keep, scale)]
        dgates = [torch.zeros_like(g) for g in gates]
        douters = [torch.zeros((N, *o.shape), device=o.device) for o in outers]
        bwd[(N * H,)](q, k, v, lr, mu, keep, scale, *gates, *outers, *saved, dy, *dstate,
                      dq, dk, dv, *dhyper, *dgates, *douters, cu, T, H, NC, C=chunk, VARLEN=cu_seqlens is not None)
        return (None, None, None, None, None, None, None, dq, dk, dv, *dhyper, *dgates,
                *[d.sum(0) for d in douters], *dstate)


def _programs(B: int, T: int, chunk: int, cu_seqlens, device):
    """(sequences, most chunks in one sequence, the offsets tensor the kernel reads)."""
    if cu_seqlens is None:
        return B, -(-T // chunk), torch.zeros(1, dtype=torch.int32, device=device)
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return len(lengths), max(1, -(-int(lengths.max()) // chunk)), cu_seqlens.to(torch.int32)


def launch(impl, spec, get_kernel, q, k, v, gates, params, state, chunk, cu_seqlens=None):
    """A rule's Triton path: [B, T, H, D] in, (y, state) out, differentiable.
    With `cu_seqlens` (B = 1), the packed sequences run independently, one state each."""
    chunk = int(chunk or spec["chunk"])
    sz = impl.sizes(k=k, v=v, q=q)
    shapes = impl.fns["shapes"](sz)
    B, T, H = q.shape[:3]
    params = dict(params or {})
    outers = impl._outers(params, H, shapes, q.device)
    gates_bht = impl._gates(gates, B, T, H, shapes, q.device)  # [B, H, T]
    N = B if cu_seqlens is None else len(cu_seqlens) - 1
    if state is None:
        state = impl.init_state(N, H, sizes=sz, device=q.device, params=params)
    hyper = _hyper(impl, spec, gates_bht, outers, sz, T, chunk, q, cu_seqlens)
    keys = _state_keys(spec)
    tensors = [q.float().contiguous(), k.float().contiguous(), v.float().contiguous(), *hyper]
    tensors += [gates_bht[n].transpose(1, 2).float().contiguous() for n in spec["gates"]]
    tensors += [outers[n].float().contiguous() for n in spec["outers"]]
    tensors += [state[key].float().contiguous() for key in keys]
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    sizes = {n: int(value) for n, value in sz.items()}
    y, *new = TritonChunk.apply(get_kernel, chunk, sizes, save, len(spec["gates"]), len(spec["outers"]), cu_seqlens,
                                *tensors)
    out_state = dict(state)
    out_state.update(zip(keys, new, strict=True))
    if spec["window"] > 1:  # the last c - 1 tokens, as the torch paths keep them for the next call
        out_state.update(_window_history(spec, k, v, gates_bht, cu_seqlens))
    return y.to(q.dtype), out_state


def _window_history(spec, k, v, gates_bht, cu_seqlens):
    """hist.k, hist.v, hist.<gate>: each sequence's last c - 1 tokens (fewer if it is shorter) in the
    runtime layout [N, H, m, ...], as the torch paths keep them; packed sequences of unequal short
    lengths have no common shape and get none."""
    keep = spec["window"] - 1
    spans = [(0, k.shape[1])] if cu_seqlens is None else list(itertools.pairwise(cu_seqlens.tolist()))
    if len({min(keep, hi - lo) for lo, hi in spans}) > 1:
        return {}

    def last(x):  # x: [B, H, T, ...] -> [N, H, m, ...]
        return torch.cat([x[:, :, max(lo, hi - keep):hi] for lo, hi in spans], dim=0)
    out = {"hist.k": last(k.transpose(1, 2)), "hist.v": last(v.transpose(1, 2))}
    out.update({f"hist.{n}": last(g) for n, g in gates_bht.items()})
    return out


def _hyper(impl, spec, gates_bht, outers, sz, T, chunk, q, cu_seqlens) -> list[torch.Tensor]:
    """lr, mu, keep, scale as [B, T, H] fp32 tensors (torch autograd differentiates their formulas).
    Packed sequences get their own positions (TTT's 1/i scale restarts in every sequence)."""
    spans = [(0, T)] if cu_seqlens is None else list(itertools.pairwise(cu_seqlens.tolist()))
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in HYPER_NAMES}
    like = q.transpose(1, 2).float()
    for lo, hi in spans:
        if hi == lo:
            continue
        hyp = impl.runtime.hyper_values({n: g[:, :, lo:hi].float() for n, g in gates_bht.items()},
                                        {n: o.float() for n, o in outers.items()}, sz, hi - lo, chunk,
                                        like[:, :, lo:hi])
        keep, _ = impl.runtime.keep_rate(hyp)
        values = {"lr": hyp[spec["lr"]], "mu": hyp[spec["decay"]] if spec["decay"] else None,
                  "keep": keep, "scale": hyp[spec["scale"]] if spec["scale"] else None}
        for n in HYPER_NAMES:
            value = values[n] if values[n] is not None else like[:, :, lo:hi, :1] * 0
            parts[n].append(value[..., 0] if value.shape[-1] == 1 else value)  # per channel: [B, H, T, ch]
    B, H = like.shape[:2]
    return [torch.cat(parts[n], dim=2).transpose(1, 2).contiguous() if parts[n] else torch.zeros(B, T, H)
            for n in HYPER_NAMES]


def run_packed(call, init_state, q, k, v, gates, params, state, cu_seqlens, **kw):
    """Packed sequences on a path without varlen support, states stacked; the reference for the kernels.
    `call(q, k, v, gates, params, state, **kw)` runs a batch of equally long sequences: the sequences of
    each length run as one batch (a padded batch is mostly full rows: a few calls, not one per row)."""
    bounds = list(itertools.pairwise(cu_seqlens.tolist()))
    by_length: dict[int, list[int]] = {}
    for i, (lo, hi) in enumerate(bounds):
        by_length.setdefault(hi - lo, []).append(i)
    pieces: dict[int, torch.Tensor] = {}  # sequence -> its y [1, length, H, Dv]
    states: list[dict | None] = [None] * len(bounds)
    for length, seqs in by_length.items():
        own = None if state is None else {n: s[seqs] for n, s in state.items()}
        if length == 0:  # an empty sequence keeps its state
            for j, i in enumerate(seqs):
                states[i] = {n: s[j:j + 1] for n, s in own.items()} if own is not None else init_state()
            continue
        rows = [slice(bounds[i][0], bounds[i][1]) for i in seqs]

        def batch(x, rows=rows):
            return torch.cat([x[:, r] for r in rows])
        y, s = call(batch(q), batch(k), batch(v), {n: batch(g) for n, g in (gates or {}).items()}, params, own, **kw)
        for j, i in enumerate(seqs):
            pieces[i] = y[j:j + 1]
            states[i] = {n: t[j:j + 1] for n, t in s.items()}
    ys = [pieces[i] for i in range(len(bounds)) if i in pieces]
    y = torch.cat(ys, dim=1) if ys else q.new_zeros(*q.shape[:3], v.shape[-1])
    return y, _stack_states(states)


def _stack_states(states):
    """One state per sequence -> the packed batch's state. A window history (hist.*) that the sequences
    do not all have, or have with different lengths (an empty or short sequence), has no common shape
    and is left out, as the kernels' launcher leaves it out (_window_history)."""
    keys = dict.fromkeys(n for s in states for n in s)  # every entry, in first-seen order
    same = [n for n in keys if all(n in s for s in states) and len({tuple(s[n].shape[1:]) for s in states}) == 1]
    dropped = set(keys) - set(same)
    if any(not n.startswith("hist.") for n in dropped):
        raise ValueError(f"packed sequences: state entries {sorted(dropped)} have different shapes")
    return {n: torch.cat([s[n] for s in states]) for n in same}


def check_cu_seqlens(cu_seqlens, q):
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError("cu_seqlens: expected a 1-D integer tensor of sequence offsets [0, ..., T]")
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens: packed sequences need batch size 1, got q of shape {tuple(q.shape)}")
    bounds = cu_seqlens.tolist()
    ordered = all(a <= b for a, b in itertools.pairwise(bounds))
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != q.shape[1] or not ordered:
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T={q.shape[1]}, got {bounds}")
