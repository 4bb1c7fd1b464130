"""Context and data parallelism for memory layers on torch.distributed.

**Context parallelism.** One long sequence is cut along time into contiguous shards, one per rank of a
context group (`shard`). A memory layer is a recurrence over chunks, so rank r needs the state the
memory had at the start of its shard: rank r receives it from rank r−1, runs its shard from it, and
sends its final state to rank r+1. Backward runs the other way: the cotangent of the received state
goes back from r+1 to r, through the autograd Functions below, so every rank's gradients are the
single-process gradients (to rounding). What travels is small: a memory state per (batch, head), plus
the short-conv tail of a `MemoryLayer`.

* A plain compiled rule (`context_parallel`): shards must be multiples of the chunk (a different
  chunking is a different function). The pass is sequential: rank r waits for r−1. In a model of L
  memory layers the ranks form a wavefront (rank r runs layer l while r+1 runs layer l−1), so the
  sequential cost is (L + P − 1) shard-layers instead of L·P.
* TNT (`tnt_context_parallel`, and TNT `MemoryLayer`s): shards that are multiples of C_G and of every
  S_L make the local memories (reset every S_L tokens) and the Q-K projection independent across
  ranks; only the global memory's state travels. `tnt_context_parallel` runs the locals — most of the
  work — before it waits for the global state.
* Associative scan (`method="scan"`), for rules linear in the state (`affine_state`: the linear-attention
  and delta-rule families, one square matrix memory, scalar gates — also as TNT's global memory). A
  shard's map from initial to final state is then affine, W ↦ W P + Q (P: D_k×D_k per head), and
  maps compose associatively: (P₁, Q₁) then (P₂, Q₂) is (P₁P₂, Q₁P₂ + Q₂). Every rank finds its (P, Q)
  with no wait (one run of its shard from the states I and 0, batched; rank 0 runs its shard for real
  and contributes the constant map to its final state); one differentiable all-gather exchanges the
  maps, and each rank composes the maps before it in log₂ P batched steps (Hillis–Steele) and runs its
  shard from that state. No rank waits for another's shard, at the price of three shard runs' work per
  rank (the batched run counts twice) and P small maps per rank on the wire: a critical path of three
  shard runs instead of P (not timed here). Nonlinear memories (Titans' MLP) keep the sequential pass.

**Data parallelism.** `data_parallel` wraps a model in DDP or FSDP2 (`fully_shard` on every
`MemoryLayer` and on the root). With context parallelism inside, each rank's loss is the mean over its
own shard, and DDP/FSDP average gradients over *all* ranks (data × context): with equal shards this
is the gradient of the mean over every token, because the cross-rank part of each gradient arrives
through the state cotangents. `make_mesh` builds the 2-D (data, context) mesh.

Rules of use: every rank of a context group runs the same layers in the same order, and backward is
collective (all ranks call `loss.backward()`, or none; `torch.autograd.grad` restricted to some inputs
may skip the nodes that pass cotangents and leave a neighbour waiting). Tensors stay on their device
and only torch.distributed point-to-point calls move them, so the same code runs on gloo (CPU,
tested) and NCCL (GPU, not tested here). Use a context group of its own, not the group DDP/FSDP
reduce on, so that point-to-point messages never interleave with their collectives.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .nn import MemoryLayer
from .tnt import TNTSchedule, _gates_for, _params_for, tnt_locals

Tree = dict  # nested dicts of tensors (a rule's state, a MemoryLayer's cache)


def _rank_size(group) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def _flatten(tree: Tree, prefix: str = "") -> dict[str, torch.Tensor | None]:
    out = {}
    for key in sorted(tree):
        value = tree[key]
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unflatten(flat: dict[str, torch.Tensor | None]) -> Tree:
    tree: Tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


class _SendState(torch.autograd.Function):
    """Sends tensors to a peer; backward receives their cotangents from it. Returns a scalar token that
    the caller ties into its output (`_Tie`) so that backward on this rank reaches this node."""

    @staticmethod
    def forward(ctx, peer: int, group, *tensors):
        ctx.peer, ctx.group = peer, group
        ctx.like = [(t.shape, t.dtype, t.device) for t in tensors]
        for t in tensors:
            dist.send(t.detach().contiguous(), group_dst=peer, group=group)
        return tensors[0].new_zeros(())

    @staticmethod
    def backward(ctx, _token_grad):
        grads = []
        for shape, dtype, device in ctx.like:
            g = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(g, group_src=ctx.peer, group=ctx.group)
            grads.append(g)
        return (None, None, *grads)


class _RecvState(torch.autograd.Function):
    """Receives tensors from a peer; backward sends their cotangents back to it. `anchor` is a fresh
    leaf that requires grad: it puts this node in the graph although nothing local flows into it."""

    @staticmethod
    def forward(ctx, anchor, peer: int, group, like):
        ctx.peer, ctx.group = peer, group
        out = []
        for shape, dtype, device in like:
            t = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(t, group_src=peer, group=group)
            out.append(t)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):  # unused outputs come as zeros (materialized grads), so the peer always gets all
        for g in grads:
            dist.send(g.contiguous(), group_dst=ctx.peer, group=ctx.group)
        return None, None, None, None


class _ZeroGrads(torch.autograd.Function):
    """x unchanged; backward also gives each of `params` a zero gradient. Whether a rank uses a memory's small
    parameters depends on its place: ranks after the first never use the initial memory (they receive a state),
    and on the last rank the gates of a memory read at chunk start may only feed the discarded final state.
    FSDP2 reduce-scatters only the parameters that have a gradient, so without this the ranks' reduce-scatters
    differ in size and mismatch (and DDP would need find_unused_parameters)."""

    @staticmethod
    def forward(ctx, x, *params):
        ctx.like = [(p.shape, p.dtype, p.device) for p in params]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.like)


def send_state(tree: Tree, dst: int, group=None) -> torch.Tensor | None:
    """Send a state (nested dict of tensors) to group rank `dst`. When it needs gradients, returns a token
    to tie into this rank's output with `tie` (its backward then waits for dst's cotangents)."""
    flat = {k: v for k, v in _flatten(tree).items() if v is not None}
    tensors = list(flat.values())
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    meta = [(key, tuple(t.shape), t.dtype, needs_grad) for key, t in flat.items()]
    dist.send_object_list([meta], group_dst=dst, group=group)
    if needs_grad:
        return _SendState.apply(dst, group, *tensors)
    for t in tensors:
        dist.send(t.detach().contiguous(), group_dst=dst, group=group)
    return None


def recv_state(src: int, device: torch.device, group=None) -> Tree:
    """Receive what `send_state` sent from group rank `src`; differentiable when the sender's state was."""
    box = [None]
    dist.recv_object_list(box, group_src=src, group=group)
    meta = box[0]
    like = [(shape, dtype, device) for _, shape, dtype, _ in meta]
    if meta and meta[0][3]:
        anchor = torch.zeros((), device=device, requires_grad=True)
        tensors = _RecvState.apply(anchor, src, group, like)
    else:
        tensors = []
        for shape, dtype, dev in like:
            t = torch.empty(shape, dtype=dtype, device=dev)
            dist.recv(t, group_src=src, group=group)
            tensors.append(t)
    return _unflatten({key: t for (key, *_), t in zip(meta, tensors, strict=True)})


