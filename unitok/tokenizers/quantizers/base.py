"""The one interface every quantizer implements, and its one typed result.

A quantizer maps channel-last latents ``z`` of shape (..., dim) to discrete codes. Any leading shape works, so
the same module serves sequences (B, N, dim), images (B, H, W, dim) and video (B, T, H, W, dim). Every quantizer
returns a :class:`QuantizerOutput` with the same fields, whatever its algorithm or flags; conversions between
indices, codes (the quantized vectors) and, for binary quantizers, bit vectors are exact.

Quantization runs in fp32 (inputs are upcast, autocast is disabled) because rounding and distances are
precision-sensitive; the straight-through estimator passes gradients from ``quantized`` to ``z``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class QuantizerOutput:
    """``quantized``: (..., dim) codes with straight-through gradients to the input.
    ``indices``: (...) int64 code ids (binary quantizers with ``index_groups > 1``: (..., groups)).
    ``losses``: named scalar losses to add to the training objective (already weighted), may be empty.
    ``metrics``: named scalar diagnostics (detached), e.g. ``usage`` and ``perplexity`` of this batch.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> torch.Tensor:
        """Sum of ``losses`` (a zero scalar when there are none)."""
        if not self.losses:
            return self.quantized.new_zeros(())
        return torch.stack(list(self.losses.values())).sum()


class Quantizer(nn.Module):
    """Base class. Subclasses set ``dim`` and implement ``quantize``, ``indices_to_codes``, ``codes_to_indices``."""

    dim: int

    @property
    def codebook_size(self) -> int:
        """Number of distinct codes (a Python int; 2**bits for binary quantizers)."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_input(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            return self.quantize(z.float())

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        raise NotImplementedError

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) ids -> (..., dim) code vectors, exactly what ``quantize`` returns for them."""
        raise NotImplementedError

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., dim) code vectors -> (...) ids (inverse of ``indices_to_codes``)."""
        raise NotImplementedError

    def _check_input(self, z: torch.Tensor) -> None:
        if not torch.is_tensor(z) or not z.is_floating_point():
            raise ValueError(
                f"quantizer input must be a float tensor, got {type(z).__name__} {getattr(z, 'dtype', '')}"
            )
        if z.dim() < 2 or z.shape[-1] != self.dim:
            raise ValueError(f"quantizer expects channel-last input (..., {self.dim}), got shape {tuple(z.shape)}")

    def check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Validate integer ids in [0, codebook_size); returns them as int64."""
        if not torch.is_tensor(indices) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must lie in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        return indices


def straight_through(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``q`` (no round-off), gradient of the identity to ``z``."""
    return q + (z - z.detach())


@torch.no_grad()
def usage_metrics(indices: torch.Tensor, codebook_size: int) -> dict[str, torch.Tensor]:
    """Batch usage (fraction of codes seen) and perplexity; for huge codebooks only perplexity of seen codes."""
    flat = indices.reshape(-1)
    if codebook_size <= 1 << 20:
        counts = torch.bincount(flat, minlength=codebook_size).float()
    else:
        counts = torch.unique(flat, return_counts=True)[1].float()
    p = counts[counts > 0] / counts.sum()
    return {
        "usage": (counts > 0).sum() / float(codebook_size),
        "perplexity": torch.exp(-(p * p.log()).sum()),
    }
