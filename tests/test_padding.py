"""MemoryLayer with attention masks: a padded batch gives every row what it gets alone, unpadded."""

from __future__ import annotations

import pytest
import torch

from memdsl.nn import MemoryLayer
from memdsl.padding import Aligned, conv_input
from memdsl.tnt import TNTSchedule
from tests.helpers import autograd_node_names

# (rule, chunk): a dual-form rule (tile programs for CPU training), a WY rule and a windowed Muon rule
LAYERS = [("titans", 4), ("gated_deltanet", 4), ("atlas", 4)]


def _layer(name: str, chunk: int, dtype=torch.float64) -> MemoryLayer:
    torch.manual_seed(0)
    return MemoryLayer(f"rules/{name}.mem", d_model=16, n_heads=2, chunk=chunk).to(dtype)


def _batch(lengths: list[int], T: int, side: str, dtype=torch.float64):
    """Rows of random tokens with the given lengths, padded on `side` with junk (never zeros: padding must
    not matter whatever it holds); the mask; each row's tokens alone."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(lengths), T, 16, generator=g, dtype=dtype) * 3
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "left":
            mask[b, T - n:] = 1
        else:
            mask[b, :n] = 1
    alone = [x[b, mask[b].bool()].unsqueeze(0) for b in range(len(lengths))]
    return x, mask, alone


@pytest.mark.parametrize("name,chunk", LAYERS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_rows_alone(name, chunk, side):
    layer = _layer(name, chunk)
    x, mask, alone = _batch([7, 3, 9, 0, 9, 7], 9, side)  # equal lengths run as one batch (run_packed)
    out, _, _ = layer(x, attention_mask=mask)  # tokens first, one call
    if layer.rule.spec["window"] == 1:  # (a window's cache needs rows of 3 tokens: the test below)
        packed, _, _ = layer(x, attention_mask=mask, use_cache=True)  # tokens last, packed sequences
        assert (out - packed).abs().max().item() < 1e-12
    for b, xb in enumerate(alone):
        got = out[b, mask[b].bool()]
        if xb.shape[1]:
            want, _, _ = layer(xb)
            assert (got - want[0]).abs().max().item() < 1e-12
        assert out[b, ~mask[b].bool()].abs().max().item() == 0 if (~mask[b].bool()).any() else True


@pytest.mark.parametrize("name,chunk", LAYERS)
def test_left_padded_prompt_then_decoding_equals_rows_alone(name, chunk):
    """Prompt of different lengths (left padding, as batched generation pads), then three steps; the
    mask grows by one column per step, as generate() passes it. Each row alone: its prompt, the same steps."""
    layer = _layer(name, chunk)
    x, mask, alone = _batch([6, 3, 5], 6, "left")  # atlas's window carries 3 tokens: every row has them
    steps = torch.randn(3, 3, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out, _, cache = layer(x, attention_mask=mask, use_cache=True)
    outs = []
    for t in range(3):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        o, _, cache = layer(steps[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
        outs.append(o)
    for b, xb in enumerate(alone):
        first, _, own = layer(xb, use_cache=True)
        assert (out[b, -xb.shape[1]:] - first[0]).abs().max().item() < 1e-12
        for t in range(3):
            o, _, own = layer(steps[b:b + 1, t:t + 1], past_key_values=own, use_cache=True)
            assert (outs[t][b] - o[0]).abs().max().item() < 1e-12


def test_a_windowed_rule_refuses_a_cache_it_cannot_carry():
    layer = _layer("atlas", 4)
    x, mask, _ = _batch([6, 2], 6, "left")
    layer(x, attention_mask=mask)  # without a cache: fine
    with pytest.raises(ValueError, match="carries the last 3 tokens of each row"):
        layer(x, attention_mask=mask, use_cache=True)


def test_a_finished_row_keeps_its_cache():
    """A row masked out at a decoding step (it has stopped while others go on) keeps its state and conv cache."""
    layer = _layer("titans", 1)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    _, _, cache = layer(x, use_cache=True)
    before = {n: s.clone() for n, s in cache[0]["state"].items()}
    conv = {n: c.clone() for n, c in cache[0]["conv"].items()}
    step = torch.randn(2, 1, 16, dtype=torch.float64)
    out, _, cache = layer(step, attention_mask=torch.tensor([[1] * 5 + [1], [1] * 5 + [0]]), past_key_values=cache,
                          use_cache=True)
    assert out[1].abs().max().item() == 0
    for n, s in cache[0]["state"].items():
        assert torch.equal(s[1], before[n][1]) and not torch.equal(s[0], before[n][0])
    for n, c in cache[0]["conv"].items():
        assert torch.equal(c[1], conv[n][1]) and not torch.equal(c[0], conv[n][0])


def test_padded_training_gradients_equal_rows_alone():
    """fp32, the tile programs' path (CPU training): the loss over real tokens of a padded batch has the
    gradient of the sum of the rows' losses alone."""
    layer = _layer("titans", 4, torch.float32)
    x, mask, alone = _batch([8, 5], 8, "right", torch.float32)
    out, _, _ = layer(x, attention_mask=mask)
    out.pow(2).sum().backward()
    padded = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    sum(layer(xb)[0].pow(2).sum() for xb in alone).backward()
    for n, p in layer.named_parameters():
        scale = p.grad.abs().max().item() + 1e-12
        assert (padded[n] - p.grad).abs().max().item() / scale < 1e-4, n


