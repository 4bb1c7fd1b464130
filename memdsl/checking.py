"""Checking a compiled rule: random inputs, every backend, errors per output and gradient.

Used by `memdsl check`, by the backend tests and by the examples.
"""

from __future__ import annotations

import math

import torch


def make_inputs(rule, B=2, T=13, H=2, D=3, dtype=torch.float64, seed=0, low=0.05, high=0.35,
                sizes: dict[str, int] | None = None):
    """q, k, v (unit-norm q, k as MemoryLayer makes them), gates in a stable range, outers, initial memory.
    `sizes` gives free sizes other than d (a rule's `dim n`)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shapes = rule.impl.fns["shapes"](rule.impl.sizes(sizes={**(sizes or {}), "d": D}))
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
    loss = (y * torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)).sum()
    for key in sorted(state):
        t = state[key]
        loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)).sum()
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


def free_sizes(rule, D: int) -> dict[str, int]:
    """A value for every free size of a rule: d = D, each further `dim n` a different small number."""
    return {n: D + i for i, n in enumerate([n for n in rule.spec["free_sizes"] if n != "d"], start=1)} | {"d": D}


def quick_check(rule, T: int = 5, D: int = 2, max_elements: int = 1 << 14,
                rtol: float = 1e-6) -> str:
    """The cheapest oracle: the exact loop against the chunk program at C=1 (same function), forward,
    final state and every input gradient, in float64 at tiny sizes. What the fuzzers require of every
    rule that compiles. Returns "agrees", "ill-conditioned, agrees" (agrees within what roundoff can
    change, which is wider than rtol somewhere), "too large" (a tensor over `max_elements`: not run),
    "not finite" (the exact run overflows) or "diverges" (it grows so large that its roundoff alone exceeds
    rtol; in both only the absence of exceptions is checked); raises
    AssertionError naming the first tensor on which the two disagree."""
    sizes = free_sizes(rule, D)
    shapes = rule.impl.fns["shapes"](rule.impl.sizes(sizes=sizes))
    if any(math.prod(int(s) for s in shape) * T > max_elements for shape in shapes.values()):
        return "too large"
    tok, gates, params = make_inputs(rule, B=1, T=T, H=1, D=D, sizes=sizes)
    kw = {"sizes": sizes}
    exact = run_with_grads(rule, tok, gates, params, backend="loop", **kw)
    chunk = run_with_grads(rule, tok, gates, params, backend="chunk", chunk=1, **kw)
    ref, got = _flat(exact), _flat(chunk)
    if not all(torch.isfinite(t).all() for t in ref.values()):
        return "not finite"
    # no float64 program is exact below roundoff of the largest value the run holds: with lr = 1e30 the
    # memory reaches 1e152 and a gradient of 1e122 is a difference far under that floor (ulps of 1e152)
    largest = max((t.abs().max().item() for t in ref.values() if t.numel()), default=0.0)
    roundoff = 1024 * torch.finfo(torch.float64).eps * largest
    if roundoff > rtol:
        # from O(1) inputs the run grew past ~4e6: a recurrence that amplifies by G amplifies each program's
        # rounding by G too (`retain l2(1e30 - theta)` reaches 1e132 in five tokens), so two evaluation
        # orders need not agree to rtol; like "not finite", only the absence of exceptions is checked
        return "diverges"
    # nor below what roundoff does to an ill-conditioned input: a constant loss has a gradient of pure
    # roundoff, and dividing it by a norm that a strong decay shrank to 1e-8 makes that O(1e-6). The exact
    # loop itself, on inputs nudged by a few ulps (two draws), shows how far roundoff moves each tensor;
    # four times the larger move is the floor (for a well-conditioned run, ~1e-15 of its size: no change)
    nudged = [_flat(run_with_grads(rule, *_nudged((tok, gates, params), 1e-15, seed), backend="loop", **kw))
              for seed in (2, 3)]
    if not all(torch.isfinite(t).all() for run in nudged for t in run.values()):
        return "not finite"
    conditioned = True
    for name, r in ref.items():
        # inputs are O(1), so a real disagreement is O(1) too; an absolute floor of rtol keeps roundoff
        # noise from counting where the true value is ~0 (a constant loss, amplified by Newton–Schulz)
        scale = r.abs().max().item() if r.numel() else 0.0
        noise = 4 * max((run[name] - r).abs().max().item() for run in nudged) if r.numel() else 0.0
        conditioned &= max(noise, roundoff) <= rtol * max(scale, 1.0)
        torch.testing.assert_close(got[name], r, rtol=rtol, atol=max(rtol * max(scale, 1.0), roundoff, noise),
                                   msg=lambda m, name=name: f"exact loop vs chunk at C=1 disagree on {name}: {m}")
    return "agrees" if conditioned else "ill-conditioned, agrees"


def _flat(run) -> dict[str, torch.Tensor]:
    y, state, grads = run
    return {"y": y, **{f"state.{k}": t for k, t in state.items()}, **{f"grad.{k}": t for k, t in grads.items()}}


def _nudged(groups, rel: float, seed: int = 2):
    """Copies of (tok, gates, params) with every element scaled by 1 + rel * u, u uniform in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return tuple({n: t * (1 + rel * (2 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1)).to(t.dtype)
                  for n, t in group.items()} for group in groups)
