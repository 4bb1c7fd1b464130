"""The fusion plan of the tile programs printed as torch (tile_torch.py): which nodes print inside others.

Single-use elementwise nodes are substituted into their consumer; `p ± a @ b` is one batched GEMM (`_addmm`)
and `p ± (q + a @ b)^T` accumulates into p's layout; sums of products print as addcmul (`_Named`);
sum(sum(x * y)) is one product and one reduction; the row sums of a product's sub-diagonal a row-wise
product. Also the helpers that recognise the decay coefficients' sub-diagonal (`_bidiagonal`) and shrink
hoisted expressions (`_fewer_passes`), and `_InPlace`: full-sequence and state-sized elementwise expressions
written into their own temporaries (`_imul`, `_iaddcmul`, ... check at run time that the temporary holds the
broadcast shape).
"""

from __future__ import annotations

import sympy as sp
import torch

from .chunk_tiles import Unsupported
from .sympy_print import TorchPrinter
from .tile_ir import TileGraph, X
from .torch_activations import TorchGeluGrad

VIEWS = ("trans", "lastrow", "expand", "reshape")  # cheap to redo after the loop: never buffered per chunk


class _Named(TorchPrinter):
    """The torch printer over named operands; a sum with products in it accumulates them with addcmul
    (one pass instead of a product and a sum)."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = names

    def _print_Symbol(self, expr):
        return self.names[int(expr.name[1:])]

    def _print_Add(self, expr):
        def split(term):  # (number, [factors that are not numbers])
            factors = sp.Mul.make_args(term)
            number = sp.Mul(*[f for f in factors if f.is_number])
            return number, [f for f in factors if not f.is_number]

        def product(term):
            _, factors = split(term)
            return len(factors) >= 2 and not any(isinstance(f, TorchGeluGrad) for f in factors)
        prods = [term for term in expr.args if product(term)]
        rest = [term for term in expr.args if not product(term)]
        if not prods or (rest and sp.Add(*rest).is_number):
            return super()._print_Add(expr)
        out = self._print(sp.Add(*rest)) if rest else self._print(prods[0])
        for term in prods if rest else prods[1:]:
            number, (f0, *more) = split(term)
            out = f"torch.addcmul({out}, {self._print(f0)}, {self._print(sp.Mul(*more))}, value={float(number)!r})"
        return out


def _addmm(p, a, b, beta: float, alpha: float, inplace: bool = False):
    """beta * p + alpha * a @ b, as one batched GEMM when the batch dims agree; `inplace`: p is a
    temporary nobody else reads, accumulated into (no copy of it)."""
    lead = p.shape[:-2]
    if a.shape[:-2] == lead and b.shape[:-2] == lead and p.shape[-2:] == (a.shape[-2], b.shape[-1]):
        a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
        if inplace and p.is_contiguous():
            p.view(-1, *p.shape[-2:]).baddbmm_(a3, b3, beta=beta, alpha=alpha)
            return p
        return torch.baddbmm(p.reshape(-1, *p.shape[-2:]), a3, b3, beta=beta, alpha=alpha).view(p.shape)
    return beta * p + alpha * torch.matmul(a, b)


class _Fusion:
    """Which nodes print inside another: an elementwise node with a single consumer, elementwise and in
    the same phase, is substituted into its expression; a negation read only by products is folded
    into them; `p ± a @ b` with a single-use product is one batched GEMM (`_addmm`)."""

    def __init__(self, g: TileGraph, live: list[int], level: dict[int, str], roots: set[int]):
        self.g = g
        users: dict[int, set[int]] = {}
        for i in live:
            for a in g.nodes[i].args:
                users.setdefault(a, set()).add(i)
        printed = {i for i in live if g.nodes[i].op not in ("input", "const") and level[i] != "given"}

        def single(j: int, op: str | None = None) -> int | None:
            u = users.get(j, set())
            if j in roots or j not in printed or len(u) != 1:
                return None
            (c,) = u
            return c if level[c] == level[j] and (op is None or g.nodes[c].op == op) else None

        self.negated = {j for j in printed if g.nodes[j].op == "ew" and g.nodes[j].attrs[0] == -X[0]
                        and j not in roots and users.get(j) and all(g.nodes[c].op == "dot" and level[c] == level[j]
                                                                     for c in users[j])}
        # p ± a @ b (or ± (a @ b)^T = b^T @ a^T): (p, dot, beta, alpha, transposed, p is a temporary)
        self.addmm: dict[int, tuple[int, int, float, float, bool, bool]] = {}
        self.folded: set[int] = set()  # dots (and their transposes) printed inside an addmm
        # p ± (q + a @ b)^T with that addmm read only here: p ± q^T ± b^T @ a^T, accumulated into p's layout
        # (printed as the addmm, the sum would take the transposed layout, and every later pass over it strides)
        # e: (p, the addmm, beta, alpha, the transpose, p is a temporary)
        self.addmm_t: dict[int, tuple[int, int, float, float, int, bool]] = {}
        for e in printed:
            t = g.nodes[e]
            if t.op != "ew" or len(t.args) != 2 or t.args[0] == t.args[1]:
                continue
            coef = t.attrs[0].as_coefficients_dict()
            if set(coef) != {X[0], X[1]} or any(abs(c) != 1 for c in coef.values()):
                continue
            for d, p in ((1, 0), (0, 1)):
                tr_node, other = t.args[d], t.args[p]
                inner = g.nodes[tr_node].args[0] if g.nodes[tr_node].op == "trans" else None
                if inner in self.addmm and single(tr_node) == e and single(inner) == tr_node and \
                        g.shape(other) == g.shape(tr_node):
                    temp = single(other) == e and g.nodes[other].op not in (*VIEWS, "input", "const")
                    self.addmm_t[e] = (other, inner, float(coef[X[p]]), float(coef[X[d]]), tr_node, temp)
                    break
            if e in self.addmm_t:
                continue
            for d, p in ((1, 0), (0, 1)):
                dot, other, tr = t.args[d], t.args[p], False
                if g.nodes[dot].op == "trans" and single(dot) == e and g.nodes[g.nodes[dot].args[0]].op == "dot":
                    dot, tr = g.nodes[dot].args[0], True
                    if single(dot) != t.args[d]:
                        continue
                elif single(dot) != e:
                    continue
                if g.nodes[dot].op == "dot" and g.shape(g.nodes[dot].args[0])[1] > 1 and \
                        g.shape(other) == g.shape(t.args[d]):
                    temp = single(other) == e and g.nodes[other].op not in (*VIEWS, "input", "const") and \
                        level[other] == level[e]
                    self.addmm[e] = (other, dot, float(coef[X[p]]), float(coef[X[d]]), tr, temp)
                    self.folded |= {dot, t.args[d]}
                    break
        # sum(sum(x * y)) over both axes: one product and one reduction
        self.inner: dict[int, tuple[int, int]] = {}
        for s2 in printed:
            t = g.nodes[s2]
            if t.op != "sum" or g.nodes[t.args[0]].op != "sum":
                continue
            s1 = t.args[0]
            e = g.nodes[s1].args[0]
            if g.nodes[e].op != "ew" or g.nodes[e].attrs[0] != X[0] * X[1] or single(s1) != s2 or single(e) != s1:
                continue
            x, y = g.nodes[e].args
            if g.shape(x) == g.shape(y) == g.shape(e) and x != y:
                self.inner[s2] = (x, y)
        for _, inner, _, _, tr_node, _ in self.addmm_t.values():  # the addmm and its transpose print inside e
            self.folded |= {inner, tr_node}
            q = self.addmm[inner][0]
            if g.nodes[q].op == "dot" and single(q) == inner and g.shape(g.nodes[q].args[0])[1] > 1:
                self.folded.add(q)  # q^T accumulates as one more GEMM
        # the sub-diagonal of a product, summed along rows: sum(where(shift, ±(x @ y), 0), -1)[i] = ±x[i] . y[:, i-1]
        # (trinv's adjoint -D^T g D^T needs only that diagonal: a row-wise product instead of a C×C×C GEMM)
        self.subdiag: dict[int, tuple[int, int, int]] = {}  # the sum: (x, y, sign)
        shift, strict = g.inputs.get("shift"), g.inputs.get("strict")
        for s in printed:
            t = g.nodes[s]
            if t.op != "sum" or t.attrs != (1,) or shift is None:
                continue
            chain, sign, n = [], 1, t.args[0]
            while g.nodes[n].op == "where" and g.nodes[n].args[0] in (shift, strict) and \
                    g.nodes[g.nodes[n].args[2]].op == "const" and g.nodes[g.nodes[n].args[2]].attrs[0] == 0.0:
                chain.append((n, g.nodes[n].args[0]))
                n = g.nodes[n].args[1]
            if not chain or chain[0][1] != shift:
                continue
            if g.nodes[n].op == "ew" and g.nodes[n].attrs[0] == -X[0]:
                chain.append((n, None))
                sign, n = -1, g.nodes[n].args[0]
            nodes = [c for c, _ in chain] + [n]
            if g.nodes[n].op == "dot" and g.shape(g.nodes[n].args[0])[1] > 1 and \
                    all(single(c) == u for c, u in zip(nodes, [s] + nodes[:-1], strict=True)):
                self.subdiag[s] = (*g.nodes[n].args, sign)
                self.folded |= set(nodes)
        fused = set(self.addmm) | {other for other, *_ in self.addmm.values()} | set(self.addmm_t)
        fused |= {other for other, *_ in self.addmm_t.values()}
        self.inline = {j for j in printed if g.nodes[j].op == "ew" and j not in fused
                       and single(j, "ew") not in (None, *self.addmm)}
        self.skip = self.inline | self.negated | self.folded
        self.skip |= {j for s2 in self.inner for j in (g.nodes[s2].args[0], g.nodes[g.nodes[s2].args[0]].args[0])}

    def expr(self, i: int) -> tuple[sp.Expr, list[int]]:
        """Node i's expression with single-use elementwise operands substituted; its leaf operands."""
        leaves: list[int] = []
        marks = [sp.Symbol(f"leaf{k}", real=True) for k in range(64)]

        def build(n: int) -> sp.Expr:
            t = self.g.nodes[n]
            subs = {}
            for k, a in enumerate(t.args):
                if a in self.inline:
                    subs[X[k]] = build(a)
                else:
                    if a not in leaves:
                        leaves.append(a)
                    subs[X[k]] = marks[leaves.index(a)]
            return t.attrs[0].xreplace(subs)
        e = build(i)
        if len(leaves) > len(X):
            raise Unsupported("an elementwise expression over too many operands")
        e = e.xreplace({marks[k]: X[k] for k in range(len(leaves))})
        if isinstance(e, sp.Add):  # sympy distributes a number over a substituted sum: 2(a + b) -> 2a + 2b
            c, rest = e.as_content_primitive()
            if c != 1:
                e = sp.Mul(c, rest, evaluate=False)
        return e, leaves

    def operand(self, j: int, ref) -> tuple[str, int]:
        """A product's operand and its sign (a folded negation reads the negated value's operand)."""
        if j in self.negated:
            return ref(self.g.nodes[j].args[0]), -1
        return ref(j), 1


