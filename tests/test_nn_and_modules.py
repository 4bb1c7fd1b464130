"""Decoding and packaging: step() == exact loop; MemoryLayer with cache == without; the generated
standalone module == the in-process compile."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs, rel_rms
from memdsl.nn import MemoryLayer
from tests.conftest import RULE_IDS, RULES


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_step_decoding_equals_exact_loop(path):
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=7, D=3)
    y_ref, s_ref = rule(tok["q"], tok["k"], tok["v"], gates, params, backend="loop")
    state, ys = None, []
    for t in range(7):
        y_t, state = rule.step(tok["q"][:, t], tok["k"][:, t], tok["v"][:, t],
                               {n: g[:, t] for n, g in gates.items()}, state, params)
        ys.append(y_t)
    assert rel_rms(torch.stack(ys, 1), y_ref) < 1e-12
    for key in s_ref:
        assert rel_rms(state[key], s_ref[key]) < 1e-12


@pytest.mark.parametrize("name", ["omeganet", "titans"])
def test_state_carries_across_calls_on_chunk_boundaries(name):
    rule = memdsl.compile(f"rules/{name}.mem")
    tok, gates, params = make_inputs(rule, T=12, D=3)
    y, _ = rule(tok["q"], tok["k"], tok["v"], gates, params, chunk=4)
    part = [slice(0, 4), slice(4, 12)]
    state, ys = None, []
    for sl in part:
        y_p, state = rule(tok["q"][:, sl], tok["k"][:, sl], tok["v"][:, sl], {n: g[:, sl] for n, g in gates.items()},
                          params, state, chunk=4)
        ys.append(y_p)
    assert rel_rms(torch.cat(ys, 1), y) < 1e-12


@pytest.mark.parametrize("name", ["titans", "ttt_linear", "gated_deltanet", "moneta", "atlas"])
def test_memory_layer_cache_equals_full_sequence(name):
    torch.manual_seed(0)
    layer = MemoryLayer(f"rules/{name}.mem", d_model=16, n_heads=2, chunk=4).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    full, _, _ = layer(x)
    a, _, cache = layer(x[:, :8], use_cache=True)
    b, _, cache = layer(x[:, 8:], past_key_values=cache, use_cache=True)
    assert (torch.cat([a, b], 1) - full).abs().max().item() < 1e-12


def test_memory_layer_token_by_token_decoding_at_chunk_1():
    torch.manual_seed(0)
    layer = MemoryLayer("rules/titans.mem", d_model=16, n_heads=2, chunk=1).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    full, _, _ = layer(x)
    cache, outs = None, []
    for t in range(6):
        o, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
        outs.append(o)
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-12


def test_memory_layer_trains():
    torch.manual_seed(0)
    layer = MemoryLayer("rules/titans.mem", d_model=16, n_heads=2)
    x = torch.randn(2, 20, 16)
    out, _, _ = layer(x)
    out.pow(2).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert layer.memory.init_memory["W1"].grad.abs().sum() > 0


@pytest.mark.parametrize("path", RULES, ids=RULE_IDS)
def test_generated_module_equals_in_process(path, tmp_path):
    out = tmp_path / f"{path.stem}_mem.py"
    res = subprocess.run([sys.executable, "-m", "memdsl.cli", "compile", str(path), "-o", str(out)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    spec = importlib.util.spec_from_file_location(f"gen_{path.stem}", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    imports = [line for line in out.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert imports == ["import math", "import torch"]  # standalone: torch only
    rule = memdsl.compile(str(path))
    tok, gates, params = make_inputs(rule, T=9, D=3)
    y_gen, s_gen = mod.memory(tok["q"], tok["k"], tok["v"], gates, params)
    y_in, s_in = rule(tok["q"], tok["k"], tok["v"], gates, params)
    assert torch.equal(y_gen, y_in)
    assert all(torch.equal(s_gen[k], s_in[k]) for k in s_in)
    layer = mod.Memory(n_heads=2, d=3)
    y_mod, _ = layer(tok["q"].float(), tok["k"].float(), tok["v"].float(), {n: g.float() for n, g in gates.items()})
    assert y_mod.shape == y_in.shape


def test_memory_layer_deep_copies():
    """copy.deepcopy of a model (EMA, torch.optim.swa_utils.AveragedModel) copies parameters and shares the
    compiled rule (it held a module object, which deepcopy cannot copy)."""
    import copy
    torch.manual_seed(0)
    layer = MemoryLayer("rules/titans.mem", d_model=16, n_heads=2)
    twin = copy.deepcopy(layer)
    assert twin.rule is layer.rule
    assert twin.memory.init_memory["W1"] is not layer.memory.init_memory["W1"]
    x = torch.randn(1, 5, 16)
    assert torch.equal(twin(x)[0], layer(x)[0])
    with torch.no_grad():
        twin.memory.init_memory["W1"].add_(1.0)
    assert not torch.equal(twin(x)[0], layer(x)[0])
    hydra = memdsl.compile("rules/hydra.mem").module_class()(2, 4)
    assert copy.deepcopy(hydra).rule is hydra.rule


@pytest.mark.parametrize("backend", ["auto", "chunk"])
def test_memory_layer_trains_under_autocast(backend):
    """Mixed precision: under torch.autocast a bf16 matmul once fed the programs' fp32 in-place state updates
    (RuntimeError, forward on both paths and the tile programs' backward). The rule now runs without autocast
    in its inputs' dtype (the bf16 projections'), forward and backward."""
    torch.manual_seed(0)
    layer = MemoryLayer("rules/titans.mem", d_model=32, n_heads=2, chunk=8, backend=backend)
    x = torch.randn(2, 24, 32)
    want, _, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _, _ = layer(x)
        y.float().square().mean().backward()
    assert y.dtype == torch.bfloat16
    assert rel_rms(y.float(), want) < 5e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_memory_layer_refuses_a_2d_rule():
    with pytest.raises(ValueError, match="hydra runs over time × variate grids"):
        MemoryLayer("rules/hydra.mem", d_model=16, n_heads=2)


def test_memory_layer_input_checks():
    layer = MemoryLayer("rules/titans.mem", d_model=16, n_heads=2)
    for bad in (torch.randn(5, 16), torch.randn(1, 5, 12), torch.zeros(1, 5, 16, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"hidden_states: expected a floating \[B, T, d_model=16\]"):
            layer(bad)
    out, _, cache = layer(torch.randn(2, 0, 16), past_key_values={"x": 1})
    assert out.shape == (2, 0, 16) and cache == {"x": 1}
