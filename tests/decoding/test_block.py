"""The reference block decoder against a naive loop: re-run the full, uncached forward over the whole
teacher-forced sequence for every block and take the argmax of that block's slots."""

import pytest
import torch

from unitok.decoding.block import VisualVocab, decode_blocks
from unitok.decoding.cfg import guide
from unitok.decoding.sampling import SamplingConfig, sample
from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.modes import NextBlockMode, NextScaleMode, NextTokenMode, TokenGrid

P = 3  # prefix: BOS + a 2-token condition slot
TEXT, CODES = 10, 16
VISUAL = VisualVocab(offset=TEXT, size=CODES, boi_id=4)
NULL = torch.tensor([[2, 6, 0]])
GREEDY = SamplingConfig(temperature=0)

CASES = {
    "next-token": (NextTokenMode(), TokenGrid(1, 2, 3)),
    "next-block-rows": (NextBlockMode(), TokenGrid(1, 3, 4)),
    "next-block-frames": (NextBlockMode(), TokenGrid(3, 2, 2)),
    "next-scale": (NextScaleMode(), TokenGrid(1, 4, 4, scales=((1, 1), (2, 2), (4, 4)))),
}


@pytest.fixture(scope="module")
def model() -> UnitokForCausalLM:
    torch.manual_seed(0)
    config = UnitokConfig(
        vocab_size=TEXT + CODES,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        initializer_range=0.5,  # sharp attention: outputs depend visibly on positions and earlier tokens
    )
    return UnitokForCausalLM(config).eval()


@pytest.fixture(params=list(CASES), ids=list(CASES))
def layout(request):
    mode, grid = CASES[request.param]
    return mode.layout(grid, P)


def _prefix(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.full((batch, 1), 2), torch.randint(5, TEXT, (batch, P - 1), generator=g)], 1)


@torch.no_grad()
def naive_decode(model, layout, prefix, guidance_scale=1.0, null=None, sampling=GREEDY, generator=None):
    """Block by block: the full forward (no cache) over prefix + every slot, unknown tokens as placeholders (the
    block-causal mask keeps them from reaching earlier slots)."""
    batch = prefix.shape[0]
    ids = prefix if guidance_scale == 1 else torch.cat([prefix, null.expand(batch, -1)])
    rows = ids.shape[0]
    embed = model.get_input_embeddings()
    start = embed.weight[VISUAL.boi_id]
    tokens = torch.zeros(batch, layout.num_visual, dtype=torch.long)
    for block in range(layout.num_blocks):
        visual = tokens if guidance_scale == 1 else torch.cat([tokens, tokens])
        logits = model(
            inputs_embeds=layout.inputs_embeds(embed(ids), embed(visual + VISUAL.offset), start),
            position_ids=layout.positions[:, None].expand(3, rows, -1),
            attention_mask=layout.attention_mask(0, layout.length, rows),
        ).logits[:, layout.prefix_len :, VISUAL.offset : VISUAL.offset + VISUAL.size]  # (rows, N, V)
        if guidance_scale != 1:
            logits = guide(logits, guidance_scale)
        s = layout.block_slice(block)
        tokens[:, s] = sample(logits[:, s], sampling, generator)
    return tokens


def test_greedy_decoding_equals_the_naive_full_forward_loop(model, layout):
    prefix = _prefix(1)
    result = decode_blocks(model, layout, prefix, VISUAL, sampling=GREEDY)
    assert result.tokens.shape == (1, layout.num_visual) and result.tokens.dtype == torch.int64
    assert torch.equal(result.tokens, naive_decode(model, layout, prefix))


def test_guided_greedy_decoding_equals_the_naive_loop(model, layout):
    prefix = _prefix(2)
    result = decode_blocks(model, layout, prefix, VISUAL, guidance_scale=3.0, null_prefix_ids=NULL, sampling=GREEDY)
    assert torch.equal(result.tokens, naive_decode(model, layout, prefix, 3.0, NULL))


def test_seeded_sampling_equals_the_naive_loop_with_the_same_seed(model, layout):
    # Sampling makes the tokens within a block differ, so later blocks see varied inputs at every slot.
    prefix, sampling = _prefix(2), SamplingConfig(temperature=1.0)
    result = decode_blocks(model, layout, prefix, VISUAL, 2.0, NULL, sampling, torch.Generator().manual_seed(3))
    expected = naive_decode(model, layout, prefix, 2.0, NULL, sampling, torch.Generator().manual_seed(3))
    assert torch.equal(result.tokens, expected)
    assert len(result.tokens.unique()) > 3


def test_one_forward_per_block(model, layout, forward_rows):
    result = decode_blocks(model, layout, _prefix(2), VISUAL, guidance_scale=2.0, null_prefix_ids=NULL)
    assert len(forward_rows) == result.forward_passes == layout.num_blocks


def test_tokens_lie_in_the_visual_range(model, layout):
    result = decode_blocks(model, layout, _prefix(3), VISUAL, generator=torch.Generator().manual_seed(0))
    assert result.tokens.min() >= 0 and result.tokens.max() < CODES


