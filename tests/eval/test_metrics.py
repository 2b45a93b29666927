import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from unitok.eval import codebook_perplexity, codebook_usage, psnr, ssim


def test_psnr_known_values():
    x = torch.zeros(2, 1, 8, 8)
    assert psnr(x, x + 0.1).item() == pytest.approx(20.0, abs=1e-5)  # MSE 0.01 -> 20 dB
    assert psnr(x, x + 0.5).item() == pytest.approx(10 * math.log10(4), abs=1e-9)
    assert psnr(np.zeros((4, 4)), np.full((4, 4), 10.0), data_range=255).item() == pytest.approx(
        10 * math.log10(255**2 / 100)
    )
    per_image = psnr(torch.stack([x[0], x[0]]), torch.stack([x[0] + 0.1, x[0] + 0.01]), reduction="none")
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-4)


def test_ssim_identity_and_known_reference():
    rng = np.random.default_rng(0)
    a = rng.random((3, 28, 28))
    assert ssim(a, a).item() == pytest.approx(1.0)
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    ours = ssim(a, b, reduction="none").numpy()
    ref = [
        structural_similarity(a[i], b[i], data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        for i in range(3)
    ]
    assert ours == pytest.approx(ref, abs=1e-6)


def test_ssim_rgb_and_video_shapes():
    x = torch.rand(2, 3, 16, 16)
    assert ssim(x, x).item() == pytest.approx(1.0)
    v = torch.rand(2, 4, 1, 16, 16)
    assert psnr(v, v * 0.5).shape == ()
    assert ssim(v, v, reduction="none").shape == (8,)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        psnr(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 5, 5), torch.zeros(1, 5, 5))
    with pytest.raises(ValueError, match="reduction"):
        psnr(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), reduction="sum")


def test_codebook_usage_and_perplexity():
    assert codebook_usage(torch.tensor([0, 1, 1, 3]), 4) == 0.75
    assert codebook_perplexity(torch.arange(8), 8) == pytest.approx(8.0)
    assert codebook_perplexity(torch.zeros(5, dtype=torch.long), 8) == pytest.approx(1.0)
    assert codebook_perplexity(np.array([0, 0, 1, 1]), 4) == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        codebook_usage(torch.tensor([4]), 4)
    with pytest.raises(ValueError, match="integers"):
        codebook_usage(torch.tensor([0.5]), 4)
