"""Running generated Triton kernels: compile (cached on disk), launch, and the autograd.Function.

The forward runs the generated kernel. The backward does not yet have generated kernels: it
recomputes the chunk program with the torch dual form under autograd (same math, checked equal
in tests) — correct gradients, torch speed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os

import torch

from .triton_gen import Unsupported, generate_kernel

_KERNELS: dict[str, object] = {}


def kernel_for(rule, sizes: dict[str, int], chunk: int):
    """The compiled kernel function for this rule, sizes and chunk (generated once, cached on disk)."""
    from memdsl.api import cache_dir
    from memdsl.driver import load
    key = f"{rule.key}-{sorted(sizes.items())}-{chunk}"
    if key in _KERNELS:
        return _KERNELS[key]
    program = load(rule.module.RULE_SOURCE, schedule={"chunk": rule.chunk} if rule.chunk else None)
    from .module import factor_outputs
    factor_outputs(program)
    source = generate_kernel(program, rule.spec, sizes, chunk)
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / f"triton_{digest}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
    spec = importlib.util.spec_from_file_location(f"memdsl_triton_{digest}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _KERNELS[key] = mod.memdsl_chunk_fwd
    return mod.memdsl_chunk_fwd


def triton_forward(rule, q, k, v, gates, outers, state, sz, chunk):
    """y [B, T, H, Dv] and the new state, from the generated kernel. Inputs in the frontend's layout."""
    spec = rule.spec
    impl = rule.impl
    B, T, H, _ = q.shape
    kern = kernel_for(rule, {n: int(value) for n, value in sz.items()}, chunk)
    gates_bht = {n: g.transpose(1, 2) for n, g in gates.items()}  # [B, H, T]
    hyp = impl.runtime.hyper_values(gates_bht, outers, sz, T, chunk, q.transpose(1, 2).float())
    keep, _ = impl.runtime.keep_rate(hyp)

    def flat(x):
        return x[..., 0].float().contiguous() if x is not None else torch.empty(1, device=q.device)
    lr = flat(hyp[spec["lr"]])
    mu = flat(hyp[spec["decay"]]) if spec["decay"] else lr
    keep_t = flat(keep) if keep is not None else lr
    scale = flat(hyp[spec["scale"]]) if spec["scale"] else lr
    # poisoned: an element the kernel fails to write stays NaN and fails every comparison
    y = torch.full((B, T, H, v.shape[-1]), float("nan"), device=q.device, dtype=torch.float32)
    new_state = {key: t.float().contiguous().clone() for key, t in state.items()}
    args = [q.float().contiguous(), k.float().contiguous(), v.float().contiguous(), y, lr, mu, keep_t, scale]
    args += [gates[n].float().contiguous() for n in spec["gates"]]
    args += [outers[n].float().contiguous() for n in spec["outers"]]
    params = list(spec["params"])
    args += [new_state[f"A.{p}"] for p in params]
    if spec["optim"] == "momentum":
        args += [new_state[f"S.{p}"] for p in params]
    kern[(B * H,)](*args, T, H, C=chunk)
    return y.to(q.dtype), new_state


class TritonChunk(torch.autograd.Function):
    """Forward: the generated Triton kernel. Backward: torch recompute of the same chunk program."""

    @staticmethod
    def forward(ctx, rule, chunk, names, *tensors):
        q, k, v, *rest = tensors
        gates, outers, state = _unpack(names, rest)
        ctx.rule, ctx.chunk, ctx.names = rule, chunk, names
        ctx.save_for_backward(*tensors)
        y, new_state = triton_forward(rule, q, k, v, gates, outers, state, rule.impl.sizes(k=k, v=v, q=q), chunk)
        ctx.state_keys = sorted(new_state)
        return (y, *[new_state[key] for key in ctx.state_keys])

    @staticmethod
    def backward(ctx, gy, *gstate):
        tensors = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        q, k, v, *rest = tensors
        gates, outers, state = _unpack(ctx.names, rest)
        with torch.enable_grad():
            y, new_state = ctx.rule(q, k, v, gates, params=outers, state=state, chunk=ctx.chunk, backend="dual")
            outs = [y] + [new_state[key] for key in ctx.state_keys]
            grads = [g if g is not None else torch.zeros_like(o) for g, o in zip((gy, *gstate), outs, strict=True)]
            result = torch.autograd.grad(outs, tensors, grads, allow_unused=True)
        return (None, None, None, *result)


def _unpack(names, rest):
    gates_n, outers_n, state_n = names
    it = iter(rest)
    gates = {n: next(it) for n in gates_n}
    outers = {n: next(it) for n in outers_n}
    state = {n: next(it) for n in state_n}
    return gates, outers, state


def run_triton(rule, q, k, v, gates, params, state, chunk):
    """The public Triton path of a compiled rule: [B, T, H, D] in, (y, state) out, differentiable."""
    chunk = int(chunk or rule.chunk)
    impl = rule.impl
    sz = impl.sizes(k=k, v=v, q=q)
    shapes = impl.fns["shapes"](sz)
    B, T, H = q.shape[:3]
    params = dict(params or {})
    outers = impl._outers(params, H, shapes, q.device)
    gates = impl._gates(gates, B, T, H, shapes, q.device)
    gates = {n: g.transpose(1, 2) for n, g in gates.items()}  # back to [B, T, H] for the kernel
    if state is None:
        state = impl.init_state(B, H, sizes=sz, device=q.device, params=params)
    names = (tuple(gates), tuple(outers), tuple(sorted(state)))
    tensors = [q, k, v, *gates.values(), *outers.values(), *[state[n] for n in names[2]]]
    y, *flat_state = TritonChunk.apply(rule, chunk, names, *tensors)
    return y, dict(zip(sorted(state), flat_state, strict=True))


__all__ = ["Unsupported", "run_triton", "triton_forward"]
