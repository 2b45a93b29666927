"""A causal video tokenizer: MAGVIT-v2's causal 3-D CNN (Yu et al., 2024) with Cosmos-style factorised blocks.

Every 3-D convolution is padded only on the past side in time (by repeating the first frame), and every norm is
taken per frame, so a latent frame never depends on a later input frame. The first frame is encoded on its own and
each later group of ``temporal_factor`` frames becomes one latent frame: T = 1 + n * temporal_factor frames give
1 + n latent frames, so a clip's first frame is tokenized exactly like an image. Space is compressed by
``spatial_factor``: a lossless pixel-unshuffle patcher (Cosmos uses a Haar wavelet for the same job) followed by
strided convolutions. Any quantizer from ``unitok.tokenizers.quantizers`` quantizes the latent grid.

Streaming: :class:`CausalCache` carries, for each causal convolution, the last input frames it still needs, so a
clip can be encoded (and decoded) chunk by chunk; the result equals whole-clip encoding because a whole clip is
the special case of one chunk (see ``encode(..., chunk_frames=N)``).

What is ours: the sizes (tuned to train on two CPU cores), residual depth-to-time upsampling in the decoder
(MAGVIT-v2's depth-to-space in time plus a repeated-frame shortcut, as Cosmos's temporal upsampler) and an
average-pool shortcut in the temporal downsampler, which make the untrained network pass frames through.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from unitok.tokenizers.base import TokenizerOutput, UnitokTokenizer, UnitokTokenizerConfig
from unitok.tokenizers.quantizers import build_quantizer

DEFAULT_QUANTIZER = {"type": "fsq", "levels": [8, 8, 8, 5, 5, 5]}


class VideoTokenizerConfig(UnitokTokenizerConfig):
    """``spatial_factor`` = ``patch_size`` * 2 ** (len(channel_mults) - 1); ``num_frames`` is the default clip length
    (1 + n * ``temporal_factor``) that ``tokens_per_image`` counts for."""

    model_type = "unitok_video_tokenizer"
    kind = "video"

    def __init__(
        self,
        in_channels: int = 1,
        image_size: list[int] | tuple[int, int] | int = (64, 64),
        num_frames: int = 9,
        temporal_factor: int = 2,
        spatial_factor: int = 4,
        patch_size: int = 2,
        channels: int = 64,
        channel_mults: list[int] | tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        temporal_kernel: int = 3,
        quantizer: dict | None = None,
        **kwargs,
    ):
        self.num_frames = int(num_frames)
        self.temporal_factor = int(temporal_factor)
        self.spatial_factor = int(spatial_factor)
        self.patch_size = int(patch_size)
        self.channels = int(channels)
        self.channel_mults = [int(m) for m in channel_mults]
        self.num_res_blocks = int(num_res_blocks)
        self.temporal_kernel = int(temporal_kernel)
        if self.temporal_factor < 1:
            raise ValueError(f"temporal_factor must be >= 1, got {temporal_factor}")
        if self.patch_size < 1 or self.channels < 1 or self.num_res_blocks < 0 or self.temporal_kernel < 1:
            raise ValueError(
                "patch_size, channels and temporal_kernel must be >= 1 and num_res_blocks >= 0, got "
                f"{patch_size}, {channels}, {temporal_kernel}, {num_res_blocks}"
            )
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(f"channel_mults must be positive integers, got {channel_mults}")
        expected = self.patch_size * 2 ** (len(self.channel_mults) - 1)
        if self.spatial_factor != expected:
            raise ValueError(
                f"spatial_factor {spatial_factor} must equal patch_size * 2 ** (len(channel_mults) - 1) = "
                f"{self.patch_size} * 2 ** {len(self.channel_mults) - 1} = {expected}"
            )
        if self.num_frames < 1 or (self.num_frames - 1) % self.temporal_factor:
            raise ValueError(f"num_frames must be 1 + n * temporal_factor ({self.temporal_factor}), got {num_frames}")
        super().__init__(
            in_channels=in_channels,
            image_size=image_size,
            quantizer=quantizer if quantizer is not None else dict(DEFAULT_QUANTIZER),
            **kwargs,
        )
        if self.image_size[0] % self.spatial_factor or self.image_size[1] % self.spatial_factor:
            raise ValueError(f"image_size {self.image_size} must divide by spatial_factor {self.spatial_factor}")


class CausalCache:
    """Streaming state: for each causal layer, the trailing input frames the next chunk still needs.

    A fresh cache means "start of a clip" (the first frame is padded by repetition and encoded alone). Reuse one
    cache for the chunks of one clip, in order; use a separate cache for the encoder and for the decoder.
    """

    def __init__(self):
        self.tensors: dict[nn.Module, torch.Tensor] = {}
        self.frames = 0  # input frames (encoder) or latent frames (decoder) consumed so far

    def __repr__(self) -> str:
        return f"CausalCache(frames={self.frames}, layers={len(self.tensors)})"


class CausalConv3d(nn.Module):
    """Conv3d with ``kernel = (kt, kh, kw)`` padded by kt - 1 repeated first frames in time, "same" in space.

    With temporal stride s, T = 1 + n * s frames give 1 + n outputs; output i sees input frames
    i * s - (kt - 1) .. i * s. Streaming keeps the last kt - s padded input frames, which is exactly the overlap
    between consecutive windows, so chunked and whole-clip outputs are computed from the same inputs.
    """

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        if kt < stride[0]:
            raise ValueError(f"temporal kernel {kt} must be >= temporal stride {stride[0]}")
        self.time_pad, self.keep = kt - 1, kt - stride[0]
        self.conv = nn.Conv3d(cin, cout, kernel, stride, padding=(0, kh // 2, kw // 2))

    def pad(self, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, past + T, H, W) with the past frames from the cache or the first frame."""
        past = cache.tensors.get(self) if cache is not None else None
        if past is None:
            past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
        xp = torch.cat([past, x], dim=2) if past.shape[2] else x
        if cache is not None:
            cache.tensors[self] = xp[:, :, xp.shape[2] - self.keep :].clone()  # a copy: do not pin the whole chunk
        return xp

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.conv(self.pad(x, cache))


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (channels, H, W) of each frame separately: a norm over time would leak the future."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        g = x.reshape(b, self.num_groups, c // self.num_groups, t, h, w)
        var, mean = torch.var_mean(g, dim=(2, 4, 5), correction=0, keepdim=True)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.reshape(b, c, t, h, w) * self.weight[:, None, None, None] + self.bias[:, None, None, None]


