"""Compile a shipped rule and print each stage: source, AST, IR, gradients, chosen algorithm.

    python examples/01_inspect.py [rules/titans.mem]

It checks itself at the end: the symbolic gradient agrees with torch.autograd on random inputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import memdsl
from codegen.torch_ir import concrete_sizes, evaluate
from memdsl.format import format_rule
from memdsl.parse import parse
from memdsl.printer import forward_groups, gradient_groups, print_groups, summary

ROOT = Path(__file__).resolve().parent.parent


def banner(title: str) -> None:
    print(f"\n{'=' * 20} {title} {'=' * (60 - len(title))}")


def main(path: str) -> None:
    source = Path(path).read_text()
    banner("1. canonical source (parse, then print)")
    print(format_rule(parse(source, path)))

    program = memdsl.load(path)
    banner("2. the rule, as the compiler sees it")
    print(summary(program))
    banner("3. IR: loss, read, model, hyper-parameters")
    print(print_groups(program, forward_groups(program)))
    banner("4. symbolic gradients (reverse mode + sympy)")
    print(print_groups(program, gradient_groups(program)))

    banner("5. self-check: symbolic gradient == torch.autograd")
    torch.set_default_dtype(torch.float64)
    sizes = concrete_sizes(program.dims, {"d": 4})
    env = {}
    for name, t in program.tensors.items():
        shape = [int(s.subs(sizes)) for s in t.shape]
        env[name] = (0.5 * torch.rand(shape) + 0.25 if t.role == "gate" else torch.randn(shape)).requires_grad_()
    grads = [k for k in program.graph.outputs if k.startswith("grad.")]
    out = evaluate(program.graph, ["loss", *grads], env, sizes)
    auto = torch.autograd.grad(out["loss"], [env[k[5:]] for k in grads])
    for name, a in zip(grads, auto, strict=True):
        err = (out[name] - a).abs().max().item()
        print(f"  {name:<14} max |symbolic - autograd| = {err:.1e}")
        assert err < 1e-10, name
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "rules" / "titans.mem"))
