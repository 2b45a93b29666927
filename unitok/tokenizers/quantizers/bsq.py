"""Binary Spherical Quantization (Zhao et al., 2024, "Image and Video Tokenization with Binary Spherical
Quantization").

The latent is projected onto the unit sphere, u = z / ||z||, and quantized to the nearest corner of the
hypercube inscribed in it: q = sign(u) / sqrt(bits), bit = u > 0, id = sum_i bit_i 2^i. Codes are unit vectors, so
the quantization error is bounded whatever the encoder outputs. Gradients pass straight through to u (and through
the normalisation to z). Losses: ``commitment`` = commitment_weight * mean_tokens ||u - sg(q)||^2 and the grouped
entropy regulariser of the paper (per-sample entropy - diversity_gamma * codebook entropy, each summed over groups
of at most ``entropy_group_size`` bits).

What is ours: the entropy is computed on sqrt(bits) * u against codes in {-1, +1}, so ``inv_temperature`` is
bits-independent and means the same as for LFQ (the paper's inverse temperature is ``inv_temperature * bits``);
the per-sample entropy is in closed form; exact bits <-> ids conversions with ``index_groups`` for codes wider
than an int64. The shared machinery lives in :mod:`unitok.tokenizers.quantizers.binary`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unitok.tokenizers.quantizers.binary import BinaryQuantizer


class BSQ(BinaryQuantizer):
    """Sign quantizer on the unit sphere: ``dim == bits``, codes in {-1/sqrt(bits), +1/sqrt(bits)}.

    Same arguments as :class:`~unitok.tokenizers.quantizers.lfq.LFQ`.
    """

    @property
    def code_scale(self) -> float:
        return 1.0 / math.sqrt(self.bits)

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        # sqrt(bits) * u: the hypercube corners sign(u) / sqrt(bits) become {-1, +1} at this scale.
        return F.normalize(z, dim=-1) * math.sqrt(self.bits)
