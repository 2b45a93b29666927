import numpy as np
import pytest
import torch

from unitok.bench.eval import gaussian_blur
from unitok.eval import FeatureStats, fd_images, frechet_distance


def test_fd_closed_form_for_gaussians():
    # Diagonal covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a = FeatureStats(
        mean=torch.zeros(3, dtype=torch.float64), cov=torch.diag(torch.tensor([1.0, 4.0, 9.0]).double()), n=10
    )
    b = FeatureStats(
        mean=torch.ones(3, dtype=torch.float64), cov=torch.diag(torch.tensor([4.0, 4.0, 1.0]).double()), n=10
    )
    assert frechet_distance(a, b) == pytest.approx(3 + 1 + 0 + 4)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_fd_matches_scipy_sqrtm_on_random_features():
    from scipy import linalg

    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 16))
    y = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(ref, rel=1e-6)


def test_fd_orders_real_data_corruptions(fashion_test):
    images = fashion_test.images.astype(np.float32) / 255
    real_a, real_b = images[:2000], images[2000:4000]
    floor = fd_images(real_a, real_b)
    blurred = gaussian_blur(torch.from_numpy(real_b)[:, None], 1.0)
    assert fd_images(real_a, blurred) > 10 * floor
    assert fd_images(real_a, np.zeros_like(real_b)) > fd_images(real_a, blurred)


def test_fd_errors():
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))
