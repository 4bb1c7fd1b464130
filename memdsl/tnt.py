"""TNT (Li et al., arXiv:2511.07343; MATH.md §6): a hierarchy of one global and N local memories.

* The **global** memory runs any 1-D rule anchored at a large chunk C_G and is read at its
  chunk-start state: o_global_t = read(V_{ξ(t, C_G)}, q_t).
* Each **local** memory i runs a rule at a small chunk C_L^(i) and is reset to its learned initial
  state every S_L^(i) tokens, so its shards are independent: they are folded onto the batch axis.
  It reads with the query projected on the keys seen since the last reset,
  Π_t q_t with Π_t = Σ_{τ in shard, τ ≤ t} k̂_τ k̂_τᵀ (k̂ = k / ‖k‖), carried chunkwise.
* The layer output is the sum of all memories' reads.

Gates and params are looked up per memory first (``"global.theta"``, ``"local0.W1"``), then by
their plain name, so one dict can share or separate them. Stage two (§6.4) is
`finetune_schedule`: new local chunk sizes for a trained model, optionally training only the
local memories.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TNTSchedule:
    global_chunk: int
    locals: tuple[tuple[int, int], ...]  # (chunk, reset period) per local memory
    qk_projection: bool = True

    def __post_init__(self):
        if self.global_chunk < 1:
            raise ValueError(f"global chunk must be ≥ 1, got {self.global_chunk}")
        for c, s in self.locals:
            if c < 1 or s < c or s % c:
                raise ValueError(f"local chunk {c} with reset {s}: the reset must be a multiple of the chunk")

    @property
    def memories(self) -> list[str]:
        return ["global"] + [f"local{i}" for i in range(len(self.locals))]

    @classmethod
    def from_spec(cls, sched) -> TNTSchedule:
        """From a Program's ScheduleSpec (the file's `schedule` block)."""
        return cls(sched.global_chunk, tuple((loc.chunk, loc.reset) for loc in sched.locals), sched.qk_projection)


def _pick(d: dict, memory: str, names) -> dict:
    return {n: d[f"{memory}.{n}"] if f"{memory}.{n}" in d else d[n] for n in names if f"{memory}.{n}" in d or n in d}


def _params_for(rule, params: dict, memory: str) -> dict:
    names = list(rule.spec["outers"]) + list(rule.spec["params"])
    return _pick(params or {}, memory, names)


def _gates_for(rule, gates: dict, memory: str) -> dict:
    return _pick(gates or {}, memory, rule.spec["gates"])


# The block in which the Q-K projection is computed; any divisor of S_L gives the same Π_t q_t (to rounding).
# Blocks of 64 instead of the local chunk 16 made its forward+backward 1.5x faster at d = 64, T = 32768 (CPU).
_QK_BLOCK = 64


def _fold(x: torch.Tensor, shard: int) -> torch.Tensor:
    """[B, T, ...] → [B * ceil(T / shard), shard, ...], zero-padding the end."""
    B, T = x.shape[:2]
    n = -(-T // shard)
    x = F.pad(x, [0, 0] * (x.dim() - 2) + [0, n * shard - T])
    return x.reshape(B * n, shard, *x.shape[2:])


def _unfold(x: torch.Tensor, B: int, T: int) -> torch.Tensor:
    return x.reshape(B, -1, *x.shape[2:])[:, :T]


def qk_project(q: torch.Tensor, k: torch.Tensor, reset: int, chunk: int | None = None) -> torch.Tensor:
    """Π_t q_t with Π the reset-aligned running sum of k̂ k̂ᵀ, computed in blocks of `chunk` (a divisor of
    `reset`; by default gcd(reset, 64)). q, k: [B, T, H, D]."""
    B, T = q.shape[:2]
    chunk = chunk or math.gcd(reset, _QK_BLOCK)
    n = reset // chunk
    qs, ks = _fold(q, reset), _fold(F.normalize(k, dim=-1, eps=1e-12), reset)  # [N, S, H, D]
    qs = qs.transpose(1, 2).unflatten(2, (n, chunk))  # [N, H, n, C, D]
    ks = ks.transpose(1, 2).unflatten(2, (n, chunk))
    # all chunks at once: Π at each chunk start is an exclusive prefix sum of the chunks' k̂ᵀk̂
    per_chunk = ks.mT @ ks  # [N, H, n, D, D]
    starts = F.pad(per_chunk.cumsum(dim=2)[:, :, :-1], [0, 0, 0, 0, 1, 0])
    out = qs @ starts + (qs @ ks.mT).tril() @ ks  # [N, H, n, C, D]
    return _unfold(out.flatten(2, 3).transpose(1, 2), B, T)


def qk_project_reference(q: torch.Tensor, k: torch.Tensor, reset: int) -> torch.Tensor:
    """The same projection token by token (the oracle)."""
    kn = F.normalize(k, dim=-1, eps=1e-12)
    proj = None
    out = []
    for t in range(q.shape[1]):
        outer = kn[:, t].unsqueeze(-1) * kn[:, t].unsqueeze(-2)
        proj = outer if t % reset == 0 else proj + outer
        out.append(torch.einsum("bhij,bhj->bhi", proj, q[:, t]))
    return torch.stack(out, dim=1)


def tnt_forward(global_rule, local_rules, q, k, v, gates, params, schedule: TNTSchedule, backend: str = "auto",
                state: dict | None = None, return_state: bool = False):
    """The TNT hierarchy on [B, T, H, D] inputs; returns y [B, T, H, Dv] (and the global memory's final state
    with `return_state`). `state` starts the global memory from a previous segment: a sequence split into
    segments that start on multiples of C_G and of every S_L gives the same result piece by piece, since
    the locals restart at each segment (context parallelism relies on this)."""
    y, new_state = global_rule(q, k, v, _gates_for(global_rule, gates, "global"),
                               _params_for(global_rule, params, "global"), state,
                               chunk=schedule.global_chunk, backend=backend, read_order="chunk_start")
    y = y + tnt_locals(local_rules, q, k, v, gates, params, schedule, backend)
    return (y, new_state) if return_state else y


def tnt_locals(local_rules, q, k, v, gates, params, schedule: TNTSchedule,
               backend: str = "auto") -> torch.Tensor | int:
    """The sum of the local memories' reads (0 without locals): independent of anything before the current
    S_L-token shard."""
    B, T = q.shape[:2]
    y = 0
    folded: dict[int, tuple] = {}  # locals with the same reset share their folded q (projected), k, v
    for i, ((chunk, reset), rule) in enumerate(zip(schedule.locals, local_rules, strict=True)):
        name = f"local{i}"
        if reset not in folded:  # the projection does not depend on the chunk (only its computation does)
            q_i = qk_project(q, k, reset) if schedule.qk_projection else q
            folded[reset] = (_fold(q_i, reset), _fold(k, reset), _fold(v, reset))
        g = {n: _fold(x, reset) for n, x in _gates_for(rule, gates, name).items()}
        y_i, _ = rule(*folded[reset], g, _params_for(rule, params, name), chunk=chunk, backend=backend)
        y = y + _unfold(y_i, B, T)
    return y


def tnt_reference(global_rule, local_rules, q, k, v, gates, params, schedule: TNTSchedule):
    """The hierarchy token by token: anchored token loops, explicit resets and projections."""
    B, T = q.shape[:2]
    y, _ = global_rule(q, k, v, _gates_for(global_rule, gates, "global"), _params_for(global_rule, params, "global"),
                       chunk=schedule.global_chunk, backend="anchored_loop", read_order="chunk_start")
    for i, ((chunk, reset), rule) in enumerate(zip(schedule.locals, local_rules, strict=True)):
        name = f"local{i}"
        q_i = qk_project_reference(q, k, reset) if schedule.qk_projection else q
        g_all = _gates_for(rule, gates, name)
        p = _params_for(rule, params, name)
        parts = []
        for s in range(0, T, reset):  # every shard starts again from the learned initial state
            sl = slice(s, min(s + reset, T))
            y_s, _ = rule(q_i[:, sl], k[:, sl], v[:, sl], {n: x[:, sl] for n, x in g_all.items()}, p,
                          chunk=chunk, backend="anchored_loop")
            parts.append(y_s)
        y = y + torch.cat(parts, dim=1)
    return y


def finetune_schedule(model: torch.nn.Module, local_chunks: list[int], freeze_others: bool = False) -> int:
    """TNT stage two: give every TNT layer of `model` new local chunk sizes (weights untouched).

    With `freeze_others`, only the local memories' own parameters (initial memories, outer
    constants, gate projections) keep `requires_grad`. Returns the number of layers changed."""
    from .nn import MemoryLayer
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer) and m.tnt is not None]
    for layer in layers:
        if len(local_chunks) != len(layer.tnt.locals):
            raise ValueError(f"{len(local_chunks)} chunk sizes for {len(layer.tnt.locals)} local memories")
        layer.tnt = replace(layer.tnt, locals=tuple((c, s) for c, (_, s) in zip(local_chunks, layer.tnt.locals,
                                                                                 strict=True)))
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in layers:
            for _, module in layer.local_modules():
                for p in module.parameters():
                    p.requires_grad_(True)
    return len(layers)
