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
                 tnt: TNTSchedule | None = None, max_lr: float | None = None):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(d_model), nn.RMSNorm(d_model)
        self.mixer = MemoryLayer(rule, d_model, heads, chunk=chunk, layer_idx=idx, tnt=tnt, max_lr=max_lr)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, past_key_values: dict | None = None,
                use_cache: bool = False) -> torch.Tensor:
        """x [B, T, d_model]; with `use_cache` the mixer's cache goes into `past_key_values` (a dict the caller
        keeps across decoding steps, one entry per layer)."""
        kw = {} if attention_mask is None else {"attention_mask": attention_mask}
        if use_cache or past_key_values is not None:  # keywords, and only when used: hooks (context parallel) set them
            kw.update(past_key_values=past_key_values, use_cache=use_cache)
        x = x + self.mixer(self.norm1(x), **kw)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A byte-level language model: embedding, `layers` blocks, norm, head. tokens [B, T] → logits [B, T, 256].
    `max_lr` caps every memory's inner learning rate (MemoryLayer.max_lr)."""

    def __init__(self, rule: str | CompiledRule, d_model: int = 64, layers: int = 2, heads: int = 4,
                 chunk: int | None = None, tnt: TNTSchedule | None = None, max_lr: float | None = None):
        super().__init__()
        self.embed = nn.Embedding(256, d_model)
        self.blocks = nn.ModuleList(Block(rule, d_model, heads, chunk, i, tnt, max_lr) for i in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, 256, bias=False)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: dict | None = None, use_cache: bool = False) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, attention_mask, past_key_values, use_cache)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, prompts: list[bytes], max_new_tokens: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> list[bytes]:
        """Continue every prompt by `max_new_tokens` bytes, all prompts in one batch: left-padded to the longest,
        the attention mask says which positions are padding, and each step feeds one byte per row through
        the layers' caches. Greedy at temperature 0, else sampled. Each row gets what it would alone."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one byte")
        device = self.head.weight.device
        T = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), T, dtype=torch.long, device=device)
        mask = torch.zeros_like(tokens)
        for b, p in enumerate(prompts):
            tokens[b, T - len(p):] = torch.tensor(list(p), device=device)
            mask[b, T - len(p):] = 1
        cache: dict = {}
        logits = self(tokens, mask, cache, use_cache=True)[:, -1]
        out = []
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                nxt = logits.argmax(-1)
            out.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = self(nxt[:, None], mask, cache, use_cache=True)[:, -1]
        new = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
        return [bytes(row) for row in new]