def tie(y: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
    """y, with `send_state`'s token attached so that backward through y also passes the sent state's cotangent.
    The token is a zero scalar: adding it changes no value."""
    return y if token is None else y + token.to(y.dtype)


def shard(x: torch.Tensor, group=None, dim: int = 1, multiple: int = 1) -> torch.Tensor:
    """This rank's contiguous slice of x along `dim` (time); shards are equal and multiples of `multiple`."""
    rank, size = _rank_size(group)
    T = x.shape[dim]
    if T % (size * multiple):
        raise ValueError(f"length {T} does not split into {size} shards that are multiples of {multiple}: "
                         f"use a length that is a multiple of {size * multiple}")
    n = T // size
    return x.narrow(dim, rank * n, n)


def gather(x: torch.Tensor, group=None, dim: int = 1) -> torch.Tensor:
    """The whole sequence from equal shards (differentiable: each rank gets the gradient of its shard)."""
    if dist.get_world_size(group) == 1:
        return x
    return torch.cat(dist_fn.all_gather(x.contiguous(), group=group), dim=dim)


def _check_multiple(T: int, multiple: int, rank: int, size: int, what: str) -> None:
    if rank < size - 1 and T % multiple:
        raise ValueError(f"rank {rank}: shard of {T} tokens is not a multiple of {multiple} ({what}); the next shard "
                         "would start mid-chunk and compute a different function")


def affine_state(rule) -> bool:
    """Whether a shard's final state is an affine map W ↦ W P + Q of its initial state: a compiled rule whose
    state update is linear in the state (algorithm `linear` or `wy`, which stay linear when anchored at a
    chunk start) with one square matrix memory and scalar gates only (a per-channel gate would scale rows)."""
    spec = getattr(rule, "spec", None)
    if spec is None or spec["algorithm"] not in ("linear", "wy") or list(spec["params"]) != ["W"]:
        return False
    return (spec["params"]["W"]["shape_rank"] == [0, 0] and spec["projection"] is None
            and not any(g["channels"] for g in spec["gates"].values())
            and all(r.get("rate") is None for r in spec["retain"]))  # an l2 pull toward init carries init.W


def _compose_prefix(maps: torch.Tensor) -> torch.Tensor:
    """Inclusive scan of affine maps by Hillis–Steele doubling: maps [P, ..., Dk + Dv, Dk] holds (P; Q) of each
    rank, the result at r is map_0 then … then map_r, in ⌈log₂ P⌉ batched compositions."""
    dk = maps.shape[-1]
    d = 1
    while d < maps.shape[0]:
        first, then = maps[:-d], maps[d:]  # compose first (rank r − d's prefix) then (rank r's)
        composed = first @ then[..., :dk, :] + torch.cat([torch.zeros_like(then[..., :dk, :]), then[..., dk:, :]],
                                                        dim=-2)
        maps = torch.cat([maps[:d], composed])
        d *= 2
    return maps


def _scan_start_state(rule, q, k, v, gates, params, state, group, kw) -> tuple[Tree | None, torch.Tensor | None,
                                                                                tuple | None]:
    """The state this rank's shard starts from, by the associative scan; and (rank 0) its already computed
    output. Returns (start state, token to tie into the output, (y, final) when this rank's run is done)."""
    rank, size = _rank_size(group)
    if rank == 0:  # the constant map to rank 0's final state
        y, final = rule(q, k, v, gates, params, state, **kw)
        W = final["A.W"]
        mine = torch.cat([torch.zeros(*W.shape[:-2], W.shape[-1], W.shape[-1], dtype=W.dtype, device=W.device), W],
                         dim=-2)
        done = (y, final)
    else:  # one batched run from W = I and W = 0 gives P + Q and Q
        B = q.shape[0]
        like = rule.init_state(B, q.shape[2], k.shape[-1], params=params)["A.W"]
        if like.shape[-1] != like.shape[-2]:
            raise ValueError(f"method='scan' needs a square matrix memory, got {tuple(like.shape[-2:])}")
        eye = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device).expand_as(like)
        two = {"A.W": torch.cat([eye, torch.zeros_like(like)])}
        twice = [torch.cat([x, x]) for x in (q, k, v)]
        _, fin = rule(*twice, {n: torch.cat([g, g]) for n, g in (gates or {}).items()}, params, two, **kw)
        mine = torch.cat([fin["A.W"][:B] - fin["A.W"][B:], fin["A.W"][B:]], dim=-2)
        done = None
    token = None
    if torch.is_grad_enabled():  # every rank must hold the all-gather in its graph: backward is collective
        anchor = torch.zeros((), dtype=mine.dtype, device=mine.device, requires_grad=True)
        mine = mine + anchor
    maps = dist_fn.all_gather(mine, group=group)
    if torch.is_grad_enabled():
        token = sum(m.sum() for m in maps) * 0
    if rank == 0:
        return None, token, done
    start = _compose_prefix(torch.stack(maps[:rank]))[-1][..., mine.shape[-1]:, :]
    return {"A.W": start}, token, None


