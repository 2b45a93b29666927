"""Classifier-free guidance: batched conditional / unconditional rows, one forward for both.

Rows ``[0, B)`` carry the conditions and rows ``[B, 2B)`` the null condition; :func:`guide` combines their logits
as ``uncond + scale * (cond - uncond)`` (scale 1 is the conditional model, 0 the unconditional one).

:class:`Guidance` adds a schedule over the generation, read at each token's *progress* (the fraction of the
sample's tokens generated before it, in [0, 1)):

- ``ramp="linear"`` grows the scale from 1 at the first token to ``scale`` at the last (MUSE / LlamaGen style:
  the coarse first tokens stay diverse, the details follow the condition);
- ``interval=(lo, hi)`` applies guidance only to tokens whose progress lies in ``[lo, hi]`` and scale 1 elsewhere
  (guidance in a limited interval, Kynkaanniemi et al. 2024).

Every decoder accepts a plain float (constant guidance) or a :class:`Guidance`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RAMPS = ("constant", "linear")


def check_guidance_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {scale!r}")
    return float(scale)


@dataclass(frozen=True)
class Guidance:
    """A guidance scale with an optional ramp and interval (see the module docstring)."""

    scale: float = 1.0
    ramp: str = "constant"
    interval: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "scale", check_guidance_scale(self.scale))
        if self.ramp not in RAMPS:
            raise ValueError(f"guidance ramp must be one of {RAMPS}, got {self.ramp!r}")
        try:
            lo, hi = (float(v) for v in self.interval)
        except (TypeError, ValueError):
            raise ValueError(f"guidance interval must be two numbers (lo, hi), got {self.interval!r}") from None
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance interval must satisfy 0 <= lo <= hi <= 1, got {self.interval!r}")
        object.__setattr__(self, "interval", (lo, hi))

    @property
    def active(self) -> bool:
        """Whether any token is guided (the decoder then runs the null condition beside each row)."""
        return self.scale != 1.0

    @property
    def constant(self) -> bool:
        return self.ramp == "constant" and self.interval == (0.0, 1.0)

    def at(self, progress: torch.Tensor) -> torch.Tensor | float:
        """The scale at each ``progress`` (any shape, in [0, 1]); a plain float when the schedule is constant."""
        if self.constant:
            return self.scale
        progress = progress.float()
        scale = 1 + (self.scale - 1) * progress if self.ramp == "linear" else torch.full_like(progress, self.scale)
        lo, hi = self.interval
        return torch.where((progress >= lo) & (progress <= hi), scale, torch.ones_like(scale))


def as_guidance(guidance: float | Guidance) -> Guidance:
    """A float scale (validated) or a :class:`Guidance` -> :class:`Guidance`."""
    return guidance if isinstance(guidance, Guidance) else Guidance(check_guidance_scale(guidance))


def uses_cfg(guidance: float | Guidance) -> bool:
    return as_guidance(guidance).active


def guide(logits: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """(2B, ..., V) logits (conditional rows first) -> (B, ..., V) guided logits. ``scale`` is a float or a
    tensor that broadcasts against (B, ..., 1) (per-token scales of a schedule)."""
    if logits.shape[0] % 2:
        raise ValueError(f"CFG needs an even number of rows (cond then uncond), got {logits.shape[0]}")
    cond, uncond = logits.float().chunk(2)
    return torch.lerp(uncond, cond, scale)  # uncond + scale * (cond - uncond), one op


@torch.no_grad()
def next_token_guided_logprobs(gen, conditions: list, tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, N, V) guided, visual-only log-probs of a next-token generator ``gen`` at every step of ``tokens`` (B, N)
    visual indices, teacher forced: conditional rows then null rows in one forward, logits combined as
    ``u + s (c - u)``. The distribution every sampled token of a correct CFG implementation comes from (the vLLM
    parity tests and ``unitok bench serving`` compare against it)."""
    if gen.spec.mode != "next-token":
        raise ValueError(f"teacher-forced log-probs need a next-token generator, got a {gen.spec.mode} one")
    layout, visual, vocab = gen.layout(), gen.visual, gen.vocab
    batch = tokens.shape[0]
    if len(conditions) != batch:
        raise ValueError(f"{len(conditions)} conditions for {batch} token rows")
    body = torch.cat([torch.full((batch, 1), visual.boi_id), tokens[:, :-1] + visual.offset], 1)  # (B, N)
    prefixes = torch.cat([vocab.prefix_ids(conditions), vocab.prefix_ids([None]).expand(batch, -1)])  # (2B, P)
    ids = torch.cat([prefixes, body.repeat(2, 1)], 1)  # (2B, L)
    positions = layout.positions[:, None].expand(-1, 2 * batch, -1)  # (3, 2B, L)
    logits = gen.model(input_ids=ids, position_ids=positions).logits[:, layout.prefix_len :]  # (2B, N, vocab)
    logits = logits[..., visual.offset : visual.offset + visual.size].float()
    return torch.log_softmax(torch.lerp(logits[batch:], logits[:batch], scale), dim=-1)
