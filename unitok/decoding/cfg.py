"""Classifier-free guidance: batched conditional / unconditional rows, one forward for both.

Rows ``[0, B)`` carry the conditions and rows ``[B, 2B)`` the null condition; :func:`guide` combines their logits
as ``uncond + scale * (cond - uncond)`` (scale 1 is the conditional model, 0 the unconditional one).
"""

from __future__ import annotations

import math

import torch


def check_guidance_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {scale!r}")
    return float(scale)


def uses_cfg(scale: float) -> bool:
    return check_guidance_scale(scale) != 1.0


def guide(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """(2B, ..., V) logits (conditional rows first) -> (B, ..., V) guided logits."""
    if logits.shape[0] % 2:
        raise ValueError(f"CFG needs an even number of rows (cond then uncond), got {logits.shape[0]}")
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)
