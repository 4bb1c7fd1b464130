"""TNT: the lowered hierarchy (shards folded on the batch axis, chunked Q-K projection) equals the
token-by-token reference of the same hierarchy, forward and gradients, at several (C_G, C_L, S_L)."""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, rel_rms
from memdsl.nn import MemoryLayer
from memdsl.tnt import TNTSchedule, finetune_schedule, qk_project, qk_project_reference, tnt_forward, tnt_reference


@pytest.mark.parametrize("reset, chunk, T", [(8, 2, 19), (16, 4, 37), (4, 4, 9)])
def test_chunked_qk_projection_equals_running_sum(reset, chunk, T):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, T, 3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    assert rel_rms(qk_project(q, k, reset, chunk), qk_project_reference(q, k, reset)) < 1e-12


SCHEDULES = [TNTSchedule(8, ((2, 8),)), TNTSchedule(16, ((4, 8), (2, 4))), TNTSchedule(4, ((1, 4),), False),
             TNTSchedule(16, ((2, 8), (4, 8)))]  # two locals with one reset share their projection


@pytest.mark.parametrize("name", ["titans", "ttt_linear", "memora"])
@pytest.mark.parametrize("schedule", SCHEDULES, ids=["G8-L2x8", "G16-L4x8-L2x4", "G4-L1x4-noqk", "G16-L2x8-L4x8"])
def test_tnt_lowering_equals_token_reference(name, schedule):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, T=21, D=3)
    # separate gates and initial memories for the local memories, shared ones for the rest
    gates = {**gates, **{f"local0.{n}": g.flip(1) for n, g in gates.items()}}
    params = {**params, **{f"local0.{n}": p * 0.5 for n, p in params.items()}}
    leaves = [{n: t.clone().requires_grad_() for n, t in d.items()} for d in (tok, gates, params)]
    twins = [{n: t.clone().requires_grad_() for n, t in d.items()} for d in (tok, gates, params)]
    locals_ = [rule] * len(schedule.locals)
    y = tnt_forward(rule, locals_, leaves[0]["q"], leaves[0]["k"], leaves[0]["v"], leaves[1], leaves[2], schedule)
    y_ref = tnt_reference(rule, locals_, twins[0]["q"], twins[0]["k"], twins[0]["v"], twins[1], twins[2], schedule)
    assert rel_rms(y, y_ref) < 1e-10
    ct = torch.randn_like(y)
    grads = torch.autograd.grad((y * ct).sum(), [t for d in leaves for t in d.values()], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * ct).sum(), [t for d in twins for t in d.values()], allow_unused=True)
    for g, r in zip(grads, grads_ref, strict=True):
        if r is not None and r.abs().sum() > 0:
            assert rel_rms(g, r) < 1e-10


TNT_RULE = (open("rules/titans.mem").read().split("schedule")[0]
            + "schedule {\n  global chunk 16\n  local chunk 4 reset 16\n  local chunk 2 reset 8\n}\n")


def test_schedule_block_makes_a_tnt_layer_and_stage_two_changes_only_chunks():
    torch.manual_seed(0)
    layer = MemoryLayer(TNT_RULE, d_model=16, n_heads=2)
    assert layer.tnt == TNTSchedule(16, ((4, 16), (2, 8)), True)
    x = torch.randn(2, 40, 16)
    before = layer(x)[0]
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert finetune_schedule(layer, [1, 1], freeze_others=True) == 1
    assert layer.tnt.locals == ((1, 16), (1, 8))
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())  # weights untouched
    after = layer(x)[0]
    assert rel_rms(after, before) > 1e-6  # a different chunk is a different function
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("memories.local", "gate_proj.local")) for n in trainable)
    after.pow(2).mean().backward()
    assert layer.memories["local0"].init_memory["W1"].grad is not None


def test_tnt_layer_refuses_a_decoding_cache():
    layer = MemoryLayer(TNT_RULE, d_model=8, n_heads=2)
    with pytest.raises(ValueError, match="TNT"):
        layer(torch.randn(1, 4, 8), use_cache=True)


@pytest.mark.parametrize("name", ["titans", "moneta", "atlas", "ttt_linear", "memora"])
@pytest.mark.parametrize("backend", ["chunk", "materialized"])
def test_chunk_start_read_equals_anchored_loop(name, backend):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, T=19, D=3)
    a, sa = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=8, backend="anchored_loop",
                 read_order="chunk_start")
    b, sb = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=8, backend=backend, read_order="chunk_start")
    assert rel_rms(b, a) < 1e-10 and all(rel_rms(sb[k], sa[k]) < 1e-10 for k in sa)


def _gates_seen(layer, x, monkeypatch):
    """The gates a layer hands to its memory (or to tnt_forward), recorded on the way."""
    import memdsl.nn as mnn

    seen = {}
    if layer.tnt is None:
        handle = layer.memories["main"].register_forward_pre_hook(lambda _m, args: seen.update(args[3]))
        y = layer(x)[0]
        handle.remove()
        return y, seen
    real = mnn.tnt_forward
    monkeypatch.setattr(mnn, "tnt_forward", lambda *a, **kw: (seen.update(a[5]), real(*a, **kw))[1])
    y = layer(x)[0]
    monkeypatch.setattr(mnn, "tnt_forward", real)
    return y, seen


@pytest.mark.parametrize("tnt", [None, TNTSchedule(8, ((4, 8),))], ids=["single", "tnt"])
def test_max_lr_reads_only_the_lr_gate_as_capped_sigmoid(tnt, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 8)
    layer = MemoryLayer("rules/titans.mem", d_model=8, n_heads=2, chunk=4, tnt=tnt)
    assert layer.lr_gate == "theta" and layer.max_lr is None
    y_off, off = _gates_seen(layer, x, monkeypatch)
    for key, lin in layer.gate_proj.items():  # off: every gate is its declared activation (all sigmoid here)
        memory, name = key.split("__")
        got = off[name if tnt is None else f"{memory}.{name}"]
        assert torch.equal(got, torch.sigmoid(lin(x)).view_as(got))
    layer.max_lr = 0.01
    y_on, on = _gates_seen(layer, x, monkeypatch)
    assert on.keys() == off.keys()
    for key in on:
        if key.split(".")[-1] == "theta":  # every memory of the hierarchy is capped
            assert torch.allclose(on[key], 0.01 * off[key], rtol=1e-6, atol=0)
        else:
            assert torch.equal(on[key], off[key])
    assert rel_rms(y_on, y_off) > 1e-4


def test_max_lr_names_the_lr_gate_or_refuses():
    from memdsl.nn import lr_gate_of

    assert lr_gate_of(memdsl.compile("rules/ttt_linear.mem")) == "eta"  # lr = eta / d
    assert lr_gate_of(memdsl.compile("rules/linear_attention.mem")) is None  # lr = 1
    with pytest.raises(ValueError, match="not a gate"):
        MemoryLayer("rules/titans.mem", d_model=8, n_heads=2, lr_gate="beta")
    layer = MemoryLayer("rules/linear_attention.mem", d_model=8, n_heads=2, max_lr=0.1)
    with pytest.raises(ValueError, match="lr_gate"):
        layer(torch.randn(1, 4, 8))
    capped = MemoryLayer("rules/titans.mem", d_model=8, n_heads=2, max_lr=0.1, lr_gate="alpha")
    assert capped.lr_gate == "alpha"
