"""Fused activations for the torch lowering: gelu and its derivative, spotted in elementwise expressions.

The front end expands `gelu(x)` into its erf formula, and autodiff differentiates that formula, so a
memory's gradient function holds `x * (erf(x/√2) + 1) / 2` and `g * (√2 x e^{-x²/2}/√π + erf(x/√2) + 1) / 2`
as trees of a dozen elementwise ops — each one a pass over a [B, H, n, hidden] tensor in eager torch
(and a node of the autograd graph). torch has both as single kernels: `gelu` and `gelu_backward(g, x)`
(= g · gelu'(x), with its own double backward). `fold_activations` rewrites an expression to use them;
only the torch printer sees the result — the Triton printer, the tile IR and every symbolic pass keep
the plain formula. Values agree to rounding (torch's gelu is the same erf formula).
"""

from __future__ import annotations

import functools

import sympy as sp


class TorchGelu(sp.Function):
    """gelu(x), printed as torch.nn.functional.gelu."""


class TorchGeluGrad(sp.Function):
    """gelu'(x), printed inside a product g · gelu'(x) as torch's gelu_backward(g, x)."""


@functools.cache
def _forms():
    x = sp.Dummy("x", real=True)
    gelu = x * (1 + sp.erf(x / sp.sqrt(2))) / 2  # memdsl.ops._gelu
    grad = sp.diff(gelu, x)
    return x, gelu, grad


def fold_activations(expr: sp.Expr) -> sp.Expr:
    """expr with every gelu(x) and gelu'(x) (in the forms sympy builds for them) as a TorchGelu /
    TorchGeluGrad call; anything else containing erf is left alone."""
    if not expr.has(sp.erf):
        return expr
    x, gelu, grad = _forms()
    for e in sorted(expr.atoms(sp.erf), key=sp.default_sort_key):
        arg = sp.sqrt(2) * e.args[0]  # erf(arg / sqrt 2) belongs to gelu(arg)
        g = grad.subs(x, arg)
        expr = expr.subs(2 * g, 2 * TorchGeluGrad(arg)).subs(g, TorchGeluGrad(arg))
        expr = expr.subs(gelu.subs(x, arg), TorchGelu(arg))
    return expr


PRELUDE = '''
def _gelu_grad(g, x):
    """g * gelu'(x) in one pass (torch's gelu_backward wants equal shapes)."""
    g = torch.as_tensor(g, dtype=x.dtype, device=x.device)
    return torch.ops.aten.gelu_backward(*torch.broadcast_tensors(g, x))
'''
