"""Shared test utilities: random inputs for a Program, relative errors."""

from __future__ import annotations

import sympy as sp
import torch

from codegen.torch_ir import concrete_sizes


def sizes_for(program, d: int = 3):
    return concrete_sizes(program.dims, {n: d + i for i, n in enumerate(n for n, v in program.dims.items()
                                                                          if v is None)})


def random_env(program, sizes, batch=(2,), seed=0, dtype=torch.float64):
    """Random inputs for every tensor of a program; gates in (0.1, 0.9) as activations would give."""
    gen = torch.Generator().manual_seed(seed)
    env = {}
    for name, t in program.tensors.items():
        shape = [int(sp.sympify(s).subs(sizes)) for s in t.shape]
        if t.role == "gate":
            x = 0.1 + 0.8 * torch.rand(*batch, *shape, generator=gen, dtype=dtype)
        else:
            x = torch.randn(*batch, *shape, generator=gen, dtype=dtype)
        env[name] = x
    read = program.graph.node(program.graph.outputs["read"])
    env["ct_read"] = torch.randn(*batch, *[int(sp.sympify(s).subs(sizes)) for s in read.shape],
                                 generator=gen, dtype=dtype)
    return env


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of `a` against reference `b`."""
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def autograd_node_names(t: torch.Tensor) -> set[str]:
    """The class names of every node in t's autograd graph (which autograd.Function ran, e.g.
    TritonChunkBackward for a kernel path)."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is not None and f not in seen:
            seen.add(f)
            todo += [g for g, _ in f.next_functions]
    return {type(f).__name__ for f in seen}
