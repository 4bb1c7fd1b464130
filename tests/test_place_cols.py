"""The tile op place_cols (a block of columns moved to another offset of a zero tile: a concat's block in the
padded polynomial features, without a placement matrix): tile_eval against a slice-and-pad reference, its
adjoint (tile_grad) against torch.autograd and finite differences, and the printed Triton (a tl.gather) under
the interpreter on the CPU, forward and adjoint, at odd block sizes, offsets and padded widths."""

from __future__ import annotations

import importlib.util

import pytest
import sympy as sp
import torch

from codegen.tile_eval import evaluate
from codegen.tile_grad import backward
from codegen.tile_ir import TileGraph, X
from codegen.tile_triton import print_tiles

# (rows, source width, block size n, source column src, output offset off, output width W)
CASES = [
    (4, 8, 5, 0, 3, 16),    # a padded block at an odd offset, padding past it
    (2, 16, 7, 6, 9, 16),   # from the middle of the source to the last column of the output
    (1, 1, 1, 0, 0, 8),     # one column (the constant 1 of poly features) into a row
    (8, 32, 17, 11, 2, 32), # the block moves left (off < src)
]
IDS = [f"r{r}-p{p}-n{n}-src{s}-off{o}-w{w}" for r, p, n, s, o, w in CASES]


def reference(x: torch.Tensor, n: int, src: int, off: int, width: int) -> torch.Tensor:
    """The block by slicing and zero padding (independent of the gather the op is evaluated and printed with)."""
    return torch.nn.functional.pad(x[:, src:src + n], (off, width - off - n))


def _inputs(shapes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}


@pytest.mark.parametrize("rows, have, n, src, off, width", CASES, ids=IDS)
def test_eval_equals_slice_and_pad(rows, have, n, src, off, width):
    g = TileGraph()
    out = g.place_cols(g.input("x", (rows, have)), off, n, width, src=src)
    assert g.shape(out) == (rows, width)
    x = _inputs({"x": (rows, have)})["x"]
    assert torch.equal(evaluate(g, {"x": x})[out], reference(x, n, src, off, width))


def test_bad_blocks_are_refused_and_the_identity_is_no_node():
    g = TileGraph()
    x = g.input("x", (4, 8))
    for off, n, width, src in [(0, 9, 16, 0), (10, 7, 16, 0), (0, 3, 16, 6), (-1, 2, 16, 0), (0, 0, 16, 0)]:
        with pytest.raises(ValueError, match="place_cols"):
            g.place_cols(x, off, n, width, src=src)
    assert g.place_cols(x, 0, 8, 8) == x


def _features(rows: int, blocks: list[tuple[int, int, int]], width: int):
    """A concat as the kernels build it: block b (source width p, logical width n) at the running offset,
    the blocks summed, then a nonlinearity (so the adjoint has a chain to go through)."""
    g = TileGraph()
    xs, total = _concat(g, rows, blocks, width)
    return g, xs, g.ew(sp.tanh(X[0]) * X[0], total)


def _concat(g: TileGraph, rows: int, blocks: list[tuple[int, int, int]], width: int):
    """Inputs x<b> [rows, p] and the sum of their blocks placed side by side in `width` columns."""
    xs, total, off = [], None, 0
    for b, (p, n, src) in enumerate(blocks):
        xs.append(g.input(f"x{b}", (rows, p)))
        placed = g.place_cols(xs[-1], off, n, width, src=src)
        total = placed if total is None else g.add2(total, placed)
        off += n
    return xs, total


CONCATS = [(4, [(1, 1, 0), (4, 3, 0), (16, 9, 0)], 16),   # 1 + 3 + 9 = 13 of 16: poly(x, 2) at d = 3
           (2, [(8, 5, 2), (2, 2, 0), (32, 17, 7)], 32)]  # blocks from inside their sources