def _bidiagonal(g: TileGraph, a: int) -> int | None:
    """The [C, 1] column n when tile `a` is where(shift, n, 0): n on the sub-diagonal (the `shift` mask is
    i == j + 1 in every driver), zero elsewhere."""
    t = g.nodes[a]
    if t.op != "where" or t.args[0] != g.inputs.get("shift") or g.shape(t.args[1]) != (t.shape[0], 1):
        return None
    zero = g.nodes[t.args[2]]
    return t.args[1] if zero.op == "const" and zero.attrs[0] == 0.0 else None


def _fewer_passes(e: sp.Expr) -> sp.Expr:
    """A hoisted expression (every chunk at once: each op is a pass over full-sequence tensors) with common
    factors pulled out and constants folded, when that has fewer ops: gelu''(x) as printed by sympy,
    2√2·e^(-x²/2)/√π - √(2/π)·x²·e^(-x²/2), becomes 0.80·(2 - x²)·e^(-x²/2)."""
    f = sp.factor_terms(e).evalf()
    return f if sp.count_ops(f) < sp.count_ops(e) else e


# ---- full-sequence elementwise expressions with fewer passes and temporaries ------------------------

def _imul(a, b):
    """a * b into a (a fresh temporary) when a already has the broadcast shape, else a new tensor."""
    return a.mul_(b) if _holds(a, b) else a * b


