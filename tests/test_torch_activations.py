"""The torch printer's fused activations: gelu and g * gelu'(x) become torch's single kernels, with the
same values and gradients as the erf formulas they replace; anything else stays a formula."""

import sympy as sp
import torch

from codegen.torch_activations import PRELUDE, TorchGelu, TorchGeluGrad, fold_activations
from codegen.torch_emit import _Printer
from memdsl.ops import OPS

X0, X1 = sp.Symbol("x0", real=True), sp.Symbol("x1", real=True)
GELU = OPS["gelu"].sympy(X0)


def _run(expr, *args):
    names = {f"x{i}": f"t{i}" for i in range(len(args))}
    env = {"torch": torch}
    exec(PRELUDE, env)
    env.update({f"t{i}": a for i, a in enumerate(args)})
    return eval(_Printer(names).doprint(expr), env)


def test_gelu_and_its_derivative_times_a_cotangent_fold():
    grad = X1 * sp.diff(GELU, X0)
    assert fold_activations(GELU) == TorchGelu(X0)
    folded = fold_activations(grad)
    assert folded.has(TorchGeluGrad) and not folded.has(sp.erf)
    assert "_gelu_grad(t1, t0)" in _Printer({"x0": "t0", "x1": "t1"}).doprint(folded)


def test_folded_values_and_gradients_equal_the_formula():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for expr in (GELU, X1 * sp.diff(GELU, X0), 3 * X1 * sp.diff(GELU, X0) + GELU, sp.diff(GELU, X0)):
        plain, fused = _run(expr, x, g), _run(fold_activations(expr), x, g)
        torch.testing.assert_close(fused, plain)
        w = torch.randn_like(plain)
        assert torch.autograd.gradcheck(lambda a, b, e=expr: _run(fold_activations(e), a, b), (x, g))
        d_plain = torch.autograd.grad((plain * w).sum(), (x, g), allow_unused=True)
        d_fused = torch.autograd.grad((fused * w).sum(), (x, g), allow_unused=True)
        for a, b in zip(d_fused, d_plain, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)


def test_broadcast_cotangent_and_other_erf_stay_correct():
    x = torch.randn(4, 6, dtype=torch.float64)
    g = torch.randn(4, 1, dtype=torch.float64)
    expr = X1 * sp.diff(GELU, X0)
    torch.testing.assert_close(_run(fold_activations(expr), x, g), _run(expr, x, g))
    other = sp.erf(X0) * X1  # not a gelu: left as the formula
    assert fold_activations(other) == other