@pytest.mark.parametrize("rows, blocks, width", CONCATS, ids=["poly3", "offsets"])
def test_adjoint_equals_autograd_and_finite_differences(rows, blocks, width):
    g, xs, y = _features(rows, blocks, width)
    seed = g.input("seed", (rows, width))
    adj = backward(g, [(y, seed)], xs)
    values = _inputs({**{f"x{b}": g.shape(x) for b, x in enumerate(xs)}, "seed": (rows, width)}, seed=1)
    got = evaluate(g, values)

    def loss(vals: dict[str, torch.Tensor]) -> torch.Tensor:  # the same function, from slices
        feats, off = 0, 0
        for b, (_, n, src) in enumerate(blocks):
            feats = feats + reference(vals[f"x{b}"], n, src, off, width)
            off += n
        return (torch.tanh(feats) * feats * vals["seed"]).sum()

    leaves = {n: v.clone().requires_grad_() for n, v in values.items()}
    auto = torch.autograd.grad(loss(leaves), [leaves[f"x{b}"] for b in range(len(xs))])
    h = 1e-6
    for b, x in enumerate(xs):
        mine = got[adj[x]].expand(g.shape(x))
        torch.testing.assert_close(mine, auto[b], rtol=1e-12, atol=1e-12)
        p, n, src = blocks[b]
        assert torch.all(mine[:, :src] == 0) and torch.all(mine[:, src + n:] == 0)  # outside the block: no use
        fd = torch.zeros_like(mine)
        for r in range(rows):
            for c in range(p):
                plus, minus = dict(values), dict(values)
                plus[f"x{b}"], minus[f"x{b}"] = values[f"x{b}"].clone(), values[f"x{b}"].clone()
                plus[f"x{b}"][r, c] += h
                minus[f"x{b}"][r, c] -= h
                fd[r, c] = (loss(plus) - loss(minus)) / (2 * h)
        torch.testing.assert_close(mine, fd, rtol=1e-6, atol=1e-7)


def _kernel_source(g: TileGraph, loads: dict[str, int], stores: dict[str, int]) -> str:
    """A one-program kernel: load the named [r, c] inputs, print the tile graph, store the named nodes."""
    def offsets(shape):
        return f"tl.arange(0, {shape[0]})[:, None] * {shape[1]} + tl.arange(0, {shape[1]})[None, :]"
    body = [f"v_{n} = tl.load({n.upper()} + {offsets(g.shape(i))})" for n, i in loads.items()]
    names: dict[int, str] = {}
    body += print_tiles(g, {n: f"v_{n}" for n in loads}, g.live(list(stores.values())), names)
    body += [f"tl.store({n.upper()} + {offsets(g.shape(i))}, {names[i]})" for n, i in stores.items()]
    args = ", ".join(n.upper() for n in [*loads, *stores])
    return "\n".join(["import triton", "import triton.language as tl", "", "", "@triton.jit",
                      f"def kernel({args}):", *("    " + line for line in body), ""])


@pytest.mark.parametrize("rows, blocks, width", CONCATS, ids=["poly3", "offsets"])
def test_triton_gather_forward_and_adjoint(rows, blocks, width, tmp_path):
    """The printed kernel (TRITON_INTERPRET=1 on a CPU, see conftest) places the blocks and reads a cotangent's
    blocks back; fp32 copies and sums of disjoint blocks with zeros, so both are exact."""
    g = TileGraph()
    xs, feats = _concat(g, rows, blocks, width)
    cot = g.input("cot", (rows, width))
    adj = backward(g, [(feats, cot)], xs)
    stores = {"feats": feats, **{f"dx{b}": adj[x] for b, x in enumerate(xs)}}
    source = _kernel_source(g, {**{f"x{b}": x for b, x in enumerate(xs)}, "cot": cot}, stores)
    assert "tl.gather(" in source and "tl.dot(" not in source  # no placement matrix product
    path = tmp_path / "place_cols_kernel.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("place_cols_kernel", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    values = {n: v.float().to(device) for n, v in
              _inputs({**{f"x{b}": g.shape(x) for b, x in enumerate(xs)}, "cot": (rows, width)}, seed=2).items()}
    outs = {n: torch.full(g.shape(i), float("nan"), device=device) for n, i in stores.items()}
    mod.kernel[(1,)](*values.values(), *outs.values())

    want, off = torch.zeros(rows, width, device=device), 0
    leaves = [values[f"x{b}"].clone().requires_grad_() for b in range(len(xs))]
    for leaf, (_, n, src) in zip(leaves, blocks, strict=True):
        want = want + reference(leaf, n, src, off, width)
        off += n
    dwant = torch.autograd.grad((want * values["cot"]).sum(), leaves)
    torch.testing.assert_close(outs["feats"], want.detach(), rtol=0, atol=0)
    for b in range(len(xs)):
        torch.testing.assert_close(outs[f"dx{b}"], dwant[b], rtol=0, atol=0)