def context_parallel(rule_or_fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: dict | None = None,
                     params: dict | None = None, state: Tree | None = None, group=None, method: str = "sequential",
                     **kw) -> tuple[torch.Tensor, Tree | None]:
    """Run a compiled rule (or any `fn(q, k, v, gates, params, state, **kw) -> (y, state)`) on this rank's shard.

    `state` is the initial state and is used on rank 0 only (the others receive theirs). Returns this
    rank's output [B, T_shard, H, Dv] and, on the last rank, the final state (None elsewhere). `method`:
    "sequential" (rank r waits for r − 1's final state) or "scan" (the associative scan over ranks, for rules
    with `affine_state`; see the module docstring)."""
    rank, size = _rank_size(group)
    if size == 1:
        return rule_or_fn(q, k, v, gates, params, state, **kw)
    if hasattr(rule_or_fn, "spec"):  # a compiled rule: its chunk fixes the shard granularity
        _check_multiple(q.shape[1], int(kw.get("chunk") or rule_or_fn.chunk), rank, size, "the chunk")
    if method == "scan":
        if not affine_state(rule_or_fn):
            raise ValueError("method='scan' needs a rule whose state map is affine (see affine_state); "
                             "use method='sequential'")
        start, token, done = _scan_start_state(rule_or_fn, q, k, v, gates, params, state, group, kw)
        y, final = done if done is not None else rule_or_fn(q, k, v, gates, params, start, **kw)
        return tie(y, token), final if rank == size - 1 else None
    if method != "sequential":
        raise ValueError(f"method must be 'sequential' or 'scan', got {method!r}")
    if rank > 0:
        state = recv_state(rank - 1, q.device, group)
    y, final = rule_or_fn(q, k, v, gates, params, state, **kw)
    if rank == size - 1:
        return y, final
    return tie(y, send_state(final, rank + 1, group)), None


