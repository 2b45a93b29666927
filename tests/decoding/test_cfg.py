"""Classifier-free guidance: conditional rows first, then unconditional; scale 1 = cond, 0 = uncond."""

import math

import pytest
import torch

from unitok.decoding.cfg import check_guidance_scale, guide, uses_cfg


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
