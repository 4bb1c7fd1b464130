"""The one small model every rule is compared in, and the model specs the runner accepts.

A spec names a rule and how it is scheduled:

    rules/titans.mem        the rule at its file's chunk size
    rules/titans.mem@8      the rule at chunk 8
    tnt:rules/titans.mem    TNT stage one: a global memory and one local memory (schedule from the runner)
    tnt2:rules/titans.mem   the same, then TNT stage two for the last 10% of training: smaller local
                            chunks, only the local memories train (MATH.md §6.4)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import ast as A
from ..driver import load_ast
from ..nn import MemoryLayer
from ..tnt import TNTSchedule


@dataclass(frozen=True)
class ModelSpec:
    rule: str
    chunk: int | None = None
    tnt: TNTSchedule | None = None
    stage_two_chunk: int | None = None

    @property
    def label(self) -> str:
        name = Path(self.rule).stem
        if self.tnt is not None:
            local = ",".join(str(c) for c, _ in self.tnt.locals)
            text = f"tnt-{name} G{self.tnt.global_chunk} L{{{local}}}"
            return text + (f" +S2 L{{{self.stage_two_chunk}}}" if self.stage_two_chunk else "")
        return name + (f"@{self.chunk}" if self.chunk else "")


def parse_spec(text: str, tnt: TNTSchedule, stage_two_chunk: int) -> ModelSpec:
    """A command-line spec (see the module docstring) as a ModelSpec."""
    kind, _, rest = text.rpartition(":") if text.startswith(("tnt:", "tnt2:")) else ("", "", text)
    path, _, chunk = rest.partition("@")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no rule file {path!r} (spec {text!r})")
    if kind:
        if chunk:
            raise ValueError(f"{text!r}: a TNT spec takes its chunks from --tnt, not from @")
        return ModelSpec(path, tnt=tnt, stage_two_chunk=stage_two_chunk if kind == "tnt2" else None)
    return ModelSpec(path, chunk=int(chunk) if chunk else None)


@dataclass(frozen=True)
class ModelConfig:
    """The shared shape of every model in a table."""

    vocab: int
    width: int = 64
    heads: int = 4
    layers: int = 2


def lr_gates(rule_path: str) -> set[str]:
    """Sigmoid gates that are the rule's whole inner learning rate (`optim ...(lr = gate)`).

    A rule that scales its rate (TTT's `lr = eta / d`) has chosen its own start and is left alone."""
    memory = load_ast(rule_path)[0].memory
    sigmoid = {s.name for s in memory.stmts if isinstance(s, A.Gate) and s.activation == "sigmoid"}
    lr = {v.id for s in memory.stmts if isinstance(s, A.Optim) for k, v in s.call.kwargs
          if k == "lr" and isinstance(v, A.Name)}
    return sigmoid & lr


def cap_lr_gates(layer: MemoryLayer, rule_path: str) -> None:
    """Bound an anchored rule's inner learning rate by 1/C per token: lr = sigmoid(x) / C.

    MemoryLayer's lr gate is a plain sigmoid (up to 1). An anchored chunk sums C gradients taken
    at the chunk-start state, so a chunk's step reaches C·lr: fresh titans and omeganet memories
    (C = 16) diverged to NaN on the LM corpus, and after a few dozen steps they learned rates
    that diverged again. The cap keeps a chunk's summed step ≤ 1 (titans-pytorch likewise scales
    its adaptive step by a max_lr of 1e-2). C is the largest chunk of the layer's memories (TNT's
    global chunk). Exact (WY) delta rules are contractions at any β ≤ 1 and are left alone."""
    if not layer.rule.algorithm.startswith("anchored"):
        return
    chunk = layer.chunk or layer.rule.chunk
    if layer.tnt is not None:
        chunk = max([layer.tnt.global_chunk] + [c for c, _ in layer.tnt.locals])
    layer.gate_act = dict(layer.gate_act)  # the layer's own table: this changes only `layer`
    for name in lr_gates(rule_path):
        layer.gate_act[name] = _Scaled(1.0 / chunk)


class _Scaled:
    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * torch.sigmoid(x)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, cfg: ModelConfig, idx: int):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.width), nn.RMSNorm(cfg.width)
        self.mixer = MemoryLayer(spec.rule, cfg.width, cfg.heads, chunk=spec.chunk, layer_idx=idx, tnt=spec.tnt)
        cap_lr_gates(self.mixer, spec.rule)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class EvalModel(nn.Module):
    """Embedding → `layers` × (MemoryLayer + MLP, pre-norm residual) → RMSNorm → logits."""

    def __init__(self, spec: ModelSpec, cfg: ModelConfig):
        super().__init__()
        self.spec, self.cfg = spec, cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.blocks = nn.ModuleList(Block(spec, cfg, i) for i in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def memory_layers(self) -> list[MemoryLayer]:
        return [b.mixer for b in self.blocks]

    def set_chunk(self, chunk: int | None) -> None:
        """Run every single-memory layer at `chunk` (the rule's own chunk when None); weights untouched.

        For anchored rules C is part of the function (MATH.md §6.4), so this changes the model."""
        for layer in self.memory_layers():
            if layer.tnt is not None:
                raise ValueError("set_chunk is for single-memory layers; TNT uses memdsl.tnt.finetune_schedule")
            layer.chunk = chunk

    def state_size(self) -> int:
        """Floats of memory (the rule's `param`s, not optimizer state) per sequence, summed over layers."""
        return sum(p.numel() for layer in self.memory_layers() for mem in layer.memories.values()
                   for p in mem.init_memory.values())
