"""Lookup-Free Quantization (Yu et al., 2023, "Language Model Beats Diffusion: Tokenizer is Key to Visual
Generation", MAGVIT-v2).

Each of ``bits`` channels is quantized independently to its sign: code = sign(z) in {-1, +1}^bits, bit = z > 0,
id = sum_i bit_i 2^i. There is no codebook to look up; the implicit codebook has 2^bits entries. Gradients pass
straight through. Losses: ``commitment`` = commitment_weight * mean (z - sg(code))^2 and ``entropy`` =
entropy_weight * (per-sample entropy - diversity_gamma * codebook entropy) of a distance-based soft assignment.

What is ours: the codebook entropy is the grouped (factorised) approximation of BSQ (sum over groups of at most
``entropy_group_size`` bits), so no 2^bits table is ever built and 64- or 128-bit codes train as cheaply as
16-bit ones; exact bits <-> ids conversions with ``index_groups`` for codes wider than an int64. The shared
machinery lives in :mod:`unitok.tokenizers.quantizers.binary`.
"""

from __future__ import annotations

import torch

from unitok.tokenizers.quantizers.binary import BinaryQuantizer


class LFQ(BinaryQuantizer):
    """Sign quantizer on raw latents: ``dim == bits``, codes in {-1, +1}.

    Args: ``bits`` (code width; codebook_size = 2^bits), ``entropy_weight``, ``commitment_weight``,
    ``diversity_gamma`` (weight of the codebook-entropy term inside the entropy loss), ``entropy_group_size``
    (max bits per entropy group), ``index_groups`` (ids per token; bits / index_groups <= 62),
    ``inv_temperature`` (sharpness of the soft assignment ``exp(-inv_temperature ||z - c||^2)``).
    """

    code_scale = 1.0

    def to_unit(self, z: torch.Tensor) -> torch.Tensor:
        return z
