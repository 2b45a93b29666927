"""What a generator knows about its pixels: the token grid, the prediction mode, and the tokenizer that maps both ways.

``VisualSpec`` is the part of a generator's ``config.json`` (key ``visual``) that fixes the layout: mode, block kind,
token grid (frames x height x width, or a multi-scale schedule) and the pixel size it decodes to. ``VisualCodec``
pairs a spec with a unitok tokenizer and turns pixels into the flat ``(B, N)`` canonical token order the modes use,
and back. A video generator may use a video tokenizer (tokens over latent frames) or an image tokenizer applied
frame by frame (one token grid per frame).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from unitok.model.modes import Layout, PredictionMode, TokenGrid, get_mode


@dataclass(frozen=True)
class VisualSpec:
    mode: str
    height: int
    width: int
    frames: int = 1
    scales: tuple[tuple[int, int], ...] | None = None
    block: str = "auto"
    image_size: tuple[int, int] = (28, 28)
    num_frames: int = 1  # pixel frames per sample (1 for images)
    time_scale: float = 1.0

    def __post_init__(self):
        if self.scales is not None:
            object.__setattr__(self, "scales", tuple(tuple(int(v) for v in s) for s in self.scales))
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        self.prediction_mode()  # validates mode and block
        self.grid  # validates the grid  # noqa: B018

    @property
    def grid(self) -> TokenGrid:
        return TokenGrid(self.frames, self.height, self.width, self.scales)

    @property
    def is_video(self) -> bool:
        return self.num_frames > 1

    @property
    def num_tokens(self) -> int:
        return self.grid.num_tokens

    def prediction_mode(self) -> PredictionMode:
        if self.mode == "next-block":
            return get_mode(self.mode, block=self.block)
        return get_mode(self.mode)

    def layout(self, prefix_len: int) -> Layout:
        mode = self.prediction_mode()
        mode.check_grid(self.grid)
        return Layout(mode, self.grid, prefix_len, time_scale=self.time_scale)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        d["scales"] = [list(s) for s in self.scales] if self.scales is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VisualSpec:
        if not isinstance(d, dict):
            raise ValueError(f"the generator config's 'visual' entry must be a dict, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown visual spec keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


class VisualCodec:
    """A tokenizer bound to a spec: pixels in [-1, 1] <-> flat (B, N) token ids in the mode's canonical order."""

    def __init__(self, tokenizer, spec: VisualSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        self.per_frame = spec.is_video and tokenizer.kind != "video"

    @classmethod
    def create(
        cls,
        tokenizer,
        mode: str,
        image_size: tuple[int, int] | int,
        num_frames: int = 1,
        block: str = "auto",
    ) -> VisualCodec:
        """Measure the token grid by encoding a blank input of the given size with ``tokenizer``."""
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        channels = tokenizer.config.in_channels
        video = num_frames > 1
        if video and tokenizer.kind == "video":
            tokens = tokenizer.encode(torch.zeros(1, num_frames, channels, *size))  # (1, t, h, w)
            frames, height, width = tokens.shape[1:]
            time_scale = float(tokenizer.config.temporal_factor)
        else:
            tokens = tokenizer.encode(torch.zeros(1, channels, *size))
            frames, time_scale = num_frames, 1.0
            if tokenizer.kind == "multiscale":
                scales = tuple(tuple(s) for s in tokenizer.scale_schedule(tokens_shape_hw(tokenizer, size)))
                spec = VisualSpec(mode, *scales[-1], 1, scales, block, size, num_frames, time_scale)
                return cls(tokenizer, spec)
            if tokens.dim() == 2:  # 1-D tokenizers: a row of tokens
                height, width = 1, tokens.shape[1]
            else:
                height, width = tokens.shape[1:]
        spec = VisualSpec(mode, int(height), int(width), int(frames), None, block, size, num_frames, time_scale)
        return cls(tokenizer, spec)

    @property
    def codebook_size(self) -> int:
        return int(self.tokenizer.codebook_size)

    @torch.no_grad()
    def code_table(self) -> torch.Tensor:
        """(V, D) the quantizer's code vector of every token id (for latent-neighbour decoders). Computed once and
        returned as the same tensor afterwards, so decoders can cache what they derive from it."""
        table = self.__dict__.get("_code_table")
        if table is None:
            with torch.no_grad():
                ids = torch.arange(self.codebook_size, device=next(self.tokenizer.parameters()).device)
                table = self.tokenizer.quantizer.indices_to_codes(ids).reshape(self.codebook_size, -1).float()
            self.__dict__["_code_table"] = table
        return table

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images or (B, T, C, H, W) clips in [-1, 1] -> (B, N) int64."""
        batch = pixel_values.shape[0]
        if self.per_frame:
            if pixel_values.dim() != 5:
                raise ValueError(f"expected clips (B, T, C, H, W), got shape {tuple(pixel_values.shape)}")
            tokens = self.tokenizer.encode(pixel_values.flatten(0, 1))
        else:
            tokens = self.tokenizer.encode(pixel_values)
        tokens = tokens.reshape(batch, -1)
        if tokens.shape[1] != self.spec.num_tokens:
            raise ValueError(
                f"these pixels give {tokens.shape[1]} tokens, the generator expects {self.spec.num_tokens} "
                f"({self.spec.num_frames} frame(s) of {self.spec.image_size})"
            )
        return tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (B, C, H, W) images or (B, T, C, H, W) clips, clamped to [-1, 1]."""
        spec = self.spec
        if tokens.dim() != 2 or tokens.shape[1] != spec.num_tokens:
            raise ValueError(f"tokens must be (B, {spec.num_tokens}), got shape {tuple(tokens.shape)}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.codebook_size:
            raise ValueError(
                f"token ids must lie in [0, {self.codebook_size}), got [{int(tokens.min())}, {int(tokens.max())}]"
            )
        batch = tokens.shape[0]
        kind = self.tokenizer.kind
        if kind == "multiscale":
            out = self.tokenizer.decode(tokens)
        elif kind == "flex1d":
            out = self.tokenizer.decode(tokens)
        elif kind == "video" and spec.is_video:
            out = self.tokenizer.decode(tokens.reshape(batch, spec.frames, spec.height, spec.width))
        elif self.per_frame:
            frames = tokens.reshape(batch * spec.frames, spec.height, spec.width)
            out = self.tokenizer.decode(frames)
            out = out.reshape(batch, spec.frames, *out.shape[1:])
        else:
            out = self.tokenizer.decode(tokens.reshape(batch, spec.height, spec.width))
        return out.clamp(-1, 1)


def tokens_shape_hw(tokenizer, size: tuple[int, int]) -> tuple[int, int]:
    """The finest latent grid of a multi-scale tokenizer at pixel size ``size``."""
    factor = tokenizer.factor
    return (size[0] // factor, size[1] // factor)
