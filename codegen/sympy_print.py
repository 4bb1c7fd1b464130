"""Sympy → code for elementwise expressions: a mapping of functions plus a few overrides.

Two printers share one structure (sympy's `printing/pycode.py` style): `TorchPrinter` emits
`torch.*` calls on tensors, `TritonPrinter` emits `tl.*` calls inside a kernel. `Piecewise`
becomes nested `where`. Numbers are printed from sympy values, never from rule-file text, and the
only names are the symbols x0, x1, ... that the compiler itself created.
"""

from __future__ import annotations

import functools
import math
import re

import sympy as sp
from sympy.printing.str import StrPrinter

from .torch_activations import TorchGeluGrad

_SAFE_NAME = re.compile(r"^x[0-9]+$")


class _ArrayPrinter(StrPrinter):
    """Shared by the target printers; each sets its namespace, function names and two spellings."""

    ns = "torch"
    functions: dict[str, str] = {}
    POW = "torch.pow({base}, {exponent})"
    WHERE = "torch.where({cond}, {a}, {b})"

    def _print(self, expr, **kwargs):
        if isinstance(expr, sp.Expr) and expr.is_number and not expr.is_Integer:
            value = complex(expr)
            if value.imag != 0:
                raise ValueError(f"complex constant {expr}")
            return repr(value.real)
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, expr):
        if not _SAFE_NAME.match(expr.name):
            raise ValueError(f"unexpected symbol {expr.name!r} in an elementwise expression")
        return expr.name

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Pi(self, expr):
        return repr(math.pi)

    def _print_Exp1(self, expr):
        return repr(math.e)

    def _print_Function(self, expr):
        name = type(expr).__name__
        if name not in self.functions:
            raise ValueError(f"no {self.ns} spelling for {name}")
        return f"{self.functions[name]}({', '.join(self._print(a) for a in expr.args)})"

    _print_exp = _print_log = _print_erf = _print_tanh = _print_sign = _print_Abs = _print_Function

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        b = self.parenthesize(base, 100)
        if e == sp.Rational(1, 2):
            return f"{self.functions['sqrt']}({self._print(base)})"
        if e == -sp.Rational(1, 2):
            return f"(1.0 / {self.functions['sqrt']}({self._print(base)}))"
        if e.is_Integer and 1 <= abs(int(e)) <= 4:
            prod = "*".join([b] * abs(int(e)))
            return f"({prod})" if e > 0 else f"(1.0 / ({prod}))"
        return self.POW.format(base=b, exponent=self._print(e))

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_Piecewise(self, expr):
        *pieces, (last, cond) = expr.args
        out = self._print(last) if cond == sp.true else self._where(self._print(cond), self._print(last), "nan")
        for value, c in reversed(pieces):
            out = self._where(self._print(c), self._print(value), out)
        return out

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Max(self, expr):
        return functools.reduce(lambda a, b: f"{self.functions['max']}({a}, {b})",
                                (self._print(a) for a in expr.args))

    def _print_Min(self, expr):
        return functools.reduce(lambda a, b: f"{self.functions['min']}({a}, {b})",
                                (self._print(a) for a in expr.args))

    def _where(self, cond: str, a: str, b: str) -> str:
        return self.WHERE.format(cond=cond, a=a, b=b)


class TorchPrinter(_ArrayPrinter):
    ns = "torch"
    functions = {"exp": "torch.exp", "log": "torch.log", "erf": "torch.erf", "tanh": "torch.tanh",
                 "sign": "torch.sign", "Abs": "torch.abs", "sqrt": "torch.sqrt", "max": "torch.maximum",
                 "min": "torch.minimum"}

    def _print_Piecewise(self, expr):
        return super()._print_Piecewise(expr).replace(", nan)", ", float('nan'))")

    # fused activations (torch_activations.fold_activations puts them in)
    def _print_TorchGelu(self, expr):
        return f"torch.nn.functional.gelu({self._print(expr.args[0])})"

    def _print_TorchGeluGrad(self, expr):
        return f"_gelu_grad(1.0, {self._print(expr.args[0])})"

    def _print_Mul(self, expr):
        grads = [f for f in expr.args if isinstance(f, TorchGeluGrad)]
        if len(grads) != 1:
            return super()._print_Mul(expr)
        rest = expr / grads[0]
        return f"_gelu_grad({self._print(rest)}, {self._print(grads[0].args[0])})"

    # torch.maximum/minimum take two tensors; a bound that is a number is a clamp
    def _print_Max(self, expr):
        return self._clamp(expr, "clamp_min") or super()._print_Max(expr)

    def _print_Min(self, expr):
        return self._clamp(expr, "clamp_max") or super()._print_Min(expr)

    def _clamp(self, expr, method):
        numbers = [a for a in expr.args if a.is_number]
        rest = [a for a in expr.args if not a.is_number]
        if len(numbers) != 1 or len(rest) != 1:
            return None
        return f"torch.{method}({self._print(rest[0])}, {self._print(numbers[0])})"


class TritonPrinter(_ArrayPrinter):
    ns = "tl"
    functions = {"exp": "tl.exp", "log": "tl.log", "erf": "tl.math.erf", "tanh": "_tanh",
                 "sign": "_sign", "Abs": "tl.abs", "sqrt": "tl.sqrt", "max": "tl.maximum", "min": "tl.minimum"}

    POW = "tl.exp({exponent} * tl.log({base}))"
    WHERE = "tl.where({cond}, {a}, {b})"


def torch_code(expr: sp.Expr) -> str:
    return TorchPrinter().doprint(expr)


def triton_code(expr: sp.Expr) -> str:
    return TritonPrinter().doprint(expr)


@functools.lru_cache(maxsize=4096)
def torch_lambda(expr: sp.Expr, n_args: int):
    """Compile an elementwise expression over x0..x{n-1} into a Python function on tensors."""
    import torch
    args = ", ".join(f"x{i}" for i in range(n_args))
    code = f"lambda {args}: {torch_code(expr)}"
    return eval(compile(code, "<memdsl ewise>", "eval"), {"torch": torch})