def _idiv(a, b):
    return a.div_(b) if _holds(a, b) else a / b


def _iadd(a, b, alpha: float):
    return a.add_(b, alpha=alpha) if _holds(a, b) else torch.add(a, b, alpha=alpha)


def _iaddcmul(a, b, c, value: float):
    return a.addcmul_(b, c, value=value) if _holds(a, b, c) else torch.addcmul(a, b, c, value=value)


def _holds(a, *others) -> bool:
    """Whether a's shape is the broadcast of a and `others` (plain Python: torch.broadcast_shapes costs ~10 µs)."""
    shape = a.shape
    for o in others:
        if isinstance(o, torch.Tensor) and (o.dim() > len(shape) or any(
                y not in (x, 1) for x, y in zip(reversed(shape), reversed(o.shape), strict=False))):
            return False
    return True


INPLACE_HELPERS = {"_imul": _imul, "_idiv": _idiv, "_iadd": _iadd, "_iaddcmul": _iaddcmul}
_UNARY = {sp.exp: "exp", sp.log: "log", sp.tanh: "tanh", sp.erf: "erf", sp.Abs: "abs", sp.sign: "sign"}


class _InPlace:
    """Prints an elementwise expression over large tensors (a hoisted full-sequence pass) so that every
    intermediate is a fresh temporary the next op writes into (`x.exp_()`, `_imul(t, y)`), not a new tensor
    per op: the same passes over memory, but no fresh (cold) buffer for each. A product or sum whose operands
    are all named tensors starts with one out-of-place op. Functions without an in-place form (gelu, where,
    ...) print as `_Named` does; their result is fresh too. Each returned text is (code, fresh)."""

    def __init__(self, names: list[str]):
        self.named = _Named(names)

    def doprint(self, e: sp.Expr) -> str:
        return self.expr(e)[0]

    def expr(self, e: sp.Expr) -> tuple[str, bool]:
        if e.is_Symbol:
            return self.named.doprint(e), False
        if e.is_number:
            return self.named.doprint(e), False
        if isinstance(e, sp.Add):
            return self.add(e)
        if isinstance(e, sp.Mul) and not any(isinstance(f, TorchGeluGrad) for f in e.args):
            return self.mul(e)
        if isinstance(e, sp.Pow) and e.exp == 2:
            base, fresh = self.expr(e.base)
            return (f"{base}.square_()" if fresh else f"torch.square({base})"), True
        if isinstance(e, sp.Pow) and e.exp == -1:
            base, fresh = self.expr(e.base)
            return (f"{base}.reciprocal_()" if fresh else f"torch.reciprocal({base})"), True
        if e.func in _UNARY:
            arg, fresh = self.expr(e.args[0])
            return (f"{arg}.{_UNARY[e.func]}_()" if fresh else f"torch.{_UNARY[e.func]}({arg})"), True
        return self.named.doprint(e), True

    @staticmethod
    def _split(term: sp.Expr) -> tuple[float, list[sp.Expr]]:
        factors = sp.Mul.make_args(term)
        return float(sp.Mul(*[f for f in factors if f.is_number])), [f for f in factors if not f.is_number]

    def mul(self, e: sp.Expr) -> tuple[str, bool]:
        c, factors = self._split(e)
        num = [f for f in factors if not (isinstance(f, sp.Pow) and f.exp == -1)]
        den = [f.base for f in factors if isinstance(f, sp.Pow) and f.exp == -1]
        if not num:
            num, den = [sp.Pow(sp.Mul(*den), -1)], []
        printed = [self.expr(f) for f in num]
        printed.sort(key=lambda p: not p[1])  # a fresh factor first: the product accumulates into it
        acc, fresh = printed[0]
        rest = printed[1:]
        if not fresh:  # the first op makes the temporary the rest accumulate into
            if rest:
                acc, rest = f"torch.mul({acc}, {rest[0][0]})", rest[1:]
            elif den:
                acc, den = f"torch.div({acc}, {self.expr(den[0])[0]})", den[1:]
            elif c != 1:
                return (f"torch.neg({acc})" if c == -1 else f"torch.mul({acc}, {c!r})"), True
            else:
                return acc, False
        for text, _ in rest:
            acc = f"_imul({acc}, {text})"
        for d in den:
            acc = f"_idiv({acc}, {self.expr(d)[0]})"
        if c != 1:
            acc = f"{acc}.mul_({c!r})"
        return acc, True

    def add(self, e: sp.Expr) -> tuple[str, bool]:
        const = float(sum(t for t in e.args if t.is_number))
        terms = [self._split(t) for t in e.args if not t.is_number]
        rests = [self.expr(sp.Mul(*f)) for _, f in terms]  # each term without its number
        # the accumulator: a term that prints fresh with no number to apply, else a named term with coefficient
        # 1 added to a second term out of place, else any term (one more pass for its number)
        at = next((k for k, (c, _) in enumerate(terms) if rests[k][1] and c == 1), None)
        pair = next((k for k, (c, _) in enumerate(terms) if not rests[k][1] and c == 1), None)
        done = set()
        if at is None and pair is not None and len(terms) >= 2:
            other = next(k for k in range(len(terms)) if k != pair)
            c2, f2 = terms[other]
            a = rests[pair][0]
            acc = f"torch.add({a}, {rests[other][0]}, alpha={c2!r})" if len(f2) == 1 else \
                f"torch.addcmul({a}, {self.expr(f2[0])[0]}, {self.expr(sp.Mul(*f2[1:]))[0]}, value={c2!r})"
            done = {pair, other}
        elif at is None and len(terms) == 1 and not rests[0][1] and abs(terms[0][0]) == 1:
            x = rests[0][0]
            return (f"torch.add({x}, {const!r})" if terms[0][0] == 1 else f"torch.rsub({x}, {const!r})"), True
        else:
            at = 0 if at is None else at
            acc, _ = self.expr(sp.Mul(terms[at][0], *terms[at][1]))
            done = {at}
        for k, (c, f) in enumerate(terms):
            if k in done:
                continue
            if len(f) == 1:
                acc = f"_iadd({acc}, {rests[k][0]}, {c!r})"
            else:
                acc = f"_iaddcmul({acc}, {self.expr(f[0])[0]}, {self.expr(sp.Mul(*f[1:]))[0]}, {c!r})"
        if const:
            acc = f"{acc}.add_({const!r})"
        return acc, True