def _norm(channels: int) -> FrameGroupNorm:
    return FrameGroupNorm(8 if channels % 8 == 0 else 1, channels, eps=1e-6)


class CausalResBlock(nn.Module):
    """Pre-norm residual block: a (kt, 3, 3) causal conv that mixes time, then a per-frame (1, 3, 3) conv."""

    def __init__(self, cin: int, cout: int, temporal_kernel: int):
        super().__init__()
        self.norm1, self.norm2 = _norm(cin), _norm(cout)
        self.conv1 = CausalConv3d(cin, cout, (temporal_kernel, 3, 3))
        self.conv2 = CausalConv3d(cout, cout, (1, 3, 3))
        self.skip = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return (self.skip(x, cache) if self.skip is not None else x) + h


class SpatialDownsample(CausalConv3d):
    def __init__(self, channels: int):
        super().__init__(channels, channels, (1, 3, 3), (1, 2, 2))


class SpatialUpsample(CausalConv3d):
    def __init__(self, channels: int):
        super().__init__(channels, channels, (1, 3, 3))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return super().forward(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"), cache)


class TemporalDownsample(nn.Module):
    """Frames 0 | 1..s | s+1..2s | ... -> one latent frame each: a stride-s causal conv plus a causal average."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, (factor, 3, 3), (factor, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        xp = self.conv.pad(x, cache)  # kernel == stride, so windows are the non-overlapping blocks of s frames
        pooled = F.avg_pool3d(xp, (self.factor, 1, 1), (self.factor, 1, 1))
        return self.conv.conv(xp) + pooled


class TemporalUpsample(nn.Module):
    """Depth-to-time: each latent frame becomes s frames (channels -> time), plus the latent frame repeated.

    The first latent frame of a clip yields only its last output frame, mirroring the encoder's lone first frame.
    """

    def __init__(self, channels: int, factor: int, temporal_kernel: int):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels * factor, (temporal_kernel, 3, 3))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        start = cache is None or self.conv not in cache.tensors
        b, c, t, h, w = x.shape
        y = self.conv(x, cache).reshape(b, c, self.factor, t, h, w).transpose(2, 3).reshape(b, c, t * self.factor, h, w)
        y = y + x.repeat_interleave(self.factor, dim=2)  # (B, C, t * s, H, W)
        return y[:, :, self.factor - 1 :] if start else y


class CausalSequential(nn.ModuleList):
    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, cache) if not isinstance(layer, nn.SiLU | FrameGroupNorm) else layer(x)
        return x


def _channels(config: VideoTokenizerConfig) -> list[int]:
    return [config.channels * m for m in config.channel_mults]


class CausalEncoder3D(nn.Module):
    """(B, C * p^2, T, H/p, W/p) patches -> (B, dim, 1 + (T-1)/s, H/f, W/f) latents."""

    def __init__(self, config: VideoTokenizerConfig, out_channels: int):
        super().__init__()
        chans, kt = _channels(config), config.temporal_kernel
        cin = config.in_channels * config.patch_size**2
        layers: list[nn.Module] = [CausalConv3d(cin, chans[0], (kt, 3, 3))]
        cin = chans[0]
        for level, cout in enumerate(chans):
            for _ in range(config.num_res_blocks):
                layers.append(CausalResBlock(cin, cout, kt))
                cin = cout
            if level < len(chans) - 1:
                layers.append(SpatialDownsample(cin))
        if config.temporal_factor > 1:
            layers.append(TemporalDownsample(cin, config.temporal_factor))
        layers += [CausalResBlock(cin, cin, kt), _norm(cin), nn.SiLU(), CausalConv3d(cin, out_channels, (1, 1, 1))]
        self.layers = CausalSequential(layers)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.layers(x, cache)


class CausalDecoder3D(nn.Module):
    """(B, dim, t, h, w) codes -> (B, C * p^2, 1 + (t-1) * s, h * f/p, w * f/p) patches."""

    def __init__(self, config: VideoTokenizerConfig, in_channels: int):
        super().__init__()
        chans, kt = _channels(config), config.temporal_kernel
        cin = chans[-1]
        layers: list[nn.Module] = [CausalConv3d(in_channels, cin, (kt, 3, 3)), CausalResBlock(cin, cin, kt)]
        if config.temporal_factor > 1:
            layers.append(TemporalUpsample(cin, config.temporal_factor, kt))
        for level in reversed(range(len(chans))):
            for _ in range(config.num_res_blocks):
                layers.append(CausalResBlock(cin, chans[level], kt))
                cin = chans[level]
            if level > 0:
                layers.append(SpatialUpsample(cin))
        out = config.in_channels * config.patch_size**2
        layers += [_norm(cin), nn.SiLU(), CausalConv3d(cin, out, (1, 3, 3))]
        self.layers = CausalSequential(layers)

    def forward(self, z: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return self.layers(z, cache)


class VideoTokenizer(UnitokTokenizer):
    """Causal video tokenizer: (B, T, C, H, W) clips <-> (B, t, h, w) token ids, t = 1 + (T - 1) / temporal_factor."""

    config_class = VideoTokenizerConfig

    def __init__(self, config: VideoTokenizerConfig):
        super().__init__(config)
        self.quantizer = build_quantizer(config.quantizer)
        self.encoder = CausalEncoder3D(config, self.quantizer.dim)
        self.decoder = CausalDecoder3D(config, self.quantizer.dim)
        self.post_init()

    # --- what the AR model and the benchmarks need to know -------------------------------------------------
    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def compression(self) -> tuple[int, int, int]:
        """(time, height, width) downsampling factors of the token grid (the first frame is kept alone)."""
        return (self.temporal_factor, self.spatial_factor, self.spatial_factor)

    @property
    def token_grid(self) -> tuple[int, int]:
        h, w = self.config.image_size
        return (h // self.spatial_factor, w // self.spatial_factor)

    def num_latent_frames(self, num_frames: int) -> int:
        """1 + (T - 1) / temporal_factor; ValueError unless T = 1 + n * temporal_factor."""
        self._check_num_frames(num_frames)
        return 1 + (num_frames - 1) // self.temporal_factor

    def num_frames_for(self, num_latent_frames: int) -> int:
        """The clip length that ``num_latent_frames`` latent frames decode to."""
        if num_latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {num_latent_frames}")
        return 1 + (num_latent_frames - 1) * self.temporal_factor

    def latent_shape(self, num_frames: int | None = None) -> tuple[int, int, int]:
        """(t, h, w) token grid of a clip of ``num_frames`` frames (default: the config's) at the config's size."""
        return (self.num_latent_frames(num_frames or self.config.num_frames), *self.token_grid)

    def tokens_per_clip(self, num_frames: int | None = None) -> int:
        return math.prod(self.latent_shape(num_frames))

    def tokens_per_image(self) -> int:
        """Tokens of one clip of the config's default ``num_frames``."""
        return self.tokens_per_clip(self.config.num_frames)

    # --- validation -------------------------------------------------------------------------------------------
    def _check_num_frames(self, num_frames: int, first_chunk: bool = True) -> None:
        s = self.temporal_factor
        if first_chunk and (num_frames < 1 or (num_frames - 1) % s):
            raise ValueError(
                f"clips must have 1 + n * temporal_factor frames (1, {1 + s}, {1 + 2 * s}, ...), got {num_frames}"
            )
        if not first_chunk and (num_frames < 1 or num_frames % s):
            raise ValueError(f"chunks after the first must have a positive multiple of {s} frames, got {num_frames}")

    def _check_clip(self, pixel_values: torch.Tensor, first_chunk: bool = True) -> torch.Tensor:
        x = self.check_pixel_values(pixel_values, video=True, multiple=self.spatial_factor)
        self._check_num_frames(x.shape[1], first_chunk)
        return x

    def _check_video_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        groups = int(getattr(self.quantizer, "index_groups", 1))
        want = 4 if groups == 1 else 5
        if not torch.is_tensor(tokens) or tokens.dim() != want or (want == 5 and tokens.shape[-1] != groups):
            layout = "(B, t, h, w)" if groups == 1 else f"(B, t, h, w, {groups})"
            raise ValueError(f"tokens must be {layout}, got shape {tuple(getattr(tokens, 'shape', ()))}")
        if min(tokens.shape[:4]) < 1:
            raise ValueError(f"tokens must be non-empty, got shape {tuple(tokens.shape)}")
        return self.check_tokens(tokens)

    # --- the network ------------------------------------------------------------------------------------------
    def _patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) -> (B, C * p^2, T, H/p, W/p), lossless."""
        b, t = x.shape[:2]
        y = F.pixel_unshuffle(x.flatten(0, 1), self.config.patch_size)  # (B*T, C*p^2, H/p, W/p)
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)

    def _unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C * p^2, T, h, w) -> (B, T, C, H, W)."""
        b, _, t = y.shape[:3]
        x = F.pixel_shuffle(y.transpose(1, 2).flatten(0, 1), self.config.patch_size)  # (B*T, C, H, W)
        return x.reshape(b, t, *x.shape[1:])

    def _quantize(self, x: torch.Tensor, cache: CausalCache | None = None):
        z = self.encoder(self._patchify(x), cache)  # (B, D, t, h, w)
        return self.quantizer(z.permute(0, 2, 3, 4, 1))  # codes (B, t, h, w, D)

    def _decode_codes(self, codes: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """(B, t, h, w, D) codes -> (B, T, C, H, W) pixel values."""
        return self._unpatchify(self.decoder(codes.permute(0, 4, 1, 2, 3), cache))

    # --- public API -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """(B, T, C, H, W) in [-1, 1], T = 1 + n * temporal_factor -> (B, t, h, w) int64 code ids.

        ``chunk_frames`` (a multiple of ``temporal_factor``) streams the clip: the first chunk is frame 0 plus the
        next ``chunk_frames`` frames, then ``chunk_frames`` at a time, through one :class:`CausalCache`.
        """
        x = self._check_clip(pixel_values)
        if chunk_frames is None:
            return self._quantize(x).indices
        if chunk_frames < 1 or chunk_frames % self.temporal_factor:
            raise ValueError(f"chunk_frames must be a positive multiple of {self.temporal_factor}, got {chunk_frames}")
        cache = CausalCache()
        bounds = [0, *range(1 + chunk_frames, x.shape[1], chunk_frames), x.shape[1]]
        return torch.cat([self.encode_chunk(x[:, a:b], cache) for a, b in pairwise(bounds)], 1)

    @torch.no_grad()
    def encode_chunk(self, pixel_values: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Stream one chunk: the first chunk has 1 + n * temporal_factor frames, later ones m * temporal_factor."""
        x = self._check_clip(pixel_values, first_chunk=cache.frames == 0)
        tokens = self._quantize(x, cache).indices
        cache.frames += x.shape[1]
        return tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, chunk_latents: int | None = None) -> torch.Tensor:
        """(B, t, h, w) code ids -> (B, 1 + (t - 1) * temporal_factor, C, H, W) pixel values (unclamped).

        ``chunk_latents`` streams the decoder ``chunk_latents`` latent frames at a time (same result)."""
        tokens = self._check_video_tokens(tokens)
        if chunk_latents is None:
            return self._decode_codes(self.quantizer.indices_to_codes(tokens))
        if chunk_latents < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        cache = CausalCache()
        chunks = [
            self.decode_chunk(tokens[:, a : a + chunk_latents], cache) for a in range(0, tokens.shape[1], chunk_latents)
        ]
        return torch.cat(chunks, 1)

    @torch.no_grad()
    def decode_chunk(self, tokens: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Stream the decoder: latent frames in order through one cache; the first chunk's first latent frame
        gives one frame, every other latent frame ``temporal_factor`` frames."""
        tokens = self._check_video_tokens(tokens)
        frames = self._decode_codes(self.quantizer.indices_to_codes(tokens), cache)
        cache.frames += tokens.shape[1]
        return frames

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        q = self._quantize(self._check_clip(pixel_values))
        return TokenizerOutput(
            reconstruction=self._decode_codes(q.quantized), tokens=q.indices, losses=q.losses, metrics=q.metrics
        )


__all__ = ["CausalCache", "CausalConv3d", "VideoTokenizer", "VideoTokenizerConfig"]
