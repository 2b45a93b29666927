"""Training losses for tokenizers: reconstruction (L2/L1), SSIM, and an optional patch-GAN term.

None needs downloaded weights. SSIM is the structure-aware ("perceptual-style") term: it rewards local contrast
and structure that L2 blurs away. The patch discriminator (PatchGAN, Isola et al., 2017, as in VQGAN) is a small
conv net trained alongside with the hinge loss; its weight is off by default on CPU because it slows training.
Video reconstructions (B, T, C, H, W) are scored frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unitok.eval.metrics import ssim_per_image


@dataclass
class LossWeights:
    mse: float = 1.0
    l1: float = 0.0
    ssim: float = 0.1
    gan: float = 0.0
    gan_start_step: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> LossWeights:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown loss weights {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**d)


def _frames(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(0, 1) if x.dim() == 5 else x  # (B*T, C, H, W) for video


class PatchDiscriminator(nn.Module):
    """Three strided convs -> a map of real/fake logits over patches."""

    def __init__(self, in_channels: int = 1, channels: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels * 2, 4, 2, 1),
            nn.GroupNorm(8, channels * 2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels * 2, 1, 3, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(_frames(x))


def reconstruction_losses(recon: torch.Tensor, target: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """Weighted reconstruction terms (pixel values in [-1, 1])."""
    out: dict[str, torch.Tensor] = {}
    if weights.mse:
        out["mse"] = weights.mse * F.mse_loss(recon, target)
    if weights.l1:
        out["l1"] = weights.l1 * F.l1_loss(recon, target)
    if weights.ssim:
        a, b = (_frames(recon) + 1) / 2, (_frames(target) + 1) / 2
        if min(a.shape[-2:]) >= 11:
            out["ssim"] = weights.ssim * (1 - ssim_per_image(a, b)).mean()
    return out


def generator_gan_loss(disc: PatchDiscriminator, recon: torch.Tensor) -> torch.Tensor:
    return -disc(recon).mean()


def discriminator_loss(disc: PatchDiscriminator, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (VQGAN)."""
    return F.relu(1 - disc(real)).mean() + F.relu(1 + disc(fake.detach())).mean()
