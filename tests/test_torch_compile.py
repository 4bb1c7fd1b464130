"""torch.compile around memdsl: a compiled rule is one graph break (it runs its own generated programs
eagerly), so a model holding a MemoryLayer compiles in seconds and computes what it computes eagerly."""

from __future__ import annotations

import pytest
import torch

import memdsl
from memdsl.checking import make_inputs
from memdsl.nn import MemoryLayer


@pytest.mark.slow
def test_compiled_memory_layer_equals_eager():
    torch.manual_seed(0)
    layer = MemoryLayer("rules/titans.mem", d_model=16, n_heads=2, chunk=4)
    x = torch.randn(2, 10, 16)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    y, _, _ = torch.compile(layer)(x, attention_mask=mask)
    (y * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    compiled = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    y_eager, _, _ = layer(x, attention_mask=mask)
    (y_eager * torch.arange(y.numel()).view_as(y).sin()).sum().backward()
    assert (y - y_eager).abs().max().item() < 1e-5
    for n, p in layer.named_parameters():
        assert (compiled[n] - p.grad).abs().max().item() <= 1e-5 * (1 + p.grad.abs().max().item()), n


def test_rule_calls_inside_compiled_functions():
    """1-D and 2-D rules called from a compiled function (dynamo only: backend='eager'). Their generated
    modules are registered in sys.modules, so even code traced into them finds its globals."""
    rule = memdsl.compile("rules/gated_deltanet.mem", chunk=4)
    tok, gates, params = make_inputs(rule, B=1, T=9, H=2, D=8, dtype=torch.float32)

    def mix(q, k, v, g):
        return rule(q * 1.0, k, v, g, params)[0].sin()
    got = torch.compile(mix, backend="eager")(tok["q"], tok["k"], tok["v"], gates)
    assert torch.equal(got, mix(tok["q"], tok["k"], tok["v"], gates))
    hydra = memdsl.compile("rules/hydra.mem")
    q, k, v = (torch.nn.functional.normalize(torch.randn(1, 8, 3, 2, 4), dim=-1) for _ in range(3))
    g2 = {n: torch.rand(1, 8, 3, 2) * 0.3 + 0.05 for n in hydra.spec1d["gates"]}

    def mix2(q, k, v):
        return hydra(q, k, v, g2)[0].cos()
    assert torch.equal(torch.compile(mix2, backend="eager")(q, k, v), mix2(q, k, v))
    assert memdsl.api.sys.modules[rule.module.__name__] is rule.module
