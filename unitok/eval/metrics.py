"""Reconstruction and codebook metrics: PSNR, SSIM (Wang et al., 2004), codebook usage and perplexity.

Images are float tensors in [0, data_range] shaped (H, W), (N, H, W) or (N, C, H, W); video (N, T, C, H, W) is
scored frame by frame. SSIM uses the paper's 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03 and the mean
over the valid region, which matches scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False)``. Metrics are computed in float64 so they do not drift with batch size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray


def _as_nchw(x: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().to("cpu", torch.float64)
    if t.dim() == 2:
        t = t[None, None]
    elif t.dim() == 3:
        t = t[:, None]
    elif t.dim() == 5:
        t = t.flatten(0, 1)  # (N*T, C, H, W)
    elif t.dim() != 4:
        raise ValueError(f"{name} must be (H, W), (N, H, W), (N, C, H, W) or (N, T, C, H, W); got {tuple(t.shape)}")
    return t


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_nchw(x, "x"), _as_nchw(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError("cannot score empty images")
    return a, b


def psnr(x: ArrayLike, y: ArrayLike, data_range: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image then averaged (``reduction="none"`` keeps one per image)."""
    a, b = _pair(x, y)
    mse = (a - b).pow(2).flatten(1).mean(1)
    values = 10 * torch.log10(data_range**2 / mse.clamp_min(1e-20))
    return _reduce(values, reduction)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(
    x: ArrayLike,
    y: ArrayLike,
    data_range: float = 1.0,
    window_size: int = 11,
    sigma: float = 1.5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Structural similarity, per image (channels averaged), then averaged over images."""
    a, b = _pair(x, y)
    if min(a.shape[-2:]) < window_size:
        raise ValueError(
            f"images of size {tuple(a.shape[-2:])} are smaller than the {window_size}x{window_size} SSIM window"
        )
    values = ssim_per_image(a, b, data_range, window_size, sigma)
    return _reduce(values, reduction)


def ssim_per_image(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Differentiable SSIM of (N, C, H, W) tensors in their own dtype -> (N,) (channels averaged).

    ``ssim`` calls this on detached float64 copies; training losses call it directly on fp32 activations.
    """
    n, c, h, w = a.shape
    a, b = a.reshape(n * c, 1, h, w), b.reshape(n * c, 1, h, w)
    win = _gaussian_window(window_size, sigma).to(a)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, win), F.conv2d(b, win)
    var_a = F.conv2d(a * a, win) - mu_a**2
    var_b = F.conv2d(b * b, win) - mu_b**2
    cov = F.conv2d(a * b, win) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1).reshape(n, c).mean(1)


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def code_counts(indices: ArrayLike, codebook_size: int) -> torch.Tensor:
    """How often each of ``codebook_size`` codes occurs in ``indices`` (any shape of integer ids)."""
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    idx = torch.as_tensor(np.asarray(indices) if isinstance(indices, np.ndarray) else indices).reshape(-1)
    if idx.is_floating_point():
        raise ValueError("indices must be integers")
    idx = idx.long()
    if idx.numel() and (idx.min() < 0 or idx.max() >= codebook_size):
        raise ValueError(f"indices must lie in [0, {codebook_size}), got [{int(idx.min())}, {int(idx.max())}]")
    return torch.bincount(idx, minlength=codebook_size)


def codebook_usage(indices: ArrayLike, codebook_size: int) -> float:
    """Fraction of the codebook that occurs at least once in ``indices``."""
    return float((code_counts(indices, codebook_size) > 0).float().mean())


def codebook_perplexity(indices: ArrayLike, codebook_size: int) -> float:
    """exp(entropy) of the code histogram: 1 for a single code, ``codebook_size`` for uniform use."""
    counts = code_counts(indices, codebook_size).double()
    total = counts.sum()
    if total == 0:
        raise ValueError("no indices to measure")
    p = counts[counts > 0] / total
    return float(math.exp(-(p * p.log()).sum()))
