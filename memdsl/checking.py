"""Checking a compiled rule: random inputs, every backend, errors per output and gradient.

Used by `memdsl check`, by the backend tests and by the examples.
"""

from __future__ import annotations

import torch


def make_inputs(rule, B=2, T=13, H=2, D=3, dtype=torch.float64, seed=0, low=0.05, high=0.35):
    """q, k, v (unit-norm q, k as MemoryLayer makes them), gates in a stable range, outers, initial memory."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shapes = rule.impl.fns["shapes"](rule.impl.sizes(sizes={"d": D}))
    q, k, v = (rnd(B, T, H, shapes[n][-1]) for n in ("q", "k", "v"))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    gates = {}
    for name in rule.spec["gates"]:
        shape = (B, T, H, *shapes[name])
        gates[name] = low + (high - low) * torch.rand(*shape, generator=gen, dtype=torch.float64)
    params = {}
    for name in rule.spec["outers"]:
        params[name] = 1.0 + 0.1 * rnd(H, *shapes[name])
    for name in rule.spec["params"]:
        base = rnd(H, *shapes[name]) * 0.3
        params[name] = base.abs() + 0.1 if rule.spec["projection"] == "softmax" else base
    cast = {n: t.to(dtype) for n, t in {"q": q, "k": k, "v": v}.items()}
    return cast, {n: g.to(dtype) for n, g in gates.items()}, {n: p.to(dtype) for n, p in params.items()}


def leaves(tok, gates, params):
    """Fresh leaf tensors that require grad, so two backends can be differentiated independently."""
    def leaf(t):
        return t.detach().clone().requires_grad_()
    return ({n: leaf(t) for n, t in tok.items()}, {n: leaf(t) for n, t in gates.items()},
            {n: leaf(t) for n, t in params.items()})


def run_with_grads(rule, tok, gates, params, seed=1, **kw):
    """Outputs, final state and the gradients of a random linear functional of both, w.r.t. every input."""
    tok, gates, params = leaves(tok, gates, params)
    y, state = rule(tok["q"], tok["k"], tok["v"], gates, params, None, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)).sum()
    for key in sorted(state):
        t = state[key]
        loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)).sum()
    inputs = {**{f"tok.{n}": t for n, t in tok.items()}, **{f"gate.{n}": t for n, t in gates.items()},
              **{f"param.{n}": t for n, t in params.items()}}
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    return y.detach(), {k: v.detach() for k, v in state.items()}, {
        n: (g if g is not None else torch.zeros_like(inputs[n])) for n, g in zip(inputs, grads, strict=True)}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of `a` against reference `b`."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def compare_runs(got, ref) -> dict[str, tuple[float, float]]:
    """(max abs error, relative RMS error) of each output, final state and input gradient."""
    yg, sg, gg = got
    yr, sr, gr = ref
    pairs = {"y": (yg, yr), **{f"state.{k}": (sg[k], sr[k]) for k in sr},
             **{f"grad.{k}": (gg[k], gr[k]) for k in gr}}
    return {k: ((a.double() - b.double()).abs().max().item(), rel_rms(a, b)) for k, (a, b) in pairs.items()}


def check_rule(rule, chunk: int | None = None, T: int = 19, D: int = 5, dtype=torch.float64):
    """Every backend against its oracle. Returns {comparison: {tensor: (max abs, rel RMS)}}."""
    chunk = chunk or rule.chunk
    tok, gates, params = make_inputs(rule, T=T, D=D, dtype=dtype)
    runs = {}
    loop = run_with_grads(rule, tok, gates, params, backend="loop")
    runs["exact loop vs chunk program at C=1"] = compare_runs(
        run_with_grads(rule, tok, gates, params, backend="chunk", chunk=1), loop)
    runs[f"anchored loop vs chunk program at C={chunk}"] = compare_runs(
        run_with_grads(rule, tok, gates, params, backend="chunk", chunk=chunk),
        run_with_grads(rule, tok, gates, params, backend="anchored_loop", chunk=chunk))
    if rule.algorithm == "wy":
        runs[f"exact loop vs WY at C={chunk}"] = compare_runs(
            run_with_grads(rule, tok, gates, params, backend="wy", chunk=chunk), loop)
    return runs
