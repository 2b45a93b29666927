"""The binary tokenizer: the baseline's convolutional autoencoder with a binary quantizer (LFQ or BSQ).

Each latent position becomes a d-bit code (d >= 16 by default), so the autoregressive model can predict the d
bits with a bitwise head (d binary logits, as Infinity does) instead of a 2^d-way softmax. Besides the integer
``encode``/``decode`` (ids = sum_i bit_i 2^i), it exposes ``encode_bits``/``decode_bits`` on (B, h, w, d) bit
tensors, which stay exact for any d (ids need ``index_groups`` once d > 62).
"""

from __future__ import annotations

import torch

from unitok.tokenizers.baseline import BaselineTokenizer, BaselineTokenizerConfig

BINARY_QUANTIZERS = ("lfq", "bsq")


class BinaryTokenizerConfig(BaselineTokenizerConfig):
    model_type = "unitok_binary_tokenizer"
    kind = "binary"

    def __init__(self, quantizer: dict | None = None, **kwargs):
        quantizer = dict(quantizer) if quantizer is not None else {"type": "bsq", "bits": 18}
        if quantizer.get("type") not in BINARY_QUANTIZERS:
            raise ValueError(f"the binary tokenizer needs a binary quantizer {BINARY_QUANTIZERS}, got {quantizer}")
        super().__init__(quantizer=quantizer, **kwargs)


class BinaryTokenizer(BaselineTokenizer):
    config_class = BinaryTokenizerConfig

    @property
    def bits(self) -> int:
        return self.quantizer.bits

    def bits_per_token(self) -> float:
        return float(self.bits)

    @torch.no_grad()
    def encode_bits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, h, w, bits) int64 in {0, 1}."""
        return self.quantizer.codes_to_bits(self._quantize(pixel_values).quantized)

    @torch.no_grad()
    def decode_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """(B, h, w, bits) in {0, 1} -> (B, C, H, W) pixel values."""
        if bits.dim() != 4 or bits.shape[-1] != self.bits:
            raise ValueError(f"bits must be (B, h, w, {self.bits}), got shape {tuple(bits.shape)}")
        if bits.is_floating_point() or ((bits != 0) & (bits != 1)).any():
            raise ValueError("bits must be an integer tensor of zeros and ones")
        return self._decode_codes(self.quantizer.bits_to_codes(bits.to(self.device)))
