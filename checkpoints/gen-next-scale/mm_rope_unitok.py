"""Multi-modal rotary position embedding (MM-RoPE), as in Lumos-1 (Yuan et al., 2025, arXiv:2507.08801).

Every token has a (t, h, w) position, given as a float tensor ``(3, B, L)``. The ``head_dim // 2`` rotary
frequencies are Llama's (``theta ** (-2i / head_dim)``), but each one is driven by one axis: frequencies come in
groups of 16 that follow ``mm_rope_pattern`` (Lumos-1's "distributed" 2:3:3 allocation, t on channels 0-3 of the
group, h on {4, 5, 8, 9, 12, 13}, w on {6, 7, 10, 11, 14, 15}), so each axis spans the whole spectrum instead of a
contiguous band; a trailing partial group follows the truncated pattern. Text tokens get t = h = w = their 1-D
position, and then MM-RoPE *is* standard 1-D RoPE on every channel, so a text-only model is a plain Llama.

What is ours: positions may be fractional (coarse scales of next-scale prediction sit on the finest grid at
fractional coordinates), and the output ``(cos, sin)`` is exactly what ``apply_rotary_pos_emb`` in
``transformers.models.llama.modeling_llama`` consumes (rotate-half layout, ``cos = cat(freqs, freqs)``), so
Llama's attention runs unchanged. Angles are computed in float32 the way Llama does, which makes 1-D positions
bit-identical to ``LlamaRotaryEmbedding``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .configuration_unitok import LUMOS_MM_ROPE_PATTERN, UnitokConfig


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Llama's inverse frequencies ``theta ** (-2i / head_dim)``, float32, computed exactly as transformers does."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))


def axis_of_frequency(num_freqs: int, pattern: Sequence[int] = LUMOS_MM_ROPE_PATTERN) -> torch.LongTensor:
    """Axis (0 = t, 1 = h, 2 = w) that drives each of ``num_freqs`` rotary frequencies: ``pattern`` repeated, cut."""
    if num_freqs < 1:
        raise ValueError(f"num_freqs must be >= 1, got {num_freqs}")
    group = [int(axis) for axis in pattern]  # checked in Python: under `from_pretrained` tensors are on meta
    if not group or any(axis not in (0, 1, 2) for axis in group):
        raise ValueError(f"pattern must be a non-empty sequence of axis ids 0, 1, 2, got {group}")
    repeats = -(-num_freqs // len(group))
    return torch.tensor((group * repeats)[:num_freqs], dtype=torch.long)


class UnitokRotaryEmbedding(nn.Module):
    """``forward(x, position_ids) -> (cos, sin)``, each ``(B, L, head_dim)`` in ``x.dtype``.

    ``position_ids`` is ``(B, L)`` (1-D RoPE, i.e. t = h = w) or ``(3, B, L)`` (t, h, w), integer or float; a batch
    of 1 broadcasts. With ``config.mm_rope=False`` only the t row of 3-D positions is used (plain 1-D RoPE).
    """

    inv_freq: torch.Tensor
    axis: torch.Tensor

    def __init__(self, config: UnitokConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.rope_theta = float(config.rope_theta)
        self.mm_rope = bool(config.mm_rope)
        self.pattern = tuple(config.mm_rope_pattern)
        # Non-persistent: derived from the config, never saved; `UnitokPreTrainedModel._init_weights` refills them
        # after `from_pretrained` builds the model on the meta device.
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        self.register_buffer("axis", self.compute_axis(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return default_inv_freq(self.head_dim, self.rope_theta)

    def compute_axis(self) -> torch.Tensor:
        return axis_of_frequency(self.head_dim // 2, self.pattern)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # `model.to(torch.bfloat16)` casts float buffers too; bf16 frequencies would put angles at position
            # ~1000 off by radians, so rebuild them in float32.
            inv_freq = self.compute_inv_freq()
        inv_freq = inv_freq.to(device=x.device)
        positions = position_ids.to(device=x.device, dtype=torch.float32)
        if positions.dim() == 2:  # (B, L): t = h = w, every frequency sees the same position
            per_freq = positions[..., None]  # (B, L, 1)
        elif positions.dim() == 3 and positions.shape[0] == 3:
            if self.mm_rope:
                per_freq = positions.index_select(0, self.axis.to(x.device)).permute(1, 2, 0)  # (B, L, F)
            else:
                per_freq = positions[0][..., None]  # (B, L, 1)
        else:
            raise ValueError(f"position_ids must be (B, L) or (3, B, L), got shape {tuple(position_ids.shape)}")
        freqs = per_freq * inv_freq  # (B, L, F)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, L, head_dim), Llama's rotate-half layout
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)
