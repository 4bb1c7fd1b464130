"""Small models built from `MemoryLayer`, shared by the examples, the distributed tests and benchmarks."""

from __future__ import annotations

import torch
from torch import nn

from .api import CompiledRule
from .nn import MemoryLayer
from .tnt import TNTSchedule


class Block(nn.Module):
    """Pre-norm residual block: a memory layer as token mixer, then a GELU MLP."""

    def __init__(self, rule: str | CompiledRule, d_model: int, heads: int, chunk: int | None, idx: int,
                 tnt: TNTSchedule | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.mixer = MemoryLayer(rule, d_model, heads, chunk=chunk, layer_idx=idx, tnt=tnt)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A byte-level language model: embedding, `layers` blocks, norm, head. tokens [B, T] → logits [B, T, 256]."""

    def __init__(self, rule: str | CompiledRule, d_model: int = 64, layers: int = 2, heads: int = 4,
                 chunk: int | None = None, tnt: TNTSchedule | None = None):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.blocks = nn.ModuleList(Block(rule, d_model, heads, chunk, i, tnt) for i in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
