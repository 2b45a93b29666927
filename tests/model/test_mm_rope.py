"""MM-RoPE: text positions are Llama's RoPE, each axis is relative, the axis pattern is Lumos-1's."""

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from unitok.model import LUMOS_MM_ROPE_PATTERN, UnitokConfig, UnitokRotaryEmbedding, axis_of_frequency


def rope_config(head_dim: int = 64, **overrides) -> UnitokConfig:
    return UnitokConfig(hidden_size=2 * head_dim, num_attention_heads=2, num_key_value_heads=1, **overrides)


def llama_rope(head_dim: int, theta: float = 10000.0) -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    return LlamaRotaryEmbedding(config)


def scores(rope: UnitokRotaryEmbedding, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = rope(q, positions)
    q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    return q_rot @ k_rot.transpose(-1, -2)  # (B, H, L, L)


@pytest.mark.parametrize("head_dim", [64, 40, 8])
@pytest.mark.parametrize("mm_rope", [True, False])
def test_text_positions_equal_llama_rope(head_dim: int, mm_rope: bool):
    rope = UnitokRotaryEmbedding(rope_config(head_dim, mm_rope=mm_rope, rope_theta=500.0))
    reference = llama_rope(head_dim, theta=500.0)
    x = torch.zeros(2, 1, dtype=torch.float32)
    flat = torch.stack([torch.arange(300), torch.arange(300) + 17])  # (B, L)
    want_cos, want_sin = reference(x, flat)
    for positions in (flat, flat[None].expand(3, -1, -1)):
        cos, sin = rope(x, positions)
        assert cos.shape == (2, 300, head_dim)
        torch.testing.assert_close(cos, want_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, want_sin, atol=1e-6, rtol=0)


def test_axis_pattern_head_dim_64_is_lumos():
    group = [0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 2, 2]
    assert list(LUMOS_MM_ROPE_PATTERN) == group
    assert axis_of_frequency(32).tolist() == group + group
    assert UnitokRotaryEmbedding(rope_config(64)).axis.tolist() == group + group
    t_channels = [i for i in range(16) if group[i] == 0]
    h_channels = [i for i in range(16) if group[i] == 1]
    w_channels = [i for i in range(16) if group[i] == 2]
    assert (t_channels, h_channels, w_channels) == ([0, 1, 2, 3], [4, 5, 8, 9, 12, 13], [6, 7, 10, 11, 14, 15])


def test_axis_pattern_partial_group_is_truncated():
    assert axis_of_frequency(20).tolist() == list(LUMOS_MM_ROPE_PATTERN) + [0, 0, 0, 0]
    assert axis_of_frequency(6).tolist() == [0, 0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="axis ids"):
        axis_of_frequency(8, pattern=[0, 3])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_scores_depend_only_on_relative_position_per_axis(axis: int):
    torch.manual_seed(0)
    rope = UnitokRotaryEmbedding(rope_config(64))
    q, k = torch.randn(2, 3, 12, 64), torch.randn(2, 3, 12, 64)
    positions = torch.rand(3, 2, 12) * 16  # fractional (t, h, w)
    shifted = positions.clone()
    shifted[axis] += 5.75
    base = scores(rope, q, k, positions)
    torch.testing.assert_close(scores(rope, q, k, shifted), base, atol=1e-5, rtol=1e-5)
    # Shifting the axis for one token only moves its scores: the axis really drives some frequencies.
    moved = positions.clone()
    moved[axis, :, 3] += 5.75
    assert not torch.allclose(scores(rope, q, k, moved), base, atol=1e-3)


def test_each_axis_drives_only_its_frequencies():
    rope = UnitokRotaryEmbedding(rope_config(64, rope_theta=100.0))  # every frequency moves visibly per unit shift
    axis = axis_of_frequency(32)
    positions = torch.rand(3, 1, 5) * 10
    cos, _ = rope(torch.zeros(1), positions)
    for moved_axis in range(3):
        shifted = positions.clone()
        shifted[moved_axis] += 1.0
        cos_shifted, _ = rope(torch.zeros(1), shifted)
        changed = (cos_shifted - cos).abs().amax(dim=(0, 1))[:32] > 1e-6  # (F,)
        assert torch.equal(changed, axis == moved_axis)


def test_fractional_positions_match_float64_reference():
    head_dim, theta = 48, 10000.0
    rope = UnitokRotaryEmbedding(rope_config(head_dim))
    positions = torch.tensor([[[0.0, 0.5, 1.25, 3.75]], [[0.25, 0.25, 2.5, 7.0]], [[0.75, 1.5, 0.125, 5.5]]])
    cos, sin = rope(torch.zeros(1), positions)
    axis = axis_of_frequency(head_dim // 2).tolist()
    for f in range(head_dim // 2):
        inv_freq = 1.0 / theta ** (2 * f / head_dim)
        for j in range(4):
            angle = float(positions[axis[f], 0, j]) * inv_freq
            for channel in (f, f + head_dim // 2):
                assert math.isclose(float(cos[0, j, channel]), math.cos(angle), abs_tol=1e-6)
                assert math.isclose(float(sin[0, j, channel]), math.sin(angle), abs_tol=1e-6)
    # Integer-valued float positions and long positions are the same thing.
    long_positions = torch.randint(0, 50, (3, 2, 6))
    got, want = rope(torch.zeros(1), long_positions), rope(torch.zeros(1), long_positions.float())
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_mm_rope_off_uses_t_only():
    rope = UnitokRotaryEmbedding(rope_config(32, mm_rope=False))
    positions = torch.rand(3, 2, 7) * 9
    torch.testing.assert_close(rope(torch.zeros(1), positions), rope(torch.zeros(1), positions[0]), atol=0, rtol=0)


def test_output_dtype_and_bf16_cast_keeps_float32_angles():
    rope = UnitokRotaryEmbedding(rope_config(32))
    positions = torch.arange(2000)[None].expand(3, 1, -1)
    want_cos, _ = rope(torch.zeros(1, dtype=torch.float32), positions)
    rope.to(torch.bfloat16)  # casts the inv_freq buffer as model.to(bf16) would
    cos, sin = rope(torch.zeros(1, dtype=torch.bfloat16), positions)
    assert cos.dtype == sin.dtype == torch.bfloat16
    torch.testing.assert_close(cos.float(), want_cos, atol=1e-2, rtol=0)


def test_bad_position_shape_raises():
    rope = UnitokRotaryEmbedding(rope_config(32))
    with pytest.raises(ValueError, match=r"\(B, L\) or \(3, B, L\)"):
        rope(torch.zeros(1), torch.zeros(2, 2, 5))
