"""Finite Scalar Quantization (Mentzer et al., 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

Each of ``len(levels)`` channels is bounded with tanh and rounded to one of ``levels[i]`` values; the code id is
the mixed-radix number of the per-channel levels. No codebook, no auxiliary loss, no collapse. Codes lie in
[-1, 1] per channel. Even level counts use the paper's half-step offset so the grid stays symmetric.
"""

from __future__ import annotations

import torch

from unitok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, straight_through, usage_metrics


class FSQ(Quantizer):
    def __init__(self, levels: list[int] | tuple[int, ...] = (8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = levels
        self.dim = len(levels)
        self.eps = eps
        # Plain tensors, not buffers: they are configuration, and non-persistent buffers are not restored by
        # transformers' from_pretrained (it builds modules on the meta device). Moved lazily to each device.
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _grid(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, mixed-radix basis), both (dim,) int64 on ``device``."""
        if device not in self._tables:
            levels = torch.tensor(self.levels, dtype=torch.long, device=device)
            basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.long, device=device), 0)
            self._tables[device] = (levels, basis)
        return self._tables[device]

    @property
    def codebook_size(self) -> int:
        size = 1
        for v in self.levels:
            size *= v
        return size

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """Squash to (-half_width, half_width) per channel, offset by half a step for even level counts."""
        levels, _ = self._grid(z.device)
        half_l = (levels.float() - 1) * (1 + self.eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half_l)
        return torch.tanh(z + shift) * half_l - offset

    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        levels, basis = self._grid(z.device)
        bounded = self.bound(z)
        rounded = torch.round(bounded)
        codes = straight_through(bounded, rounded) / (levels // 2).float()  # in [-1, 1]
        # Rounded values lie in [-(L-1)/2, (L-1)/2] for odd L and [-L/2, L/2 - 1] for even L.
        indices = ((rounded.long() + levels // 2) * basis).sum(-1)
        return QuantizerOutput(quantized=codes, indices=indices, metrics=usage_metrics(indices, self.codebook_size))

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        indices = self.check_indices(indices)
        levels, basis = self._grid(indices.device)
        ids = (indices[..., None] // basis) % levels  # (..., dim)
        return (ids - levels // 2).float() / (levels // 2).float()

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.shape[-1] != self.dim:
            raise ValueError(f"codes must be (..., {self.dim}), got {tuple(codes.shape)}")
        levels, basis = self._grid(codes.device)
        ids = torch.round(codes.float() * (levels // 2).float()).long() + levels // 2
        if (ids < 0).any() or (ids >= levels).any():
            raise ValueError("codes do not lie on the FSQ grid")
        return (ids * basis).sum(-1)
