"""Classifier-free guidance: conditional rows first, then unconditional; scale 1 = cond, 0 = uncond."""

import math

import pytest
import torch

from unitok.decoding.cfg import Guidance, as_guidance, check_guidance_scale, guide, uses_cfg


@pytest.fixture
def rows():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)  # cond, uncond: (B, slots, V)


def test_scale_one_is_the_conditional_model(rows):
    cond, uncond = rows
    assert torch.allclose(guide(torch.cat([cond, uncond]), 1.0), cond)


def test_scale_zero_is_the_unconditional_model(rows):
    cond, uncond = rows
    assert torch.allclose(guide(torch.cat([cond, uncond]), 0.0), uncond)


def test_guided_logits_extrapolate(rows):
    cond, uncond = rows
    out = guide(torch.cat([cond, uncond]), 3.0)
    assert out.shape == cond.shape and out.dtype == torch.float32
    assert torch.allclose(out, uncond + 3 * (cond - uncond), atol=1e-5)


def test_half_precision_logits_are_guided_in_float32(rows):
    cond, uncond = rows
    out = guide(torch.cat([cond, uncond]).half(), 2.0)
    assert out.dtype == torch.float32


def test_odd_row_count_raises():
    with pytest.raises(ValueError, match="even"):
        guide(torch.zeros(3, 4, 7), 2.0)


@pytest.mark.parametrize("scale", [-1.0, -1e-6, math.nan, math.inf, -math.inf, True, "2", None])
def test_invalid_scales_raise(scale):
    with pytest.raises(ValueError):
        check_guidance_scale(scale)
    with pytest.raises(ValueError):
        uses_cfg(scale)


def test_valid_scales():
    assert check_guidance_scale(0) == 0.0 and isinstance(check_guidance_scale(2), float)
    assert not uses_cfg(1) and not uses_cfg(1.0)
    assert uses_cfg(0.0) and uses_cfg(1.5)


# --- schedules ----------------------------------------------------------------------------------------------------


def test_a_constant_schedule_is_a_plain_float():
    assert Guidance(3.0).at(torch.tensor([0.0, 0.5])) == 3.0
    assert as_guidance(2.5) == Guidance(2.5) and uses_cfg(Guidance(2.5)) and not uses_cfg(Guidance(1.0))


def test_linear_ramp_and_interval():
    progress = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    assert torch.allclose(Guidance(3.0, ramp="linear").at(progress), torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0]))
    inside = Guidance(3.0, interval=(0.25, 0.5)).at(progress)
    assert torch.equal(inside, torch.tensor([1.0, 3.0, 3.0, 1.0, 1.0]))


def test_per_token_scales_broadcast_in_guide(rows):
    cond, uncond = rows
    scales = torch.tensor([1.0, 2.0, 0.0, 3.0, 1.0])[:, None]  # (slots, 1)
    out = guide(torch.cat([cond, uncond]), scales)
    assert torch.allclose(out[:, 0], cond[:, 0]) and torch.allclose(out[:, 2], uncond[:, 2])
    assert torch.allclose(out[:, 3], uncond[:, 3] + 3 * (cond[:, 3] - uncond[:, 3]), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs", [{"ramp": "cosine"}, {"interval": (0.6, 0.2)}, {"interval": (-0.1, 1)}, {"interval": "all"}]
)
def test_invalid_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        Guidance(2.0, **kwargs)
