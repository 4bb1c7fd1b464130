"""Evaluate a tile program with torch tensors: the oracle for the tile IR and its adjoints.

Tests run a generated chunk program here, next to `torch.autograd`, before any kernel is printed:
a wrong adjoint rule shows up as a plain tensor mismatch, not as a kernel bug.
"""

from __future__ import annotations

import torch

from .sympy_print import torch_lambda
from .tile_ir import TileGraph


def evaluate(graph: TileGraph, inputs: dict[str, torch.Tensor], upto: int | None = None) -> list[torch.Tensor]:
    """Every node's value, in program order; inputs by name (2-D tensors of the declared shapes)."""
    values: list[torch.Tensor] = []
    n = len(graph.nodes) if upto is None else upto
    for tile in graph.nodes[:n]:
        a = [values[i] for i in tile.args]
        if tile.op == "input" and tile.attrs[0] in graph.mask_defs and tile.attrs[0] not in inputs:
            x = mask_value(graph.mask_defs[tile.attrs[0]])
        elif tile.op == "input":
            x = inputs[tile.attrs[0]]
            if tuple(x.shape) != tile.shape:
                raise ValueError(f"input {tile.attrs[0]}: shape {tuple(x.shape)}, expected {tile.shape}")
        elif tile.op == "const":
            x = torch.tensor([[tile.attrs[0]]], dtype=torch.float64)
        elif tile.op == "ew":
            x = torch_lambda(tile.attrs[0], len(a))(*a)
            x = torch.as_tensor(x, dtype=torch.float64).expand(tile.shape)
        elif tile.op == "dot":
            x = a[0] @ a[1]
        elif tile.op == "trans":
            x = a[0].T
        elif tile.op == "sum":
            x = a[0].sum(dim=tile.attrs[0], keepdim=True)
        elif tile.op == "cumsum":
            axis, reverse = tile.attrs
            x = a[0].flip(axis).cumsum(axis).flip(axis) if reverse else a[0].cumsum(axis)
        elif tile.op == "where":
            x = torch.where(a[0], a[1], a[2])
        elif tile.op == "expand":
            x = a[0].expand(tile.shape)
        elif tile.op == "kron":
            x = (a[0][:, :, None] * a[1][:, None, :]).reshape(tile.shape)
        elif tile.op == "kron_da":
            g, b = a
            x = (g.reshape(g.shape[0], -1, b.shape[1]) * b[:, None, :]).sum(2)
        elif tile.op == "kron_db":
            g, a0 = a
            x = (g.reshape(g.shape[0], a0.shape[1], -1) * a0[:, :, None]).sum(1)
        elif tile.op == "bmm":
            m, k, n, ta, tb = tile.attrs
            a3 = a[0].reshape(-1, k, m).mT if ta else a[0].reshape(-1, m, k)
            b3 = a[1].reshape(-1, n, k).mT if tb else a[1].reshape(-1, k, n)
            x = (a3 @ b3).reshape(-1, m * n)
        elif tile.op == "permute":
            dims, perm = tile.attrs
            x = a[0].reshape(dims).permute(perm).reshape(tile.shape)
        elif tile.op == "reshape":
            x = a[0].reshape(tile.shape)
        elif tile.op == "gmax":
            x = a[0].reshape(a[0].shape[0], -1, tile.attrs[0]).amax(dim=2)
        elif tile.op == "place_cols":
            # the printed kernel's gather: a clamped index (0 outside the block), then the block mask
            off, n, src = tile.attrs
            j = torch.arange(tile.shape[1])
            inside = (j >= off) & (j < off + n)
            index = torch.where(inside, j - off + src, 0).expand(a[0].shape[0], -1)
            x = torch.where(inside, torch.gather(a[0], 1, index), 0.0)
        elif tile.op == "trinv":
            eye = torch.eye(tile.shape[0], dtype=a[0].dtype)
            x = torch.linalg.solve_triangular(eye + torch.where(a[1], a[0], 0.0), eye, upper=False)
        else:
            raise ValueError(f"unknown tile op {tile.op}")
        values.append(x)
    return values


def mask_value(definition: tuple) -> torch.Tensor:
    """The boolean tile of a mask definition (see TileGraph.mask)."""
    kind, *args = definition
    if kind == "cols":
        n, width = args
        return (torch.arange(width) < n)[None, :]
    if kind == "band":
        c, C = args
        j, col = torch.arange(C)[:, None], torch.arange(C)[None, :]
        return (col <= j) & (col > j - c)
    if kind == "ltri":
        (C,) = args
        col = torch.arange(C * C)[None, :]
        return col // C >= col % C
    if kind == "hband":
        c, C, hh = args
        return torch.arange(hh)[None, :] > torch.arange(C)[:, None] + hh - c
    off, n, p_in, p_out = args
    i, j = torch.arange(p_in)[:, None], torch.arange(p_out)[None, :]
    return (j == i + off) & (i < n)
