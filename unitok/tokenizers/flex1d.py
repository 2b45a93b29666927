"""The 1D flexible-length tokenizer: an image becomes an ordered sequence of K tokens, any prefix of which decodes.

The idea of TiTok (Yu et al., 2024, "An Image is Worth 32 Tokens for Reconstruction and Generation"), FlexTok
(Bachmann et al., 2025, "FlexTok: Resampling Images into 1D Token Sequences of Flexible Length") and One-D-Piece
(Miwa et al., 2025, "One-D-Piece: Image Tokenizer Meets Quality-Controllable Compression"):

- a ViT encoder reads the image patches together with K learned *register* tokens; the K register outputs are
  projected to the quantizer's dimension and quantized, giving a 1-D sequence of K ids (not a spatial grid);
- nested ("tail token") dropout in training keeps only the first k registers for a random k per sample, so the
  decoder must reconstruct from any prefix and the first tokens learn to carry the coarse content;
- a ViT decoder reads the k quantized registers plus one learned mask token per patch position and predicts the
  patches.

What is ours (choices sized for 28x28 grayscale on two CPU cores, where FlexTok uses a rectified-flow decoder and
TiTok a two-stage recipe): a plain MSE-trainable decoder that predicts pixels directly; dropped registers are
replaced by a learned *null* token rather than removed by an attention mask, so every sample in a batch has the
same sequence length and attention needs no mask (faster SDPA on CPU), and decoding a k-prefix is literally the
full decode with the tail set to null; k is drawn as K with probability ``nested_dropout_full_prob`` and otherwise
uniformly from 1..K (see :meth:`Flex1DTokenizer.sample_num_tokens`): uniform coverage trains every prefix length
the API accepts, the extra mass at K protects full-length quality, which is what generation uses by default.
The linear register<->patch mixes start near the identity (register k reads patch k, patch n reads token n), so
training begins from a per-patch autoencoder, which converges far faster than a random routing on two CPU cores,
and nested dropout then moves the image's coarse content into the first tokens. The encoder always sees all K
registers, so ``encode(x, num_tokens=k)`` is exactly the first k of ``encode(x)``.
Positions are learned (initialised to 2-D sin-cos) for ``config.image_size`` only; other sizes are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from unitok.tokenizers.base import TokenizerOutput, UnitokTokenizer, UnitokTokenizerConfig
from unitok.tokenizers.modules import Decoder2D, Encoder2D
from unitok.tokenizers.quantizers import build_quantizer


class Flex1DTokenizerConfig(UnitokTokenizerConfig):
    """Sizes of the 1D tokenizer. ``num_tokens`` is K, the full sequence length; ``hidden_size`` is shared by the
    encoder and decoder; ``nested_dropout_full_prob`` is the chance a training sample keeps all K tokens."""

    model_type = "unitok_flex1d_tokenizer"
    kind = "flex1d"

    def __init__(
        self,
        patch_size: int = 4,
        num_tokens: int = 32,
        hidden_size: int = 128,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_attention_heads: int = 4,
        mlp_ratio: float = 4.0,
        conv_channels: int = 32,
        conv_channel_mults: list[int] | tuple[int, ...] | None = None,
        nested_dropout: bool = True,
        nested_dropout_full_prob: float = 0.25,
        **kwargs,
    ):
        if kwargs.get("quantizer") is None:
            kwargs["quantizer"] = {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]}
        self.patch_size = int(patch_size)
        self.num_tokens = int(num_tokens)
        self.hidden_size = int(hidden_size)
        self.num_encoder_layers = int(num_encoder_layers)
        self.num_decoder_layers = int(num_decoder_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.mlp_ratio = float(mlp_ratio)
        self.conv_channels = int(conv_channels)
        levels = int(math.log2(self.patch_size)) + 1 if self.patch_size > 0 else 1
        mults = [1] * levels if conv_channel_mults is None else [int(m) for m in conv_channel_mults]
        self.conv_channel_mults = mults
        self.nested_dropout = bool(nested_dropout)
        self.nested_dropout_full_prob = float(nested_dropout_full_prob)
        for name in ("patch_size", "num_tokens", "hidden_size", "num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        if not 0.0 <= self.nested_dropout_full_prob <= 1.0:
            raise ValueError(f"nested_dropout_full_prob must lie in [0, 1], got {nested_dropout_full_prob}")
        super().__init__(**kwargs)
        if self.conv_channels < 0:
            raise ValueError(f"conv_channels must be >= 0 (0: linear patch embedding), got {conv_channels}")
        if self.conv_channels and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"a conv stem (conv_channels > 0) needs a power-of-two patch_size, got {self.patch_size}")
        if self.conv_channels and (
            len(self.conv_channel_mults) != int(math.log2(self.patch_size)) + 1 or min(self.conv_channel_mults) < 1
        ):
            raise ValueError(
                f"conv_channel_mults needs log2(patch_size) + 1 = {int(math.log2(self.patch_size)) + 1} positive "
                f"entries (one per resolution), got {self.conv_channel_mults}"
            )
        h, w = self.image_size
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image_size {h}x{w} must be divisible by patch_size {self.patch_size}")


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D sin-cos positions (MAE's recipe): half the channels per axis."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    ys, xs = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    parts = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        angle = pos[:, None].double() * omega[None]  # (N, quarter)
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, dim=1)  # (N, 4 * quarter)
    return F.pad(table, (0, dim - table.shape[1])).float()


class Flex1DAttention(nn.Module):
    def __init__(self, config: Flex1DTokenizerConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, d = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, N, hs)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hs)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class Flex1DMLP(nn.Module):
    def __init__(self, config: Flex1DTokenizerConfig):
        super().__init__()
        inner = int(config.hidden_size * config.mlp_ratio)
        self.up_proj = nn.Linear(config.hidden_size, inner)
        self.down_proj = nn.Linear(inner, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(hidden_states)))


class Flex1DBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: Flex1DTokenizerConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.self_attn = Flex1DAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)
        self.mlp = Flex1DMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Flex1DTransformer(nn.Module):
    def __init__(self, config: Flex1DTokenizerConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Flex1DBlock(config) for _ in range(num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.norm(hidden_states)


class ConvPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, d): the baseline's conv encoder (log2(p) stride-2 levels) as a patch stem."""

    def __init__(self, config: Flex1DTokenizerConfig):
        super().__init__()
        c = config
        self.net = Encoder2D(c.in_channels, c.conv_channels, c.conv_channel_mults, 1, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)  # (B, N, d)


