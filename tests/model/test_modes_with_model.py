"""Every prediction mode through the real model: generating block by block with a KV cache gives exactly the
logits of one teacher-forced forward over the whole layout (the property the block decoders rely on)."""

import pytest
import torch
from transformers import DynamicCache

from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.modes import NextBlockMode, NextScaleMode, NextTokenMode, TokenGrid

P, VOCAB = 3, 40


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request) -> UnitokForCausalLM:
    torch.manual_seed(0)
    config = UnitokConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        attn_implementation=request.param,
    )
    return UnitokForCausalLM(config).eval()


CASES = [
    (NextTokenMode(), TokenGrid(1, 2, 3)),
    (NextBlockMode(), TokenGrid(1, 3, 4)),
    (NextBlockMode(), TokenGrid(3, 2, 2)),
    (NextScaleMode(), TokenGrid(1, 4, 4, scales=((1, 1), (2, 2), (4, 4)))),
]


@pytest.mark.parametrize(("mode", "grid"), CASES, ids=lambda c: repr(c))
def test_cached_block_steps_equal_the_full_forward(model, mode, grid):
    layout = mode.layout(grid, P)
    embed = model.get_input_embeddings()
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 10, (2, P), generator=g)
    visual = torch.randint(10, VOCAB, (2, layout.num_visual), generator=g)
    start = embed.weight[5]
    with torch.no_grad():
        prefix_e, visual_e = embed(prefix), embed(visual)
        full = model(
            inputs_embeds=layout.inputs_embeds(prefix_e, visual_e, start),
            position_ids=layout.positions[:, None].expand(3, 2, -1),
            attention_mask=layout.attention_mask(0, layout.length, 2),
        ).logits[:, P:]  # (B, N, V): slot n predicts visual token n
        cache, steps = DynamicCache(config=model.config), []
        for b in range(layout.num_blocks):
            lo, hi = layout.step_range(b)
            x = layout.step_inputs(b, visual_e, start)
            if b == 0:
                x = torch.cat([prefix_e, x], 1)
            out = model(
                inputs_embeds=x,
                position_ids=layout.positions[:, None, lo:hi].expand(3, 2, -1),
                attention_mask=layout.attention_mask(lo, hi, 2),
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits[:, P:] if b == 0 else out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_block_modes_need_fewer_forwards():
    image = TokenGrid(1, 7, 7)
    assert NextTokenMode().layout(image, P).num_blocks == 49
    assert NextBlockMode().layout(image, P).num_blocks == 7
    assert (
        NextScaleMode()
        .layout(TokenGrid(1, 7, 7, scales=((1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7))), P)
        .num_blocks
        == 6
    )
    video = TokenGrid(5, 8, 8)
    assert NextTokenMode().layout(video, P).num_blocks == 8 * NextBlockMode().layout(video, P).num_blocks * 8
