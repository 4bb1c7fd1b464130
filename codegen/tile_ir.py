"""Tile IR: the per-chunk program of a Triton kernel as a small SSA graph of 2-D tiles.

A kernel owns one (batch, head) and walks its chunks; inside a chunk every value is a 2-D tile:
token rows [C, n], scalars per token [C, 1], chunk constants [1, n] or [m, n], C×C coefficient
matrices, boolean masks. A dozen ops are enough for the anchored chunk program in dual form and the exact WY algorithm:

    input    a named tile loaded by the kernel (tokens, gates, state, masks)
    const    a number, shape [1, 1]
    ew       an elementwise sympy expression over its operands (numpy broadcasting of 1-dims)
    dot      [m, k] @ [k, n]
    trans    [m, n] -> [n, m]
    sum      reduce one axis, keeping it (shape 1)
    cumsum   running sum along one axis, forward or reversed
    where    select by a boolean mask: where(mask, a, b)
    expand   broadcast to a larger shape
    trinv    (I + L)^-1 for a strictly lower-triangular C×C tile L (the WY/UT transform)
    kron     row-wise Kronecker product [r, n] x [r, m] -> [r, n*m] (polynomial features, and the
             flattened per-position states of `state_tiles`), with its two adjoints kron_da, kron_db
    reshape  the same elements in another 2-D shape (row-major): a state [m, n] <-> a row [1, m*n]
    bmm      per-row matrix products of flattened matrices: row r of [R, m*k] times row r of [R, k*n]
             (either side stored transposed) -> [R, m*n]; Muon's Newton–Schulz on every position
    permute  a [d0, d1*d2] tile seen as [d0, d1, d2], its axes permuted, back to 2-D: position-major
             per-position states [C, m*n] <-> channel-major [m, C*n] (per-channel decays)
    gmax     the maximum over consecutive groups of g columns, [r, k*g] -> [r, k]: a softmax's shift.
             It has no adjoint (tile_grad skips it): softmax(x - shift) does not depend on the shift,
             so the kernels use it only there
    place_cols  a block of n columns moved to another column offset in a zero tile of width W:
             out[:, off + i] = x[:, src + i] for i < n, 0 elsewhere (a concat's block into the padded
             polynomial features; with src and off swapped, its own adjoint). Printed as a gather:
             no [n, W] placement matrix (2^21 elements at d = 32) and no C*n*W product

Tile widths are powers of two (≥ 16 where a product needs it): a logical size that is not — the
1 + d + d^2 of polynomial features — is padded, and a column mask keeps the padding at zero.
Masks the kernel builds from indices (column masks, bands, 0/1 placement matrices) are inputs
with a definition (`mask_defs`), printed once before the chunk loop.

The forward kernel prints these nodes; `tile_grad.backward` appends their reverse-mode
derivative to the same graph, and the backward kernel prints the whole thing. Nodes are
hash-consed, so a value computed twice is one node (common subexpressions come for free).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy as sp

Shape = tuple[int, int]


@dataclass(frozen=True)
class Tile:
    op: str
    args: tuple[int, ...]
    shape: Shape
    attrs: tuple = ()


def _broadcast(shapes: list[Shape]) -> Shape:
    out = []
    for axis in range(2):
        sizes = {s[axis] for s in shapes} - {1}
        if len(sizes) > 1:
            raise ValueError(f"tiles do not broadcast: {shapes}")
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


X = [sp.Symbol(f"x{i}", real=True) for i in range(16)]


def _number(value: float) -> sp.Expr:
    return sp.Integer(int(value)) if float(value).is_integer() else sp.Float(value)


class TileGraph:
    """An append-only SSA graph of tiles with named inputs and outputs."""

    def __init__(self):
        self.nodes: list[Tile] = []
        self._index: dict[Tile, int] = {}
        self.inputs: dict[str, int] = {}
        self.outputs: dict[str, int] = {}
        self.boolean: set[int] = set()
        self.mask_defs: dict[str, tuple] = {}

    def add(self, tile: Tile) -> int:
        if tile in self._index:
            return self._index[tile]
        self.nodes.append(tile)
        self._index[tile] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def shape(self, i: int) -> Shape:
        return self.nodes[i].shape

    # ---- constructors ---------------------------------------------------------------------------
    def input(self, name: str, shape: Shape, boolean: bool = False) -> int:
        i = self.add(Tile("input", (), tuple(shape), (name,)))
        self.inputs[name] = i
        if boolean:
            self.boolean.add(i)
        return i

    def mask(self, kind: str, *args: int) -> int:
        """A boolean tile built from indices: ("cols", n, P) is [1, P] with j < n; ("place", off, n, P_in,
        P_out) is [P_in, P_out] with j == i + off and i < n (puts a width-n block at column off);
        ("band", c, C) is [C, C] with j - c < l <= j (an Omega window over this chunk's rows);
        ("hband", c, C, Hh) is [C, Hh] with r > j + Hh - c (the window over the Hh rows before);
        ("ltri", C) is [1, C*C] with i >= j at column i*C + j (a flattened lower triangle)."""
        name = "_".join(["m" + kind, *map(str, args)])
        shape = {"cols": lambda: (1, args[1]), "place": lambda: (args[2], args[3]),
                 "band": lambda: (args[1], args[1]), "hband": lambda: (args[1], args[2]),
                 "ltri": lambda: (1, args[0] * args[0])}[kind]()
        self.mask_defs[name] = (kind, *args)
        return self.input(name, shape, boolean=True)

    def const(self, value: float) -> int:
        return self.add(Tile("const", (), (1, 1), (float(value),)))

    def ew(self, expr: sp.Expr, *args: int) -> int:
        """An elementwise expression over x0..x{n-1} bound to the tiles `args`."""
        expr = sp.sympify(expr)
        if expr.is_number:
            return self.const(float(expr))
        # constants are folded into the expression (1 * x is x, 0 + x is x)
        consts = {X[i]: _number(self.nodes[a].attrs[0]) for i, a in enumerate(args) if self.nodes[a].op == "const"}
        if consts:
            expr = expr.xreplace(consts)
            if expr.is_number:
                return self.const(float(expr))
        used = sorted(int(s.name[1:]) for s in expr.free_symbols)
        # drop operands the expression does not use, renumbering the rest
        keep = [i for i in range(len(args)) if i in used]
        if len(keep) < len(args):
            expr = expr.xreplace({X[i]: X[j] for j, i in enumerate(keep)})
            args = tuple(args[i] for i in keep)
        if expr == X[0]:
            return args[0]
        return self.add(Tile("ew", tuple(args), _broadcast([self.shape(a) for a in args]), (expr,)))

    def mul(self, a: int, b: int) -> int:
        return self.ew(X[0] * X[1], a, b)

    def add2(self, a: int, b: int) -> int:
        return self.ew(X[0] + X[1], a, b)

    def sub(self, a: int, b: int) -> int:
        return self.ew(X[0] - X[1], a, b)

    def dot(self, a: int, b: int) -> int:
        (m, k), (k2, n) = self.shape(a), self.shape(b)
        if k != k2:
            raise ValueError(f"dot of {self.shape(a)} and {self.shape(b)}")
        return self.add(Tile("dot", (a, b), (m, n)))

    def trans(self, a: int) -> int:
        n = self.nodes[a]
        if n.op == "trans":
            return n.args[0]
        m, k = n.shape
        return self.add(Tile("trans", (a,), (k, m)))

    def sum(self, a: int, axis: int) -> int:
        shape = list(self.shape(a))
        if shape[axis] == 1:
            return a
        shape[axis] = 1
        return self.add(Tile("sum", (a,), tuple(shape), (axis,)))

    def cumsum(self, a: int, axis: int, reverse: bool = False) -> int:
        return self.add(Tile("cumsum", (a,), self.shape(a), (axis, reverse)))

    def where(self, mask: int, a: int, b: int) -> int:
        if mask not in self.boolean:
            raise ValueError("where() needs a boolean mask input")
        return self.add(Tile("where", (mask, a, b), _broadcast([self.shape(mask), self.shape(a), self.shape(b)])))

    def expand(self, a: int, shape: Shape) -> int:
        if self.shape(a) == tuple(shape):
            return a
        if _broadcast([self.shape(a), tuple(shape)]) != tuple(shape):
            raise ValueError(f"cannot expand {self.shape(a)} to {shape}")
        return self.add(Tile("expand", (a,), tuple(shape)))

    def trinv(self, a: int, strict: int) -> int:
        """(I + L)^-1 where L = where(strict, a, 0) is strictly lower triangular (`strict`: the mask)."""
        m, n = self.shape(a)
        if m != n or strict not in self.boolean:
            raise ValueError("trinv needs a square tile and a boolean strictly-lower mask")
        return self.add(Tile("trinv", (a, strict), (m, n)))

    def kron(self, a: int, b: int) -> int:
        (ra, n), (rb, m) = self.shape(a), self.shape(b)
        return self.add(Tile("kron", (a, b), (max(ra, rb), n * m)))

    def kron_da(self, g: int, b: int, n: int) -> int:
        """sum_j g[:, i*m + j] b[:, j]: the adjoint of kron in its first operand (width n)."""
        return self.add(Tile("kron_da", (g, b), (self.shape(g)[0], n)))

    def kron_db(self, g: int, a: int, m: int) -> int:
        """sum_i g[:, i*m + j] a[:, i]: the adjoint of kron in its second operand (width m)."""
        return self.add(Tile("kron_db", (g, a), (self.shape(g)[0], m)))

    def reshape(self, a: int, shape: Shape) -> int:
        m, n = self.shape(a)
        if m * n != shape[0] * shape[1]:
            raise ValueError(f"cannot reshape {self.shape(a)} to {shape}")
        if self.shape(a) == tuple(shape):
            return a
        node = self.nodes[a]
        if node.op == "reshape" and self.shape(node.args[0]) == tuple(shape):
            return node.args[0]
        return self.add(Tile("reshape", (a,), tuple(shape)))

    def bmm(self, a: int, b: int, m: int, k: int, n: int, ta: bool = False, tb: bool = False) -> int:
        """Row r: op(a_r) @ op(b_r), a_r stored [m, k] ([k, m] if ta), b_r stored [k, n] ([n, k] if tb)."""
        if self.shape(a)[1] != m * k or self.shape(b)[1] != k * n:
            raise ValueError(f"bmm {m}x{k}x{n} of {self.shape(a)} and {self.shape(b)}")
        rows = _broadcast([(self.shape(a)[0], 1), (self.shape(b)[0], 1)])[0]
        return self.add(Tile("bmm", (a, b), (rows, m * n), (m, k, n, bool(ta), bool(tb))))

    def permute(self, a: int, dims: tuple[int, int, int], perm: tuple[int, int, int]) -> int:
        """[d0, d1*d2] as [d0, d1, d2], axes permuted by `perm`, flattened to [dp0, dp1*dp2]."""
        if self.shape(a) != (dims[0], dims[1] * dims[2]) or sorted(perm) != [0, 1, 2]:
            raise ValueError(f"permute {dims} {perm} of {self.shape(a)}")
        if tuple(perm) == (0, 1, 2):
            return a
        p = [dims[i] for i in perm]
        return self.add(Tile("permute", (a,), (p[0], p[1] * p[2]), (tuple(dims), tuple(perm))))

    def gmax(self, a: int, group: int) -> int:
        """max over each group of `group` consecutive columns (a softmax shift: no adjoint, see above)."""
        r, n = self.shape(a)
        if n % group:
            raise ValueError(f"gmax: width {n} is not a multiple of {group}")
        return self.add(Tile("gmax", (a,), (r, n // group), (group,)))

    def place_cols(self, a: int, off: int, n: int, width: int, src: int = 0) -> int:
        """[r, width]: columns src..src+n-1 of `a` at columns off..off+n-1, zeros elsewhere."""
        r, have = self.shape(a)
        if n < 1 or min(off, src) < 0 or off + n > width or src + n > have:
            raise ValueError(f"place_cols: {n} columns from {src} of {self.shape(a)} to {off} of width {width}")
        if (off, src, n) == (0, 0, width) and have == width:
            return a
        return self.add(Tile("place_cols", (a,), (r, width), (off, n, src)))

    def reduce_to(self, a: int, shape: Shape) -> int:
        """Sum the axes along which `a` was broadcast from `shape` (the adjoint of broadcasting)."""
        for axis in range(2):
            if shape[axis] == 1 and self.shape(a)[axis] != 1:
                a = self.sum(a, axis)
        return a

    # ---- inspection -----------------------------------------------------------------------------
    def live(self, roots: list[int]) -> list[int]:
        """The nodes the roots depend on, in program order."""
        seen: set[int] = set()
        stack = list(roots)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.nodes[i].args)
        return sorted(seen)

    def __str__(self) -> str:
        lines = []
        for i, t in enumerate(self.nodes):
            args = ", ".join(f"%{a}" for a in t.args)
            attrs = f" {list(t.attrs)}" if t.attrs else ""
            lines.append(f"%{i} = {t.op}({args}){attrs} : {list(t.shape)}")
        lines += [f"out {name} = %{i}" for name, i in self.outputs.items()]
        return "\n".join(lines)