def test_all_ones_mask_is_the_unmasked_path():
    layer = _layer("titans", 4)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    assert torch.equal(layer(x, attention_mask=torch.ones(2, 6))[0], layer(x)[0])


def test_bad_masks_and_tnt_are_refused():
    layer = _layer("deltanet", 4)
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"attention_mask: expected \[B, S\]"):
        layer(x, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="0 \\(padding\\) and 1"):
        layer(x, attention_mask=torch.full((2, 4), 2))
    tnt = MemoryLayer("rules/titans_linear.mem", d_model=16, n_heads=2, tnt=TNTSchedule(8, ((4, 4),)))
    with pytest.raises(ValueError, match="TNT layers take unpadded"):
        tnt(torch.randn(1, 8, 16), attention_mask=torch.tensor([[0] * 2 + [1] * 6]))


def test_right_aligned_layout_and_conv_input():
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]).bool()
    ra = Aligned(mask)
    x = torch.arange(12.).view(3, 4, 1)
    assert ra.align(x)[:, :, 0].tolist() == [[1, 0, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert torch.equal(ra.restore(ra.align(x)), x)
    assert ra.cu_seqlens().tolist() == [0, 3, 3, 7]
    assert ra.pack(ra.align(x))[0, :, 0].tolist() == [0, 2, 3, 8, 9, 10, 11]
    assert torch.equal(ra.unpack(ra.pack(ra.align(x))), ra.align(x) * ra.mask[..., None])
    cache = -torch.ones(3, 2, 1)  # each row's cache lands right before its tokens
    full = conv_input(ra.align(x), cache, ra.lengths)[:, :, 0]
    assert full[0].tolist() == [0, -1, -1, 0, 2, 3]
    assert full[1].tolist() == [0, 0, 4, 5, -1, -1]
    assert full[2].tolist() == [-1, -1, 8, 9, 10, 11]


def test_layer_trains_through_the_tile_programs_on_cpu():
    """The layer's rule call goes through the compiled rule's dispatch (here: the tile programs for CPU
    training, one autograd node for the sequence) and equals the layer on the torch chunk program."""
    layer = _layer("titans", 4, torch.float32)
    x = torch.randn(2, 10, 16)
    y, _, _ = layer(x)
    assert "TritonChunkBackward" in autograd_node_names(y)
    layer.backend = "chunk"
    y_ref, _, _ = layer(x)
    assert (y - y_ref).abs().max().item() < 1e-5


def test_tokens_first_layout():
    mask = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0]]).bool()
    al = Aligned(mask, tokens_first=True)
    x = torch.arange(8.).view(2, 4, 1)
    assert al.align(x)[:, :, 0].tolist() == [[1, 3, 0, 2], [4, 5, 6, 7]]
    assert al.mask.tolist() == [[True, True, False, False], [True, True, False, False]]
    assert torch.equal(al.restore(al.align(x)), x)


def test_tiny_lm_batched_generation_equals_each_prompt_alone():
    """Prompts of different lengths in one batch (left padding, the mask growing each step, every layer's
    cache): each row's greedy continuation is the one it gets alone."""
    from memdsl.models import TinyLM
    torch.manual_seed(0)
    model = TinyLM("rules/titans.mem", d_model=16, layers=2, heads=2, chunk=4).double()
    prompts = [b"ROMEO: But soft", b"To be", b"O Romeo, Romeo! wherefore art thou"]
    together = model.generate(prompts, 12)
    assert [len(t) for t in together] == [12, 12, 12]
    assert together == [model.generate([p], 12)[0] for p in prompts]
    with pytest.raises(ValueError, match="at least one byte"):
        model.generate([b"x", b""], 3)
