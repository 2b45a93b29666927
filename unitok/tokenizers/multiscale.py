"""The multi-scale residual tokenizer for next-scale prediction (VAR, Tian et al., 2024).

The encoder's latent f (B, Cz, h, w) is quantized as a sum over a schedule of scales s_1 < ... < s_K = (h, w):
at scale k the remaining residual is area-downsampled to s_k, quantized with one codebook shared by every scale,
upsampled back to (h, w), refined by a small convolution phi_k and added to the running reconstruction f_hat.
The decoder reads f_hat. With a binary quantizer (BSQ/LFQ) this becomes Infinity's bitwise multi-scale tokenizer.

What is ours: VAR never released its tokenizer training code; this module trains end to end with any quantizer,
any aspect ratio (the schedule is rescaled to the input's latent grid), and exposes what the AR model needs:
per-scale token maps (``encode_scales``), the flat scale-ordered sequence (``encode``) and the teacher-forcing
inputs for every next scale (``next_scale_inputs``: the accumulated f_hat after scales 1..k, resized to s_{k+1}).
phi_k follows VAR's shared-phi idea: ``num_phi`` convolutions are shared across scales by relative depth, each
blending as (1 - r) * x + r * conv(x) with r = ``phi_ratio``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unitok.tokenizers.base import TokenizerOutput, UnitokTokenizer, UnitokTokenizerConfig
from unitok.tokenizers.modules import Decoder2D, Encoder2D, downsample_factor
from unitok.tokenizers.quantizers import build_quantizer

Scale = tuple[int, int]


class MultiScaleTokenizerConfig(UnitokTokenizerConfig):
    model_type = "unitok_multiscale_tokenizer"
    kind = "multiscale"

    def __init__(
        self,
        scales: list | tuple = (1, 2, 3, 4, 5, 7),
        channels: int = 64,
        channel_mults: list[int] | tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 32,
        num_phi: int = 4,
        phi_ratio: float = 0.5,
        quantizer: dict | None = None,
        **kwargs,
    ):
        parsed = [[int(s), int(s)] if isinstance(s, int) else [int(v) for v in s] for s in scales]
        if not parsed or any(len(s) != 2 or min(s) < 1 for s in parsed):
            raise ValueError(f"scales must be ints or (h, w) pairs >= 1, got {scales}")
        if any(b[0] < a[0] or b[1] < a[1] for a, b in zip(parsed, parsed[1:], strict=False)):
            raise ValueError(f"scales must not shrink, got {parsed}")
        self.scales = parsed
        self.channels = int(channels)
        self.channel_mults = [int(m) for m in channel_mults]
        self.num_res_blocks = int(num_res_blocks)
        self.z_channels = int(z_channels)
        self.num_phi = int(num_phi)
        self.phi_ratio = float(phi_ratio)
        if self.num_phi < 1 or not 0 <= self.phi_ratio <= 1:
            raise ValueError(f"num_phi must be >= 1 and phi_ratio in [0, 1], got {num_phi}, {phi_ratio}")
        quantizer = quantizer if quantizer is not None else {"type": "vq", "codebook_size": 1024, "dim": 32}
        super().__init__(quantizer=quantizer, **kwargs)
        factor = downsample_factor(self.channel_mults)
        grid = [s // factor for s in self.image_size]
        if self.scales[-1] != grid:
            raise ValueError(
                f"the last scale must be the latent grid {grid} (image_size / {factor}), got {self.scales[-1]}"
            )


class Phi(nn.Module):
    """x -> (1 - r) x + r conv3x3(x): VAR's residual refinement of an upsampled scale."""

    def __init__(self, channels: int, ratio: float):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.ratio = ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 - self.ratio) * x + self.ratio * self.conv(x)


