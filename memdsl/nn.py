"""`MemoryLayer`: a compiled rule as a token mixer, with flash-linear-attention's call shape.

x → q, k, v projections → short causal depthwise conv + SiLU → L2-normalised q, k → the rule
(gates projected from x with the rule's activations; learned initial memory and outer constants)
→ per-head RMS norm → output gate → output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ast as A
from .api import CompiledRule, compile
from .driver import load_ast
from .padding import Aligned, check_mask, conv_input
from .tnt import TNTSchedule, tnt_forward

_ACTIVATIONS = {
    "sigmoid": torch.sigmoid, "softplus": F.softplus, "exp": torch.exp, "identity": lambda x: x,
    "tanh": torch.tanh, "silu": F.silu,
}


def lr_gate_of(rule: CompiledRule) -> str | None:
    """The gate in the rule's inner learning rate (`optim ...(lr = theta)`, `lr = eta / d`), or None when the lr
    holds no gate or more than one."""
    memory = load_ast(rule.module.RULE_SOURCE)[0].memory
    gates = {s.name for s in memory.stmts if isinstance(s, A.Gate)}
    found: set[str] = set()

    def walk(e) -> None:
        if isinstance(e, A.Name) and e.id in gates:
            found.add(e.id)
        for child in (getattr(e, "left", None), getattr(e, "right", None), getattr(e, "operand", None),
                      *getattr(e, "args", ()), *(v for _, v in getattr(e, "kwargs", ()))):
            if child is not None:
                walk(child)

    for s in memory.stmts:
        if isinstance(s, A.Optim):
            for key, value in s.call.kwargs:
                if key == "lr":
                    walk(value)
    return found.pop() if len(found) == 1 else None


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution with a decoding cache of the last `size - 1` inputs."""

    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.size = size
        self.conv = nn.Conv1d(channels, channels, size, groups=channels, padding=0, bias=False)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, T, C]; cache: [B, size - 1, C] (the inputs before x); lengths: x holds each row's tokens last
        # (padding.py), row b's are its last lengths[b]
        B, T, C = x.shape
        if cache is None:
            cache = x.new_zeros(B, self.size - 1, C)
        full = conv_input(x, cache, lengths)
        y = self.conv(full.transpose(1, 2)).transpose(1, 2)
        return F.silu(y), full[:, -(self.size - 1):] if self.size > 1 else full[:, :0]


