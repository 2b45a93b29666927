"""The decoders' KV engine computes the model's forward: chunked passes over a static cache, per-row slots (KV
rollback), GQA, MM-RoPE positions; its weight copies follow parameter updates."""

import pytest
import torch

from unitok.decoding.engine import KVEngine
from unitok.decoding.verify import tiny_model
from unitok.model.heads import VisualVocab
from unitok.model.modes import NextBlockMode, TokenGrid

P = 3


@pytest.fixture(scope="module")
def model():
    return tiny_model(16, seed=0, init=0.5)


@pytest.fixture(scope="module")
def layout():
    return NextBlockMode().layout(TokenGrid(1, 4, 5), P)


def _reference(model, layout, x):
    rows = x.shape[0]
    positions = layout.positions[:, None].expand(3, rows, -1)
    mask = layout.mask[None, None].expand(rows, 1, -1, -1)
    with torch.no_grad():
        return model.model(inputs_embeds=x, position_ids=positions, attention_mask=mask).last_hidden_state


def test_chunked_passes_equal_the_full_forward(model, layout):
    x = torch.randn(2, layout.length, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    engine = KVEngine(model, rows=2, capacity=layout.length, positions=layout.positions)
    out, begin = [], 0
    for end in (P + 5, P + 10, layout.length):
        mask = layout.mask[begin:end, :end][None]
        out.append(engine.forward(x[:, begin:end], slice(begin, end), (begin, end), mask, end - begin))
        begin = end
    assert torch.allclose(torch.cat(out, 1), _reference(model, layout, x), atol=1e-5)


def test_per_row_slots_overwrite_rejected_keys(model, layout):
    """Row 0 writes garbage into slots it later rewrites (SJD's rollback); the result equals a clean forward."""
    hidden = model.config.hidden_size
    x = torch.randn(2, layout.length, hidden, generator=torch.Generator().manual_seed(1))
    engine = KVEngine(model, rows=2, capacity=layout.length, positions=layout.positions)
    causal = torch.ones(layout.length, layout.length, dtype=torch.bool).tril()
    prefix = P + 4
    engine.forward(x[:, :prefix], slice(0, prefix), (0, prefix), causal[:prefix, :prefix][None], 1)
    slots = torch.tensor([[prefix, prefix + 1], [prefix, prefix + 1]])
    noise = torch.randn(2, 2, hidden)
    mask = torch.arange(prefix + 2) <= slots[..., None]
    engine.forward(noise, slots, slots, mask, 2)  # drafts that get rejected
    rest = torch.arange(prefix, layout.length)[None].expand(2, -1)
    mask = torch.arange(layout.length) <= rest[..., None]
    got = engine.forward(x[:, prefix:], rest, rest, mask, layout.length - prefix)
    want = _reference_causal(model, layout, x)[:, prefix:]
    assert torch.allclose(got, want, atol=1e-5)


def _reference_causal(model, layout, x):
    rows = x.shape[0]
    positions = layout.positions[:, None].expand(3, rows, -1)
    mask = torch.ones(layout.length, layout.length, dtype=torch.bool).tril()[None, None].expand(rows, 1, -1, -1)
    with torch.no_grad():
        return model.model(inputs_embeds=x, position_ids=positions, attention_mask=mask).last_hidden_state


def test_visual_scores_are_the_visual_slice_of_the_logits(model, layout):
    visual = VisualVocab(offset=10, size=16, boi_id=4)
    x = torch.randn(1, P + 2, model.config.hidden_size)
    engine = KVEngine(model, rows=1, capacity=layout.length, positions=layout.positions)
    mask = torch.ones(P + 2, P + 2, dtype=torch.bool).tril()[None]
    scores = engine.scores(visual, x, slice(0, P + 2), (0, P + 2), mask, 2)
    with torch.no_grad():
        logits = model(
            inputs_embeds=x, position_ids=layout.positions[:, None, : P + 2], attention_mask=mask[:, None]
        ).logits
    assert torch.allclose(scores, logits[:, -2:, 10:26], atol=1e-5)


def test_guided_scores_equal_guided_logits(model, layout):
    """The engine guides hidden states before the (linear) head; that must equal CFG on the logits."""
    visual = VisualVocab(offset=10, size=16, boi_id=4)
    x = torch.randn(2, P + 2, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(P + 2, P + 2, dtype=torch.bool).tril()[None]
    args = (x, slice(0, P + 2), (0, P + 2), mask, 2)
    plain = KVEngine(model, rows=2, capacity=layout.length, positions=layout.positions).scores(visual, *args)
    for scale in (3.0, torch.tensor([[[1.5], [4.0]]])):
        engine = KVEngine(model, rows=2, capacity=layout.length, positions=layout.positions)
        guided = engine.scores(visual, *args, guidance=scale)
        assert guided.shape == (1, 2, 16)
        assert torch.allclose(guided, plain[1] + scale * (plain[0] - plain[1]), atol=1e-5)


def test_weight_copies_follow_parameter_updates(model, layout):
    x = torch.randn(1, P, model.config.hidden_size)
    mask = torch.ones(P, P, dtype=torch.bool).tril()[None]
    before = KVEngine(model, rows=1, capacity=P, positions=layout.positions).forward(x, slice(0, P), (0, P), mask, 1)
    layer = model.model.layers[0].mlp.down_proj
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.mul_(2.0)
        after = KVEngine(model, rows=1, capacity=P, positions=layout.positions).forward(x, slice(0, P), (0, P), mask, 1)
        assert not torch.allclose(before, after)
        with torch.no_grad():
            ref = model.model(inputs_embeds=x, position_ids=layout.positions[:, None, :P]).last_hidden_state[:, -1:]
        assert torch.allclose(after, ref, atol=1e-5)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)


def test_bad_shapes_raise(model, layout):
    engine = KVEngine(model, rows=2, capacity=P + 1, positions=layout.positions)
    with pytest.raises(ValueError, match="2 rows x 4 slots"):
        engine.forward(torch.zeros(3, 1, model.config.hidden_size), slice(0, 1), (0, 1), torch.ones(1, 1, 1).bool(), 1)
    with pytest.raises(ValueError, match="2 rows x 4 slots"):
        engine.forward(torch.zeros(2, 1, model.config.hidden_size), slice(0, 1), (0, 1), torch.ones(1, 1, 9).bool(), 1)
    with pytest.raises(ValueError, match="rows and capacity"):
        KVEngine(model, rows=0, capacity=4, positions=layout.positions)