class MultiScaleTokenizer(UnitokTokenizer):
    config_class = MultiScaleTokenizerConfig

    def __init__(self, config: MultiScaleTokenizerConfig):
        super().__init__(config)
        c = config
        self.encoder = Encoder2D(c.in_channels, c.channels, c.channel_mults, c.num_res_blocks, c.z_channels)
        self.decoder = Decoder2D(c.in_channels, c.channels, c.channel_mults, c.num_res_blocks, c.z_channels)
        self.quantizer = build_quantizer(c.quantizer)
        self.quant_proj = nn.Conv2d(c.z_channels, self.quantizer.dim, 1)
        self.post_quant_proj = nn.Conv2d(self.quantizer.dim, c.z_channels, 1)
        self.phis = nn.ModuleList(Phi(self.quantizer.dim, c.phi_ratio) for _ in range(c.num_phi))
        self.post_init()

    # --- schedule ------------------------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        return downsample_factor(self.config.channel_mults)

    def scale_schedule(self, latent_hw: Scale | None = None) -> list[Scale]:
        """The configured schedule, rescaled proportionally when the latent grid differs (any aspect ratio)."""
        scales = [tuple(s) for s in self.config.scales]
        if latent_hw is None or tuple(latent_hw) == scales[-1]:
            return scales
        last_h, last_w = scales[-1]
        h, w = latent_hw
        out = [(max(1, round(sh * h / last_h)), max(1, round(sw * w / last_w))) for sh, sw in scales[:-1]]
        out = [s for i, s in enumerate(out) if i == 0 or s != out[i - 1]]
        return [s for s in out if s[0] <= h and s[1] <= w and s != (h, w)] + [(h, w)]

    def tokens_per_image(self) -> int:
        return sum(h * w for h, w in self.scale_schedule())

    def _phi(self, k: int, num_scales: int) -> Phi:
        idx = round(k / max(1, num_scales - 1) * (len(self.phis) - 1))
        return self.phis[idx]

    # --- residual quantization -----------------------------------------------------------------------------
    def _latent(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.check_pixel_values(pixel_values, multiple=self.factor)
        return self.quant_proj(self.encoder(x))  # (B, D, h, w)

    def _quantize_scales(self, f: torch.Tensor):
        """Residual quantization of f (B, D, h, w): per-scale ids, f_hat with straight-through grads, losses."""
        h, w = f.shape[-2:]
        schedule = self.scale_schedule((h, w))
        init = getattr(self.quantizer, "init_codebook", None)
        if self.training and init is not None and not bool(self.quantizer.initted):
            # Seed a learned codebook from full-resolution latents, not from the B vectors of the 1x1 scale.
            init(f.detach().permute(0, 2, 3, 1))
        f_hat = torch.zeros_like(f)
        residual = f
        ids, losses, metrics = [], {}, {}
        for k, (sh, sw) in enumerate(schedule):
            r = F.interpolate(residual, size=(sh, sw), mode="area") if (sh, sw) != (h, w) else residual
            q = self.quantizer(r.permute(0, 2, 3, 1))  # (B, sh, sw, D)
            ids.append(q.indices)
            up = self._upsample(q.quantized.permute(0, 3, 1, 2), (h, w))
            f_hat = f_hat + self._phi(k, len(schedule))(up)
            residual = f - f_hat
            for name, value in q.losses.items():
                losses[name] = losses.get(name, 0) + value / len(schedule)
            for name, value in q.metrics.items():
                metrics[name] = metrics.get(name, 0) + value / len(schedule)
        return ids, f_hat, losses, metrics

    @staticmethod
    def _upsample(x: torch.Tensor, size: Scale) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        return F.interpolate(x, size=size, mode="bicubic", align_corners=False)

    def _fhat_from_ids(self, ids: list[torch.Tensor], size: Scale) -> list[torch.Tensor]:
        """Accumulated f_hat after each scale: [f_hat_1, ..., f_hat_K], each (B, D, h, w)."""
        f_hat, out = None, []
        for k, idx in enumerate(ids):
            codes = self.quantizer.indices_to_codes(self.check_tokens(idx)).permute(0, 3, 1, 2)
            step = self._phi(k, len(ids))(self._upsample(codes, size))
            f_hat = step if f_hat is None else f_hat + step
            out.append(f_hat)
        return out

    # --- public API ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_scales(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Per-scale token maps [(B, h_1, w_1), ..., (B, h_K, w_K)]."""
        return self._quantize_scales(self._latent(pixel_values))[0]

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L) ids, scales concatenated coarse to fine, each in raster order."""
        return self.scales_to_tokens(self.encode_scales(pixel_values))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Flat (B, L) ids (configured schedule) or a list of per-scale maps -> (B, C, H, W) pixel values."""
        ids = self.tokens_to_scales(tokens) if torch.is_tensor(tokens) else list(tokens)
        size = tuple(ids[-1].shape[-2:])
        self._check_schedule(ids)
        return self.decoder(self.post_quant_proj(self._fhat_from_ids(ids, size)[-1]))

    @torch.no_grad()
    def decode_partial(self, ids: list[torch.Tensor], size: Scale | None = None) -> torch.Tensor:
        """Decode the first k scales only (a coarse preview, as VAR shows during sampling)."""
        size = size or tuple(self.scale_schedule()[-1])
        return self.decoder(self.post_quant_proj(self._fhat_from_ids(list(ids), size)[-1]))

    @torch.no_grad()
    def next_scale_inputs(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Teacher-forcing inputs: for k = 1..K-1, f_hat after scales 1..k resized to s_{k+1}, as (B, h*w, D).

        The AR model reads these (projected to its width) to predict the ids of scale k+1, as in VAR.
        """
        self._check_schedule(ids)
        size = tuple(ids[-1].shape[-2:])
        f_hats = self._fhat_from_ids(ids, size)
        out = []
        for k in range(len(ids) - 1):
            nh, nw = ids[k + 1].shape[-2:]
            x = F.interpolate(f_hats[k], size=(nh, nw), mode="area") if (nh, nw) != size else f_hats[k]
            out.append(x.flatten(2).transpose(1, 2))  # (B, nh*nw, D)
        return out

    def scales_to_tokens(self, ids: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([i.flatten(1) for i in ids], dim=1)

    def tokens_to_scales(self, tokens: torch.Tensor, schedule: list[Scale] | None = None) -> list[torch.Tensor]:
        """Split flat (B, L) ids into per-scale maps of the (configured) schedule."""
        schedule = schedule or self.scale_schedule()
        total = sum(h * w for h, w in schedule)
        if tokens.dim() != 2 or tokens.shape[1] != total:
            raise ValueError(f"tokens must be (B, {total}) for the schedule {schedule}, got {tuple(tokens.shape)}")
        parts = torch.split(tokens, [h * w for h, w in schedule], dim=1)
        return [p.reshape(tokens.shape[0], h, w) for p, (h, w) in zip(parts, schedule, strict=True)]

    def _check_schedule(self, ids: list[torch.Tensor]) -> None:
        if not ids:
            raise ValueError("no scales given")
        size = tuple(ids[-1].shape[-2:])
        expected = self.scale_schedule(size)
        got = [tuple(i.shape[-2:]) for i in ids]
        if got != expected:
            raise ValueError(f"scale maps {got} do not match the schedule {expected} for latent grid {size}")

    def forward(self, pixel_values: torch.Tensor) -> TokenizerOutput:
        ids, f_hat, losses, metrics = self._quantize_scales(self._latent(pixel_values))
        recon = self.decoder(self.post_quant_proj(f_hat))
        return TokenizerOutput(reconstruction=recon, tokens=self.scales_to_tokens(ids), losses=losses, metrics=metrics)
