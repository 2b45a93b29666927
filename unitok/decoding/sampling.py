"""Sampling from logits: temperature, top-k, top-p (nucleus), with an optional seeded ``torch.Generator``.

``SamplingConfig`` validates once; :func:`sample` draws one token per row of ``(..., V)`` logits. Filtering uses
transformers' own ``TopKLogitsWarper`` / ``TopPLogitsWarper`` so our samplers and ``model.generate`` agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1.0 disable the filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not float(self.temperature) >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not 0 < float(self.top_p) <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warp(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> temperature-scaled, filtered logits (filtered entries are -inf)."""
        shape = logits.shape
        flat = logits.reshape(-1, shape[-1]).float()
        if self.temperature not in (0, 1):
            flat = flat / self.temperature
        if self.top_k:
            flat = TopKLogitsWarper(min(self.top_k, shape[-1]))(None, flat)
        if self.top_p < 1:
            flat = TopPLogitsWarper(self.top_p)(None, flat)
        return flat.reshape(shape)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution :func:`sample` draws from (one-hot at the argmax when greedy)."""
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
        return torch.softmax(self.warp(logits), dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) probabilities (rows need not be normalised) -> (...) int64 samples, by inverse CDF.

    One uniform per row and a binary search: ``torch.multinomial`` draws V exponentials per row instead, which costs
    more than a whole forward pass at V = 4375 on a CPU. Zero-probability entries are never drawn.
    """
    flat = probs.reshape(-1, probs.shape[-1]).float()
    cdf = flat.cumsum(-1)
    u = torch.rand(flat.shape[0], 1, generator=generator).to(cdf.device) * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).clamp_(max=flat.shape[-1] - 1)
    return index.reshape(probs.shape[:-1])


def sample(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(..., V) logits -> (...) int64 token ids."""
    if config.greedy:
        return logits.argmax(-1)
    return draw(config.probs(logits), generator)
