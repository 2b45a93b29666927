"""The single-scale baseline: a convolutional autoencoder with one quantizer over the latent grid.

VQGAN's layout (Esser et al., 2021) without the GAN: Encoder2D -> 1x1 projection to the quantizer's dimension ->
quantize every latent position -> 1x1 projection back -> Decoder2D. With FSQ this is the reference every other
tokenizer's numbers are read against; any quantizer from ``unitok.tokenizers.quantizers`` plugs in. Tokens are the
(B, h, w) grid of code ids in raster order; any input size divisible by the downsampling factor works.
"""

from __future__ import annotations

import torch
from torch import nn

from unitok.tokenizers.base import TokenizerOutput, UnitokTokenizer, UnitokTokenizerConfig
from unitok.tokenizers.modules import Decoder2D, Encoder2D, downsample_factor
from unitok.tokenizers.quantizers import build_quantizer


class BaselineTokenizerConfig(UnitokTokenizerConfig):
    model_type = "unitok_baseline_tokenizer"
    kind = "baseline"

    def __init__(
        self,
        channels: int = 64,
        channel_mults: list[int] | tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 64,
        **kwargs,
    ):
        self.channels = int(channels)
        self.channel_mults = [int(m) for m in channel_mults]
        self.num_res_blocks = int(num_res_blocks)
        self.z_channels = int(z_channels)
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive integers, got {channel_mults}")
        super().__init__(**kwargs)


class BaselineTokenizer(UnitokTokenizer):
    config_class = BaselineTokenizerConfig

    def __init__(self, config: BaselineTokenizerConfig):
        super().__init__(config)
        c = config
        self.encoder = Encoder2D(c.in_channels, c.channels, c.channel_mults, c.num_res_blocks, c.z_channels)
        self.decoder = Decoder2D(c.in_channels, c.channels, c.channel_mults, c.num_res_blocks, c.z_channels)
        self.quantizer = build_quantizer(c.quantizer)
        self.quant_proj = nn.Conv2d(c.z_channels, self.quantizer.dim, 1)
        self.post_quant_proj = nn.Conv2d(self.quantizer.dim, c.z_channels, 1)
        self.post_init()

    @property
    def factor(self) -> int:
        return downsample_factor(self.config.channel_mults)

    @property
    def token_grid(self) -> tuple[int, int]:
        h, w = self.config.image_size
        return (h // self.factor, w // self.factor)

    def tokens_per_image(self) -> int:
        h, w = self.token_grid
        return h * w

    def _quantize(self, pixel_values: torch.Tensor):
        x = self.check_pixel_values(pixel_values, multiple=self.factor)
        z = self.quant_proj(self.encoder(x)).permute(0, 2, 3, 1)  # (B, h, w, D)
        return self.quantizer(z)

    def _decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) quantizer codes -> (B, C, H, W) pixel values."""
        return self.decoder(self.post_quant_proj(codes.permute(0, 3, 1, 2)))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, h, w) int64 code ids."""
        return self._quantize(pixel_values).indices

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code ids -> (B, C, H, W) pixel values (unclamped; clamp to [-1, 1] for display)."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, h, w), got shape {tuple(tokens.shape)}")
        return self._decode_codes(self.quantizer.indices_to_codes(self.check_tokens(tokens)))

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        q = self._quantize(pixel_values)
        return TokenizerOutput(
            reconstruction=self._decode_codes(q.quantized), tokens=q.indices, losses=q.losses, metrics=q.metrics
        )
