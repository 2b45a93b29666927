"""Shared machinery of the binary quantizers (LFQ and BSQ): sign quantization, exact index <-> bits <-> codes
conversions, and the grouped entropy regulariser.

Both quantizers map each of ``bits`` channels to one bit (bit = value > 0) and the code to ``scale * (2 bit - 1)``
(LFQ: scale 1; BSQ: 1/sqrt(bits)). A code id is ``sum_i bit_i 2^i`` as int64; with ``index_groups`` G > 1 the
bits are cut into G little-endian chunks and ``indices`` has a trailing axis of G ids, which is how codebooks of
2^64 or 2^128 codes stay addressable (an int64 holds at most 62 bits here).

The entropy regulariser of MAGVIT-v2 (Yu et al., 2023, "Language Model Beats Diffusion") is
``E[H(p(c|z))] - gamma * H(E[p(c|z)])`` with a distance-based softmax ``p(c|z) ~ exp(-inv_temperature ||x - c||^2)``
over all codes. Over 2^bits codes that table cannot exist; as in BSQ (Zhao et al., 2024, "Image and Video
Tokenization with Binary Spherical Quantization") we split the bits into groups of at most
``entropy_group_size`` bits, form the soft assignment over each group's 2^g sub-codes, and sum the group
entropies. Nothing of size 2^bits is ever allocated: memory is O(tokens * groups * 2^g).

What is ours:

* The entropy is computed on unit-scale values x (LFQ: z; BSQ: sqrt(bits) * z/||z||) against codes in {-1, +1}, so
  ``inv_temperature`` means the same thing for both quantizers and for every ``bits`` (for BSQ this is the
  paper's formula with its inverse temperature multiplied by ``bits``).
* Groups have near-equal sizes (18 bits with groups of at most 8 -> 6 + 6 + 6), so no group is a tiny remainder.
* The per-sample entropy is computed in closed form: the softmax over a group's sub-codes factorises into
  independent bits, so it equals the sum of per-bit binary entropies (exact, and no (N, groups, 2^g) log table).
* Batch metrics that stay meaningful for 2^128 codebooks: ``bit_balance`` (mean fraction of ones, ideally 0.5),
  ``bit_imbalance`` (mean |fraction of ones - 0.5| over bits, ideally 0), ``usage`` and ``perplexity`` of the
  per-group sub-codes (averaged over groups), ``per_sample_entropy`` and ``codebook_entropy`` (nats, summed over
  groups).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unitok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, straight_through

MAX_INDEX_BITS = 62
MAX_ENTROPY_GROUP_SIZE = 16
_CHUNK_ELEMENTS = 1 << 22  # soft-assignment entries per chunk when no gradient is needed


def _check_number(name: str, value: object, low: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _group_blocks(bits: int, max_size: int) -> list[tuple[int, int, int]]:
    """Split ``bits`` into ceil(bits / max_size) near-equal groups -> [(start, n_groups, group_size)], <= 2 blocks."""
    n = -(-bits // max_size)
    small, extra = divmod(bits, n)  # ``extra`` groups of small + 1 bits, then n - extra groups of ``small`` bits
    blocks = []
    if extra:
        blocks.append((0, extra, small + 1))
    if n - extra:
        blocks.append((extra * (small + 1), n - extra, small))
    return blocks


def _sub_codes(size: int) -> torch.Tensor:
    """(2^size, size) codes in {-1, +1}; row j holds the little-endian bits of j."""
    j = torch.arange(1 << size)[:, None]
    return (((j >> torch.arange(size)) & 1) * 2 - 1).float()


class BinaryQuantizer(Quantizer):
    """Base class of LFQ and BSQ. Subclasses set ``code_scale`` and implement ``to_unit`` (z -> unit-scale x)."""

    code_scale: float = 1.0

    def __init__(
        self,
        bits: int,
        entropy_weight: float = 0.1,
        commitment_weight: float = 0.25,
        diversity_gamma: float = 1.0,
        entropy_group_size: int = 8,
        index_groups: int = 1,
        inv_temperature: float = 1.0,
    ):
        super().__init__()
        _check_number("bits", bits, 1, integer=True)
        _check_number("entropy_weight", entropy_weight, 0.0)
        _check_number("commitment_weight", commitment_weight, 0.0)
        _check_number("diversity_gamma", diversity_gamma, 0.0)
        _check_number("entropy_group_size", entropy_group_size, 1, integer=True)
        _check_number("index_groups", index_groups, 1, integer=True)
        _check_number("inv_temperature", inv_temperature, 0.0)
        if entropy_group_size > MAX_ENTROPY_GROUP_SIZE:
            raise ValueError(
                f"entropy_group_size must be <= {MAX_ENTROPY_GROUP_SIZE} (memory grows as 2^size per token), "
                f"got {entropy_group_size}"
            )
        if bits % index_groups:
            raise ValueError(f"bits ({bits}) must be divisible by index_groups ({index_groups})")
        if bits // index_groups > MAX_INDEX_BITS:
            raise ValueError(
                f"{bits // index_groups} bits per index do not fit an int64 id (at most {MAX_INDEX_BITS}); "
                f"use index_groups={default_index_groups(bits)} (or more, dividing bits={bits})"
            )
        self.bits = bits
        self.dim = bits
        self.entropy_weight = float(entropy_weight)
        self.commitment_weight = float(commitment_weight)
        self.diversity_gamma = float(diversity_gamma)
        self.entropy_group_size = entropy_group_size
        self.index_groups = index_groups
        self.index_bits = bits // index_groups
        self.inv_temperature = float(inv_temperature)
        self.entropy_blocks = _group_blocks(bits, entropy_group_size)
        # Plain tensors, not buffers: transformers' from_pretrained builds modules on the meta device and does not
        # restore non-persistent buffers, which would leave these tables as garbage after loading.
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @property
    def codebook_size(self) -> int:
        return 1 << self.bits

    @property
    def bits_per_token(self) -> float:
        return float(self.bits)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, index_groups={self.index_groups}, entropy_group_size={self.entropy_group_size}, "
            f"entropy_weight={self.entropy_weight}, commitment_weight={self.commitment_weight}"
        )

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (..., bits) -> the values whose signs are the bits, at the scale of codes in {-1, +1}."""
        raise NotImplementedError

    # --- forward --------------------------------------------------------------------------------------------
    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        x = self.to_unit(z)  # (..., bits)
        bits = x.detach() > 0
        hard = bits.float() * 2 - 1
        quantized = straight_through(x, hard) * self.code_scale
        flat = x.reshape(-1, self.bits)  # (N, bits)
        per_sample, codebook_entropy = self.entropy_terms(flat)
        losses = {
            "commitment": self.commitment_weight * F.mse_loss(x, hard),
            "entropy": self.entropy_weight * (per_sample - self.diversity_gamma * codebook_entropy),
        }
        metrics = self.bit_metrics(bits.reshape(-1, self.bits))
        metrics["per_sample_entropy"] = per_sample.detach()
        metrics["codebook_entropy"] = codebook_entropy.detach()
        return QuantizerOutput(
            quantized=quantized, indices=self._bits_to_indices(bits.long()), losses=losses, metrics=metrics
        )

    def _table(self, name: str, device: torch.device) -> torch.Tensor:
        """Constant tables ("shifts": bit positions of an index; "sub_codes_g": the 2^g corners), per device."""
        key = (name, device)
        if key not in self._tables:
            if name == "shifts":
                table = torch.arange(self.index_bits, dtype=torch.long)
            else:
                table = _sub_codes(int(name.rsplit("_", 1)[1]))
            self._tables[key] = table.to(device)
        return self._tables[key]

    def entropy_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, bits) unit-scale values -> (mean per-sample entropy, codebook entropy), nats summed over groups."""
        if x.shape[0] == 0:
            zero = x.sum() * 0
            return zero, zero
        # Per-bit logit of p(bit = 1): softmax over {+1, -1} of -t ||x - c||^2 gives sigmoid(4 t x).
        logit = 4 * self.inv_temperature * x
        p = torch.sigmoid(logit)
        # H(sigmoid(a)) = p softplus(-a) + (1 - p) softplus(a), stable for large |a|.
        per_bit = p * F.softplus(-logit) + (1 - p) * F.softplus(logit)
        per_sample = per_bit.sum(-1).mean()
        codebook = x.new_zeros(())
        for start, n_groups, size in self.entropy_blocks:
            block = x[:, start : start + n_groups * size].reshape(-1, n_groups, size)  # (N, G, g)
            codes = self._table(f"sub_codes_{size}", x.device).t() * (2 * self.inv_temperature)  # (g, 2^g)
            # Without autograd (encoding, evaluation) the (N, G, 2^g) soft assignment is summed in row chunks.
            grad = torch.is_grad_enabled() and x.requires_grad
            rows = block.shape[0] if grad else max(1, _CHUNK_ELEMENTS // (n_groups << size))
            # softmax over c of -t ||x - c||^2 = softmax of 2 t x.c (||x||^2 and ||c||^2 are constant over c)
            total = sum(torch.softmax(chunk @ codes, dim=-1).sum(0) for chunk in block.split(rows))  # (G, 2^g)
            avg = total / block.shape[0]
            codebook = codebook - (avg * avg.clamp_min(1e-12).log()).sum()
        return per_sample, codebook

    @torch.no_grad()
    def bit_metrics(self, bits: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, bits) bool -> bit balance and per-group sub-code usage/perplexity of this batch."""
        ones = bits.float().mean(0) if bits.shape[0] else bits.new_zeros(self.bits, dtype=torch.float)  # (bits,)
        usage, perplexity, groups = bits.new_zeros((), dtype=torch.float), bits.new_zeros((), dtype=torch.float), 0
        for start, n_groups, size in self.entropy_blocks:
            block = bits[:, start : start + n_groups * size].reshape(-1, n_groups, size).long()  # (N, G, g)
            sub = (block << torch.arange(size, device=bits.device)).sum(-1)  # (N, G) sub-code ids
            sub = sub + (torch.arange(n_groups, device=bits.device) << size)  # offset each group's ids
            counts = torch.bincount(sub.reshape(-1), minlength=n_groups << size).float().reshape(n_groups, -1)
            p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
            usage = usage + (counts > 0).float().mean(-1).sum()
            perplexity = perplexity + torch.exp(-(p * p.clamp_min(1e-12).log()).sum(-1)).sum()
            groups += n_groups
        return {
            "bit_balance": ones.mean(),
            "bit_imbalance": (ones - 0.5).abs().mean(),
            "usage": usage / groups,
            "perplexity": perplexity / groups,
        }

    # --- conversions ----------------------------------------------------------------------------------------
    def check_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Validate ids: (...) in [0, 2^bits), or (..., index_groups) in [0, 2^(bits / index_groups))."""
        if not torch.is_tensor(indices) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise ValueError(f"indices must be an integer tensor, got {getattr(indices, 'dtype', type(indices))}")
        if self.index_groups > 1 and (indices.dim() == 0 or indices.shape[-1] != self.index_groups):
            raise ValueError(
                f"with index_groups={self.index_groups} indices must be (..., {self.index_groups}), "
                f"got shape {tuple(indices.shape)}"
            )
        indices = indices.long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= 1 << self.index_bits):
            raise ValueError(
                f"indices must lie in [0, 2^{self.index_bits}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        return indices

    def _check_bits(self, bits: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(bits) or bits.is_floating_point() or bits.is_complex():
            raise ValueError(
                f"bits must be an integer or bool tensor of zeros and ones, got {getattr(bits, 'dtype', bits)}"
            )
        if bits.dim() == 0 or bits.shape[-1] != self.bits:
            raise ValueError(f"bits must be (..., {self.bits}), got shape {tuple(bits.shape)}")
        bits = bits.long()
        if bits.numel() and ((bits != 0) & (bits != 1)).any():
            raise ValueError("bits must contain only zeros and ones")
        return bits

    def _bits_to_indices(self, bits: torch.Tensor) -> torch.Tensor:
        grouped = bits.reshape(*bits.shape[:-1], self.index_groups, self.index_bits)  # (..., G, b)
        ids = (grouped << self._table("shifts", bits.device)).sum(-1)  # (..., G); distinct powers of 2: exact
        return ids.squeeze(-1) if self.index_groups == 1 else ids

    def bits_to_indices(self, bits: torch.Tensor) -> torch.Tensor:
        """(..., bits) in {0, 1} -> (...) int64 ids (or (..., index_groups))."""
        return self._bits_to_indices(self._check_bits(bits))

    def indices_to_bits(self, indices: torch.Tensor) -> torch.Tensor:
        """(...) ids (or (..., index_groups)) -> (..., bits) int64 in {0, 1}."""
        indices = self.check_indices(indices)
        if self.index_groups == 1:
            indices = indices[..., None]
        bits = (indices[..., None] >> self._table("shifts", indices.device)) & 1  # (..., G, b)
        return bits.reshape(*bits.shape[:-2], self.bits)

    def bits_to_codes(self, bits: torch.Tensor) -> torch.Tensor:
        """(..., bits) in {0, 1} -> (..., bits) float codes ``scale * (2 bit - 1)``."""
        return (self._check_bits(bits).float() * 2 - 1) * self.code_scale

    def codes_to_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., bits) codes -> (..., bits) int64 bits (the sign of each channel; > 0 is 1)."""
        if not torch.is_tensor(codes) or not codes.is_floating_point() or codes.shape[-1:] != (self.bits,):
            raise ValueError(f"codes must be a float tensor (..., {self.bits}), got {getattr(codes, 'shape', codes)}")
        return (codes.detach() > 0).long()

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        return self.bits_to_codes(self.indices_to_bits(indices))

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        return self._bits_to_indices(self.codes_to_bits(codes))


def default_index_groups(bits: int) -> int:
    """The smallest ``index_groups`` that divides ``bits`` and keeps each id within an int64."""
    return next(g for g in range(1, bits + 1) if bits % g == 0 and bits // g <= MAX_INDEX_BITS)


__all__ = ["BinaryQuantizer", "default_index_groups"]