def tnt_context_parallel(global_rule, local_rules, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         gates: dict, params: dict, schedule: TNTSchedule, state: Tree | None = None, group=None,
                         backend: str = "auto", method: str = "sequential") -> tuple[torch.Tensor, Tree | None]:
    """`tnt_forward` on this rank's shard: the locals first (they need nothing from other ranks), then the
    global memory from the state of the previous rank (`method="sequential"`) or by the associative scan over
    ranks (`"scan"`, for a global rule with `affine_state`). Returns (y shard, final global state on the last
    rank)."""
    rank, size = _rank_size(group)
    _check_multiple(q.shape[1], segment_multiple(schedule), rank, size, "C_G and every S_L")
    y_local = tnt_locals(local_rules, q, k, v, gates, params, schedule, backend)
    y, final = context_parallel(global_rule, q, k, v, _gates_for(global_rule, gates, "global"),
                                _params_for(global_rule, params, "global"), state, group, method=method,
                                chunk=schedule.global_chunk, backend=backend, read_order="chunk_start")
    return y + y_local, final


def segment_multiple(layer_or_schedule: MemoryLayer | TNTSchedule | nn.Module) -> int:
    """The granularity a shard must have: the chunk of a layer, lcm(C_G, every S_L) for TNT, the lcm over a model."""
    if isinstance(layer_or_schedule, TNTSchedule):
        return math.lcm(layer_or_schedule.global_chunk, *(s for _, s in layer_or_schedule.locals))
    if isinstance(layer_or_schedule, MemoryLayer):
        layer = layer_or_schedule
        return segment_multiple(layer.tnt) if layer.tnt is not None else int(layer.chunk or layer.rule.chunk)
    return math.lcm(1, *(segment_multiple(m) for m in layer_or_schedule.modules() if isinstance(m, MemoryLayer)))


def _layer_pre(layer: MemoryLayer, args, kwargs, group):
    rank, size = _rank_size(group)
    if size == 1:
        return None
    if kwargs.get("past_key_values") is not None or kwargs.get("use_cache"):
        raise ValueError("a context-parallel MemoryLayer does not decode with a cache")
    x = args[0] if args else kwargs["hidden_states"]
    _check_multiple(x.shape[1], segment_multiple(layer), rank, size, f"layer {layer.layer_idx}")
    carry = recv_state(rank - 1, x.device, group) if rank > 0 else None
    if torch.is_grad_enabled():
        x = _ZeroGrads.apply(x, *layer.memories.parameters(), *layer.gate_proj.parameters())
        args, kwargs = ((x, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": x})
    kwargs = {**kwargs, "past_key_values": None if carry is None else {layer.layer_idx: carry}, "use_cache": True,
              "tnt_segments": layer.tnt is not None}
    return args, kwargs


def _layer_post(layer: MemoryLayer, args, kwargs, output, group):
    rank, size = _rank_size(group)
    if size == 1:
        return None
    out, attn, cache = output
    if rank < size - 1:
        out = tie(out, send_state(cache[layer.layer_idx], rank + 1, group))
    return out, attn, None


def enable_context_parallel(model: nn.Module, group=None) -> list:
    """Make every `MemoryLayer` in `model` context-parallel over `group`: feed it this rank's time shard
    and it receives the conv tail and memory state of the previous rank's shard and sends its own on.
    The rest of a model (embeddings, MLPs, norms) is per token and needs nothing. Returns the hook
    handles (`h.remove()` undoes it)."""
    layers = [m for m in model.modules() if isinstance(m, MemoryLayer)]
    if not layers:
        raise ValueError("the model has no MemoryLayer")
    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(partial(_layer_pre, group=group), with_kwargs=True))
        handles.append(layer.register_forward_hook(partial(_layer_post, group=group), with_kwargs=True))
    return handles


def shard_batch(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """This rank's part of a global batch [B, T, ...]: its data slice of B, then its context slice of T."""
    data, context = mesh.get_group("data"), mesh.get_group("context")
    return shard(shard(x, data, dim=0), context, dim=1)


def make_mesh(context: int, device_type: str = "cpu") -> DeviceMesh:
    """A 2-D (data, context) mesh over all ranks; context-parallel groups are `mesh.get_group("context")`."""
    world = dist.get_world_size()
    if world % context:
        raise ValueError(f"world size {world} is not a multiple of the context size {context}")
    return init_device_mesh(device_type, (world // context, context), mesh_dim_names=("data", "context"))


def data_parallel(model: nn.Module, mode: str = "ddp", device_type: str = "cpu") -> nn.Module:
    """DDP or FSDP2 over all ranks (gradients averaged over data × context, see the module docstring)."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
        for layer in [m for m in model.modules() if isinstance(m, MemoryLayer)]:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    raise ValueError(f"mode must be 'ddp' or 'fsdp', got {mode!r}")
