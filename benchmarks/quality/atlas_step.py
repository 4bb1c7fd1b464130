"""Time (and optionally profile) one training step of the eval model around ATLAS, next to OmegaNet.

    python benchmarks/quality/atlas_step.py --width 32            # ATLAS and OmegaNet, one step each
    python benchmarks/quality/atlas_step.py --width 64 --profile  # + torch.profiler table of the ATLAS step
    python benchmarks/quality/atlas_step.py --width 32 --ns-variants
        # ATLAS with the shipped Newton–Schulz, a baddbmm-fused one, and NS replaced by the identity
        # (the last is not the rule: it only bounds NS's share of the step)

The step is the MQAR step of benchmarks/QUALITY.md (batch 32 × 64 tokens, vocabulary 32, 2 layers,
4 heads), forward + backward, one torch thread; the first step is a warm-up and is not counted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from memdsl.eval.model import EvalModel, ModelConfig, ModelSpec
from memdsl.eval.tasks import MQAR
from memdsl.eval.train import loss_fn


def build(rule: str, width: int) -> EvalModel:
    torch.manual_seed(0)
    return EvalModel(ModelSpec(rule), ModelConfig(32, width, 4, 2))


def step(model: EvalModel, x: torch.Tensor, y: torch.Tensor) -> float:
    t = time.perf_counter()
    loss_fn(model(x), y).backward()
    return time.perf_counter() - t


def fused_newton_schulz(coeffs):
    a, b, c = coeffs

    def ns(x, steps):
        tall = x.shape[-2] > x.shape[-1]
        if tall:
            x = x.mT
        shape = x.shape
        x = (x / (torch.linalg.matrix_norm(x, keepdim=True) + 1e-7)).reshape(-1, *shape[-2:])
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        x = x.reshape(shape)
        return x.mT if tall else x
    return ns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="timed steps (the minimum is printed)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--ns-variants", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = MQAR(32, 4, 64).sample(32, np.random.default_rng(0))
    for rule in ("rules/omeganet.mem", "rules/atlas.mem"):
        model = build(rule, args.width)
        step(model, x, y)
        print(f"{rule} width {args.width}: {min(step(model, x, y) for _ in range(args.steps)):.3f} s a step",
              flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step(model, x, y)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=8))
    if args.ns_variants:
        # the generated module's globals: every layer of one rule shares them
        spaces = {id(g): g for g in (type(m).forward.__globals__ for layer in model.memory_layers()
                                     for m in layer.memories.values())}
        shipped = next(iter(spaces.values()))["newton_schulz"]
        fused = fused_newton_schulz(next(iter(spaces.values()))["_NS_COEFFS"])
        probe = torch.randn(3, 5, 16, 73)
        assert torch.allclose(fused(probe, 5), shipped(probe, 5), atol=1e-5)
        for name, fn in (("shipped", shipped), ("fused (baddbmm)", fused), ("identity (not the rule)", lambda s, n: s)):
            for g in spaces.values():
                g["newton_schulz"] = fn
            step(model, x, y)
            print(f"atlas width {args.width}, Newton–Schulz {name}: "
                  f"{min(step(model, x, y) for _ in range(args.steps)):.3f} s a step", flush=True)


if __name__ == "__main__":
    main()
