"""Frechet distance between Gaussians fitted to classifier features (Heusel et al., 2017, on our own features).

FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2). The trace of the matrix square root
is computed from the eigenvalues of the symmetric product, in float64, which avoids scipy's ``sqrtm`` and its
complex round-off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unitok.eval.classifier import extract_features

MIN_SAMPLES_WARNING = 2000


@dataclass(frozen=True)
class FeatureStats:
    mean: torch.Tensor  # (D,)
    cov: torch.Tensor  # (D, D)
    n: int

    @classmethod
    def from_features(cls, feats: torch.Tensor) -> FeatureStats:
        feats = torch.as_tensor(feats).double()
        if feats.dim() != 2 or feats.shape[0] < 2:
            raise ValueError(f"features must be (N >= 2, D), got {tuple(feats.shape)}")
        return cls(mean=feats.mean(0), cov=torch.cov(feats.T), n=feats.shape[0])

    @classmethod
    def from_images(cls, images, resize: bool = False) -> FeatureStats:
        return cls.from_features(extract_features(images, resize=resize))


def _sqrt_psd(mat: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(mat)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: FeatureStats | torch.Tensor, b: FeatureStats | torch.Tensor) -> float:
    """FD between two feature sets (or their precomputed :class:`FeatureStats`)."""
    a = a if isinstance(a, FeatureStats) else FeatureStats.from_features(a)
    b = b if isinstance(b, FeatureStats) else FeatureStats.from_features(b)
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    root_a = _sqrt_psd(a.cov)
    cross = root_a @ b.cov @ root_a
    tr_sqrt = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp_min(0).sqrt().sum()
    diff = a.mean - b.mean
    return float(diff @ diff + a.cov.trace() + b.cov.trace() - 2 * tr_sqrt)


def fd_images(fake, real, resize: bool = False) -> float:
    """FD between two image sets (see ``prepare_images`` for accepted inputs)."""
    return frechet_distance(FeatureStats.from_images(fake, resize), FeatureStats.from_images(real, resize))