class MemoryLayer(nn.Module):
    """A test-time-memory token mixer built from a rule file (path, source or CompiledRule).

    forward(hidden_states [B, T, d_model], attention_mask=None, past_key_values=None, use_cache=False)
    returns (output [B, T, d_model], None, past_key_values) like flash-linear-attention layers.
    The cache (a dict) carries the conv states and the memory state; decoding piece by piece gives
    the full-sequence result whenever the pieces end on chunk boundaries (and always at chunk 1).
    A TNT layer carries only its global memory in the cache, so it takes one only with `tnt_segments=True`,
    for segments that start on multiples of C_G and of every S_L (memdsl.distributed chains shards so).
    `attention_mask` ([B, S ≥ T], 1 = token, 0 = padding; while decoding, past and new tokens): each row computes
    what it computes unpadded (one call, or packed sequences when the cache is returned: memdsl/padding.py), so
    left-padded prompts, right-padded batches and rows that stop while others decode give every row its
    unpadded result; the output is zero at padding. The rule call itself goes through the compiled rule's
    dispatch (Triton on CUDA, the tile programs for CPU training); `backend` (a plain attribute) fixes one, as
    in `rule(...)`.

    `max_lr` caps the inner learning rate like titans-pytorch's `max_lr`: the rule's lr gate (`lr_gate`, by
    default the one gate in its `optim ...(lr = ...)`) is read as max_lr·sigmoid(x) instead of through its
    declared activation, in every memory of a TNT hierarchy. An anchored chunk sums C gradients taken at
    its start, so an uncapped sigmoid lets one chunk step by up to C·lr. Plain attribute: settable later.
    """

    def __init__(self, rule: str | CompiledRule, d_model: int, n_heads: int, head_dim: int | None = None,
                 conv_size: int = 4, chunk: int | None = None, output_gate: bool = True,
                 norm_eps: float = 1e-5, layer_idx: int = 0, tnt: TNTSchedule | None = None,
                 max_lr: float | None = None, lr_gate: str | None = None, backend: str = "auto"):
        super().__init__()
        self.rule = rule if isinstance(rule, CompiledRule) else compile(rule)
        if not isinstance(self.rule, CompiledRule):  # a 2-D rule: memdsl.compile gave a twod.Rule2D
            raise ValueError(f"rule {self.rule.name} runs over time × variate grids ([B, T, V, H, D]); MemoryLayer "
                             "mixes token sequences. Use the rule's module_class() (memdsl.twod.Memory2D) or "
                             "benchmarks/timeseries/ltsf.py's RuleMixer")
        if lr_gate is not None and lr_gate not in self.rule.spec["gates"]:
            raise ValueError(f"lr_gate {lr_gate!r} is not a gate of rule {self.rule.name}: "
                             f"{sorted(self.rule.spec['gates'])}")
        self.lr_gate = lr_gate or lr_gate_of(self.rule)
        self.max_lr = max_lr
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = head_dim or d_model // n_heads
        self.chunk, self.layer_idx, self.backend = chunk, layer_idx, backend
        spec_tnt = self.rule.spec.get("tnt")
        if tnt is None and spec_tnt is not None:  # the rule file's schedule block asks for a TNT hierarchy
            tnt = TNTSchedule(spec_tnt["global_chunk"], tuple(map(tuple, spec_tnt["locals"])),
                              spec_tnt["qk_projection"])
        self.tnt = tnt
        H, D = n_heads, self.head_dim
        names = tnt.memories if tnt is not None else ["main"]
        # one memory (initial state + outer constants) per memory of the hierarchy
        self.memories = nn.ModuleDict({m: self.rule.module_class()(H, D) for m in names})
        shapes = self.memories[names[0]].shapes
        self.dk, self.dv = shapes["k"][-1], shapes["v"][-1]
        self.q_proj = nn.Linear(d_model, H * shapes["q"][-1], bias=False)
        self.k_proj = nn.Linear(d_model, H * self.dk, bias=False)
        self.v_proj = nn.Linear(d_model, H * self.dv, bias=False)
        self.convs = nn.ModuleDict({n: ShortConv(H * shapes[n][-1], conv_size) for n in ("q", "k", "v")})
        self.gate_proj = nn.ModuleDict()
        self.gate_act = {}
        for m in names:
            for name, info in self.rule.spec["gates"].items():
                width = shapes[name][0] if info["channels"] else 1
                self.gate_proj[f"{m}__{name}"] = nn.Linear(d_model, H * width, bias=True)
                self.gate_act[name] = _ACTIVATIONS[info["activation"]]
        self.out_norm = nn.RMSNorm(self.dv, eps=norm_eps)
        self.g_proj = nn.Linear(d_model, H * self.dv, bias=False) if output_gate else None
        self.o_proj = nn.Linear(H * self.dv, d_model, bias=False)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values: dict | None = None, use_cache: bool = False, tnt_segments: bool = False, **kwargs):
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                or hidden_states.shape[-1] != self.d_model or not hidden_states.is_floating_point():
            got = (f"{hidden_states.dtype} {tuple(hidden_states.shape)}" if isinstance(hidden_states, torch.Tensor)
                   else type(hidden_states).__name__)
            raise ValueError(f"hidden_states: expected a floating [B, T, d_model={self.d_model}] tensor, got {got}")
        B, T, _ = hidden_states.shape
        H = self.n_heads
        if T == 0:  # nothing to mix: the cache, if any, stays as it was
            return self.o_proj.weight.new_zeros(B, 0, self.d_model).to(hidden_states.dtype), None, past_key_values
        # padding (memdsl/padding.py): tokens first and one call, or tokens last and packed sequences when the
        # cache (the state after each row's last token) is returned
        mask = None if attention_mask is None else check_mask(attention_mask, B, T)
        aligned = None if mask is None or bool(mask.all()) else Aligned(mask, tokens_first=not use_cache)
        if aligned is not None and self.tnt is not None:
            raise ValueError("attention_mask with padding: TNT layers take unpadded sequences only (their local "
                             "memories reset on absolute positions); pass each sequence unpadded")
        cache = (past_key_values or {}).get(self.layer_idx) if past_key_values is not None else None
        x = hidden_states
        if aligned is not None:  # padding zeroed: whatever it holds, what the memory does after a row is bounded
            x = aligned.align(torch.where(mask[..., None], hidden_states, 0))
        new_conv = {}
        proj = {"q": self.q_proj(x), "k": self.k_proj(x), "v": self.v_proj(x)}
        lengths = None if aligned is None or aligned.tokens_first else aligned.lengths
        for n in ("q", "k", "v"):
            proj[n], new_conv[n] = self.convs[n](proj[n], None if cache is None else cache["conv"][n], lengths)
        q = F.normalize(proj["q"].view(B, T, H, -1), dim=-1)
        k = F.normalize(proj["k"].view(B, T, H, -1), dim=-1)
        v = proj["v"].view(B, T, H, -1)
        if self.max_lr is not None and self.lr_gate is None:
            raise ValueError(f"max_lr: rule {self.rule.name} has no single gate in its lr; pass lr_gate=")
        gates = {}
        for key, lin in self.gate_proj.items():
            memory, name = key.split("__", 1)
            pre = lin(x).to(torch.promote_types(x.dtype, torch.float32))
            capped = self.max_lr is not None and name == self.lr_gate
            g = self.max_lr * torch.sigmoid(pre) if capped else self.gate_act[name](pre)
            g = g.view(B, T, H) if not self.rule.spec["gates"][name]["channels"] else g.view(B, T, H, -1)
            gates[name if self.tnt is None else f"{memory}.{name}"] = g
        if self.tnt is not None:
            if (cache is not None or use_cache) and not tnt_segments:
                raise ValueError("decoding with a cache is not available for TNT layers yet: "
                                 "run the full sequence (the locals reset every S_L tokens anyway), or pass "
                                 "tnt_segments=True to chain segments that start on multiples of C_G and every S_L")
            params = {f"{m}.{n}": p for m, mod in self.memories.items() for n, p in mod.params().items()}
            y, state = tnt_forward(self.rule, [self.rule] * len(self.tnt.locals), q, k, v, gates, params, self.tnt,
                                   backend=self.backend, state=None if cache is None else cache["state"],
                                   return_state=True)
        elif aligned is None or aligned.tokens_first:
            state = None if cache is None else cache["state"]
            y, state = self.memories["main"](q, k, v, gates, state=state, chunk=self.chunk, backend=self.backend)
        else:  # one packed sequence per row, each from its own state; padding's outputs are zero
            state = None if cache is None else cache["state"]
            y, state = self.memories["main"](aligned.pack(q), aligned.pack(k), aligned.pack(v),
                                             {n: aligned.pack(g) for n, g in gates.items()}, state=state,
                                             chunk=self.chunk, backend=self.backend,
                                             cu_seqlens=aligned.cu_seqlens())
            y = aligned.unpack(y)
            window = self.rule.spec["window"]
            if window > 1 and "hist.k" not in state:  # (this layout runs only when the cache is returned)
                raise ValueError(f"attention_mask: rule {self.rule.name} carries the last {window - 1} tokens of each "
                                 f"row (its window) in the cache, and a row here has fewer so far "
                                 f"({aligned.lengths.tolist()} tokens in this call): decode such rows on their own")
        y = self.out_norm(y.to(x.dtype))
        if self.g_proj is not None:
            y = y * torch.sigmoid(self.g_proj(x).view(B, T, H, -1))
        out = self.o_proj(y.reshape(B, T, -1))
        if aligned is not None:
            out = aligned.restore(torch.where(aligned.mask[..., None], out, 0))
        if use_cache:
            past_key_values = {} if past_key_values is None else past_key_values
            past_key_values[self.layer_idx] = {"conv": new_conv, "state": state}
        return out, None, past_key_values

    @property
    def memory(self):
        """The memory of a single-memory layer."""
        return self.memories["main"]

    def local_modules(self):
        """(name, module) of every part that belongs to a local memory of a TNT layer."""
        for m, mod in self.memories.items():
            if m.startswith("local"):
                yield m, mod
        for key, lin in self.gate_proj.items():
            if key.startswith("local"):
                yield key, lin