def test_guidance_one_equals_no_guidance(model, layout):
    prefix = _prefix(2)
    plain = decode_blocks(model, layout, prefix, VISUAL, generator=torch.Generator().manual_seed(5))
    unit = decode_blocks(
        model,
        layout,
        prefix,
        VISUAL,
        guidance_scale=1.0,
        null_prefix_ids=NULL,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(plain.tokens, unit.tokens)


def test_seeded_sampling_is_reproducible(model):
    layout = NextBlockMode().layout(TokenGrid(1, 3, 4), P)
    prefix = _prefix(4)

    def run(seed):
        return decode_blocks(
            model, layout, prefix, VISUAL, 2.0, NULL, SamplingConfig(top_k=8), torch.Generator().manual_seed(seed)
        ).tokens

    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_each_row_of_a_batch_equals_decoding_it_alone(model, layout):
    prefix = _prefix(3, seed=4)
    for kwargs in ({}, {"guidance_scale": 2.0, "null_prefix_ids": NULL}):
        batch = decode_blocks(model, layout, prefix, VISUAL, sampling=GREEDY, **kwargs).tokens
        assert batch.shape == (3, layout.num_visual)
        for row in range(3):
            alone = decode_blocks(model, layout, prefix[row : row + 1], VISUAL, sampling=GREEDY, **kwargs).tokens
            assert torch.equal(batch[row : row + 1], alone)


def test_a_per_row_null_prefix_is_accepted(model):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    prefix = _prefix(2)
    one = decode_blocks(model, layout, prefix, VISUAL, 2.0, NULL, GREEDY).tokens
    per_row = decode_blocks(model, layout, prefix, VISUAL, 2.0, NULL.expand(2, -1), GREEDY).tokens
    assert torch.equal(one, per_row)


def test_guidance_without_a_null_prefix_raises(model):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    with pytest.raises(ValueError, match="null_prefix_ids"):
        decode_blocks(model, layout, _prefix(1), VISUAL, guidance_scale=2.0)
    with pytest.raises(ValueError, match="null_prefix_ids"):
        decode_blocks(model, layout, _prefix(1), VISUAL, guidance_scale=0.0)


@pytest.mark.parametrize("scale", [-1.0, float("nan"), float("inf")])
def test_invalid_guidance_scales_raise(model, scale):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    with pytest.raises(ValueError, match="guidance_scale"):
        decode_blocks(model, layout, _prefix(1), VISUAL, guidance_scale=scale, null_prefix_ids=NULL)


def test_prefixes_of_the_wrong_shape_raise(model):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    with pytest.raises(ValueError, match="prefix_ids"):
        decode_blocks(model, layout, _prefix(2)[:, :-1], VISUAL)
    with pytest.raises(ValueError, match="prefix_ids"):
        decode_blocks(model, layout, torch.cat([_prefix(2), _prefix(2)[:, :1]], 1), VISUAL)
    with pytest.raises(ValueError, match="prefix_ids"):
        decode_blocks(model, layout, _prefix(1)[0], VISUAL)  # 1-D
    with pytest.raises(ValueError, match="null_prefix_ids"):
        decode_blocks(model, layout, _prefix(2), VISUAL, guidance_scale=2.0, null_prefix_ids=NULL[:, :2])


def test_pruned_rows_stop_and_kept_rows_are_unchanged(model, layout, forward_rows, scripted_prune):
    """``prune`` drops rows mid-decode (a server's requests whose clients left): the dropped rows take no part in
    later passes, the kept rows get the tokens of the full batch, ``rows`` names them."""
    prefix = _prefix(4, seed=5)
    kwargs = {"guidance_scale": 2.0, "null_prefix_ids": NULL, "sampling": GREEDY}
    full = decode_blocks(model, layout, prefix, VISUAL, **kwargs)
    assert full.rows is None
    if layout.num_blocks < 3:
        pytest.skip("needs 3 blocks")
    masks = {1: torch.tensor([True, False, True, True]), 2: torch.tensor([False, True, True])}
    prune = scripted_prune(masks)
    forward_rows.clear()
    pruned = decode_blocks(model, layout, prefix, VISUAL, prune=prune, **kwargs)
    assert prune.calls == list(range(1, layout.num_blocks))  # before every block after the first
    assert forward_rows[:3] == [8, 6, 4] and set(forward_rows[3:]) <= {4}  # cond + null rows of the live requests
    assert pruned.rows.tolist() == [2, 3]
    assert torch.equal(pruned.tokens, full.tokens[[2, 3]])


def test_prune_must_return_a_row_mask_that_keeps_a_row(model):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    for bad in (torch.tensor([False, False]), torch.tensor([1, 0]), torch.tensor([True])):
        with pytest.raises(ValueError, match="bool mask of 2 rows"):
            decode_blocks(model, layout, _prefix(2), VISUAL, sampling=GREEDY, prune=lambda block, b=bad: b)