class ConvPatchHead(nn.Module):
    """(B, N, d) on the (H/p, W/p) grid -> (B, C, H, W): the baseline's conv decoder, mirror of the stem."""

    def __init__(self, config: Flex1DTokenizerConfig):
        super().__init__()
        c = config
        self.net = Decoder2D(c.in_channels, c.conv_channels, c.conv_channel_mults, 1, c.hidden_size)
        self.grid = (c.image_size[0] // c.patch_size, c.image_size[1] // c.patch_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, n, d = hidden_states.shape
        return self.net(hidden_states.transpose(1, 2).reshape(b, d, *self.grid))  # (B, d, gh, gw) -> pixels


class Flex1DTokenizer(UnitokTokenizer):
    """Image <-> K ordered tokens; ``encode(x, num_tokens=k)`` / ``decode(tokens[:, :k])`` for any k in 1..K."""

    config_class = Flex1DTokenizerConfig

    def __init__(self, config: Flex1DTokenizerConfig):
        super().__init__(config)
        c = config
        d, p, k = c.hidden_size, c.patch_size, c.num_tokens
        gh, gw = c.image_size[0] // p, c.image_size[1] // p
        patch_dim = c.in_channels * p * p
        pos = sincos_2d(gh, gw, d)  # (N, d)
        self.quantizer = build_quantizer(c.quantizer)

        self.patch_embed = ConvPatchEmbed(c) if c.conv_channels else nn.Linear(patch_dim, d)
        self.encoder_pos = nn.Parameter(pos.clone())
        self.registers = nn.Parameter(torch.randn(k, d) * 0.02)  # also the encoder's register positions
        self.encoder_mix = nn.Linear(gh * gw, k, bias=False)
        self.encoder = Flex1DTransformer(c, c.num_encoder_layers)
        self.quant_proj = nn.Linear(d, self.quantizer.dim)

        self.post_quant_proj = nn.Linear(self.quantizer.dim, d)
        self.register_pos = nn.Parameter(torch.randn(k, d) * 0.02)
        self.null_token = nn.Parameter(torch.randn(d) * 0.02)
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)
        self.decoder_pos = nn.Parameter(pos.clone())
        self.decoder_mix = nn.Linear(k, gh * gw, bias=False)
        self.decoder = Flex1DTransformer(c, c.num_decoder_layers)
        self.patch_head = ConvPatchHead(c) if c.conv_channels else nn.Linear(d, patch_dim)
        self.post_init()
        with torch.no_grad():  # start as a per-patch autoencoder: register k reads patch k, patch n reads token n
            for mix in (self.encoder_mix, self.decoder_mix):
                mix.weight.mul_(0.1)
                eye = torch.eye(*mix.weight.shape)
                mix.weight.add_(eye)

    # --- what the AR model and the benchmarks need to know -------------------------------------------------
    def tokens_per_image(self) -> int:
        return self.config.num_tokens

    @property
    def patch_grid(self) -> tuple[int, int]:
        h, w = self.config.image_size
        return (h // self.config.patch_size, w // self.config.patch_size)

    # --- validation -------------------------------------------------------------------------------------------
    def _check_num_tokens(self, num_tokens: int | None) -> int:
        full = self.config.num_tokens
        if num_tokens is None:
            return full
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= full:
            raise ValueError(f"num_tokens must be an int in 1..{full} (this tokenizer's K), got {num_tokens!r}")
        return num_tokens

    def _check_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.check_pixel_values(pixel_values, multiple=self.config.patch_size)
        if list(x.shape[-2:]) != self.config.image_size:
            h, w = self.config.image_size
            raise ValueError(
                f"this tokenizer takes {h}x{w} images (its patch positions are learned for that grid), got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize the input"
            )
        return x

    def _index_shape(self) -> tuple[int, ...]:
        """Trailing shape of one token's ids: () usually, (groups,) for binary quantizers with index groups."""
        groups = int(getattr(self.quantizer, "index_groups", 1) or 1)
        return (groups,) if groups > 1 else ()

    # --- the two halves -------------------------------------------------------------------------------------
    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.config.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, gh, p, gw, p)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)  # (B, N, C*p*p)

    def _unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        b = patches.shape[0]
        p, c = self.config.patch_size, self.config.in_channels
        gh, gw = self.patch_grid
        x = patches.reshape(b, gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, gh, p, gw, p)
        return x.reshape(b, c, gh * p, gw * p)

    def _quantize(self, x: torch.Tensor):
        """Checked (B, C, H, W) -> QuantizerOutput over the K registers ((B, K, dim) codes, (B, K) ids)."""
        embedded = self.patch_embed(x if self.config.conv_channels else self._patchify(x))
        patches = embedded + self.encoder_pos  # (B, N, d)
        registers = self.registers + self.encoder_mix(patches.transpose(1, 2)).transpose(1, 2)  # (B, K, d)
        hidden = self.encoder(torch.cat([patches, registers], dim=1))  # (B, N + K, d)
        z = self.quant_proj(hidden[:, -self.config.num_tokens :])  # (B, K, dim)
        return self.quantizer(z)

    def _decode_codes(self, codes: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, k, dim) codes of a prefix (k <= K), optionally with a (B, K) keep mask -> (B, C, H, W)."""
        b, k = codes.shape[:2]
        full = self.config.num_tokens
        tokens = self.post_quant_proj(codes.to(self.post_quant_proj.weight.dtype))  # (B, k, d)
        if k < full:
            tokens = torch.cat([tokens, self.null_token.expand(b, full - k, -1)], dim=1)  # (B, K, d)
        if keep is not None:
            tokens = torch.where(keep[..., None], tokens, self.null_token)
        tokens = tokens + self.register_pos
        mixed = self.decoder_mix(tokens.transpose(1, 2)).transpose(1, 2)  # (B, N, d): what the tokens say per patch
        masks = self.mask_token + self.decoder_pos + mixed
        hidden = self.decoder(torch.cat([tokens, masks], dim=1))  # (B, K + N, d)
        if self.config.conv_channels:
            return self.patch_head(hidden[:, full:])
        return self._unpatchify(self.patch_head(hidden[:, full:]))

    def sample_num_tokens(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Nested-dropout lengths: K with probability ``nested_dropout_full_prob``, else uniform on 1..K. (B,)"""
        full = self.config.num_tokens
        device = self.registers.device
        uniform = torch.randint(1, full + 1, (batch_size,), generator=generator, device=device)
        keep_full = torch.rand(batch_size, generator=generator, device=device) < self.config.nested_dropout_full_prob
        return torch.where(keep_full, torch.full_like(uniform, full), uniform)

    # --- public API -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> (B, k) int64 ids, coarse to fine; k = ``num_tokens`` or K."""
        k = self._check_num_tokens(num_tokens)
        return self._quantize(self._check_images(pixel_values)).indices[:, :k]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, k) ids of any prefix length k in 1..K -> (B, C, H, W) pixel values (unclamped)."""
        trailing = self._index_shape()
        if not torch.is_tensor(tokens) or tokens.dim() != 2 + len(trailing):
            layout = "(B, k" + "".join(f", {g}" for g in trailing) + ")"
            raise ValueError(f"tokens must be {layout}, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        k = tokens.shape[1]
        if not 1 <= k <= self.config.num_tokens:
            raise ValueError(f"a token prefix must have length 1..{self.config.num_tokens}, got {k}")
        tokens = self.check_tokens(tokens, trailing_shape=trailing or None)
        return self._decode_codes(self.quantizer.indices_to_codes(tokens))

    def forward(self, pixel_values: torch.Tensor, num_tokens: int | None = None) -> TokenizerOutput:
        """Reconstruct from the first ``num_tokens`` tokens; in training with ``num_tokens=None`` each sample
        keeps a random prefix (nested dropout). ``tokens`` are always all K ids; ``losses`` are the quantizer's."""
        k = self._check_num_tokens(num_tokens)
        q = self._quantize(self._check_images(pixel_values))
        metrics = dict(q.metrics)
        if num_tokens is None and self.training and self.config.nested_dropout:
            lengths = self.sample_num_tokens(q.quantized.shape[0])  # (B,)
            keep = torch.arange(self.config.num_tokens, device=lengths.device) < lengths[:, None]  # (B, K)
            reconstruction = self._decode_codes(q.quantized, keep)
            metrics["mean_num_tokens"] = lengths.float().mean().detach()
        else:
            reconstruction = self._decode_codes(q.quantized[:, :k])
        return TokenizerOutput(reconstruction=reconstruction, tokens=q.indices, losses=q.losses, metrics=metrics)


__all__ = ["Flex1DTokenizer", "Flex1DTokenizerConfig"]
