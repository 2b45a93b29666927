"""Prediction modes: blocks, block-causal masks, MM-RoPE coordinates and the input builders."""

import pytest
import torch

from unitok.model.modes import NextBlockMode, NextScaleMode, NextTokenMode, TokenGrid, get_mode

IMAGE = TokenGrid(1, 3, 4)
VIDEO = TokenGrid(3, 2, 2)
SCALES = TokenGrid(1, 4, 4, scales=((1, 1), (2, 2), (4, 4)))
P = 3  # BOS + a 2-token condition slot


def test_block_partitions():
    assert NextTokenMode().layout(IMAGE, P).num_blocks == 12
    assert NextBlockMode().layout(IMAGE, P).block_starts == [0, 4, 8, 12]  # rows
    assert NextBlockMode().layout(VIDEO, P).block_starts == [0, 4, 8, 12]  # frames
    assert NextBlockMode("row").layout(VIDEO, P).num_blocks == 6
    assert NextScaleMode().layout(SCALES, P).block_starts == [0, 1, 5, 21]


def test_next_token_mask_is_causal():
    layout = NextTokenMode().layout(IMAGE, P)
    assert torch.equal(layout.mask, torch.ones(layout.length, layout.length, dtype=torch.bool).tril())


@pytest.mark.parametrize(
    ("mode", "grid"), [(NextBlockMode(), IMAGE), (NextBlockMode(), VIDEO), (NextScaleMode(), SCALES)]
)
def test_block_causal_mask(mode, grid):
    layout = mode.layout(grid, P)
    mask, ids = layout.mask, layout.block_ids
    assert torch.equal(mask[:P, :P], torch.ones(P, P, dtype=torch.bool).tril())  # the prefix is causal
    assert mask[P:, :P].all()  # every slot sees the whole prefix
    assert not mask[:P, P:].any()
    for b in range(layout.num_blocks):
        s = layout.block_slice(b)
        rows = mask[P + s.start : P + s.stop]
        assert rows[:, P : P + s.stop].all()  # its own block (bidirectional) and all earlier ones
        assert not rows[:, P + s.stop :].any()  # never a later block
    assert ids[P:].tolist() == sorted(ids[P:].tolist())


def test_step_ranges_tile_the_sequence():
    layout = NextBlockMode().layout(IMAGE, P)
    ranges = [layout.step_range(b) for b in range(layout.num_blocks)]
    assert ranges[0] == (0, P + 4) and ranges[-1][1] == layout.length
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    with pytest.raises(ValueError, match="block must be"):
        layout.block_slice(3)


def test_text_positions_are_1d_and_visual_offset_by_prefix():
    layout = NextTokenMode().layout(IMAGE, P)
    pos = layout.positions
    assert pos.shape == (3, P + 12)
    assert torch.equal(pos[:, :P], torch.arange(P).float().expand(3, -1))
    assert pos[:, P].tolist() == [P, P, P] and pos[:, P + 5].tolist() == [P, P + 1, P + 1]  # token (0, 1, 1)


def test_video_time_scale():
    pos = NextBlockMode().layout(VIDEO, P).positions
    scaled = NextBlockMode().layout(VIDEO, P)
    scaled.time_scale = 2.0
    assert torch.equal(scaled.positions[0, P:] - P, 2 * (pos[0, P:] - P))


def test_coarse_scales_align_with_the_finest_grid():
    pos = NextScaleMode().layout(SCALES, P).positions[:, P:] - P  # (3, 21)
    fine = pos[:, 5:]
    assert pos[1:, 0].tolist() == [1.5, 1.5]  # the 1x1 scale sits at the centre of the 4x4 grid
    # each 2x2 cell's coordinate is the mean of the four finest cells it covers
    mid = pos[1:, 1:5].t().reshape(2, 2, 2)
    grid = fine[1:].t().reshape(4, 4, 2)
    cells = grid.reshape(2, 2, 2, 2, 2).mean(dim=(1, 3))
    assert torch.allclose(mid, cells)
    assert torch.equal(fine[1:].t(), TokenGrid(1, 4, 4).raster_coordinates()[:, 1:])


def test_next_token_and_next_block_inputs_shift_by_one_block():
    d, start = 5, torch.full((5,), -1.0)
    v = torch.arange(2 * 12 * d).float().reshape(2, 12, d)
    x = NextTokenMode().layout(IMAGE, P).inputs_embeds(torch.zeros(2, P, d), v, start)
    assert torch.equal(x[:, P], start.expand(2, -1)) and torch.equal(x[:, P + 1 :], v[:, :-1])
    x = NextBlockMode().layout(IMAGE, P).inputs_embeds(torch.zeros(2, P, d), v, start)
    assert torch.equal(x[:, P : P + 4], start.expand(2, 4, -1))
    assert torch.equal(x[:, P + 4 :], v[:, :8])  # slot j of block b holds token j of block b - 1


def test_next_scale_inputs_accumulate_resized_scales():
    d = 2
    v = torch.randn(1, 21, d)
    layout = NextScaleMode().layout(SCALES, P)
    x = layout.inputs_embeds(torch.zeros(1, P, d), v, torch.zeros(d))
    # scale 1 (2x2) slots: the 1x1 token's embedding everywhere
    assert torch.allclose(x[0, P + 1 : P + 5], v[0, 0].expand(4, -1))
    # scale 2 (4x4): 1x1 broadcast + 2x2 upsampled; a constant 2x2 map stays constant
    v2 = v.clone()
    v2[0, 1:5] = 3.0
    x2 = layout.inputs_embeds(torch.zeros(1, P, d), v2, torch.zeros(d))
    assert torch.allclose(x2[0, P + 5 :], (v2[0, 0] + 3.0).expand(16, -1))


def test_step_inputs_equal_teacher_forcing():
    d = 3
    v = torch.randn(2, 21, d)
    layout = NextScaleMode().layout(SCALES, P)
    full = layout.inputs_embeds(torch.zeros(2, P, d), v, torch.ones(d))
    for b in range(layout.num_blocks):
        s = layout.block_slice(b)
        known = v[:, : s.start]  # only what earlier blocks generated
        assert torch.allclose(layout.step_inputs(b, known, torch.ones(d)), full[:, P + s.start : P + s.stop])
    with pytest.raises(ValueError, match="needs the 5 tokens"):
        layout.step_inputs(2, v[:, :3], torch.ones(d))


def test_grid_and_mode_errors():
    with pytest.raises(ValueError, match="unknown prediction mode"):
        get_mode("next-pixel")
    with pytest.raises(ValueError, match="multi-scale tokenizer"):
        NextScaleMode().layout(IMAGE, P)
    with pytest.raises(ValueError, match="single-scale"):
        NextTokenMode().layout(SCALES, P)
    with pytest.raises(ValueError, match="last scale"):
        TokenGrid(1, 4, 4, scales=((1, 1), (2, 2)))
    with pytest.raises(ValueError, match="positive"):
        TokenGrid(0, 4, 4)
    with pytest.raises(ValueError, match="block must be"):
        NextBlockMode("column")
    with pytest.raises(ValueError, match="prefix_len"):
        NextTokenMode().layout(IMAGE, 0)
