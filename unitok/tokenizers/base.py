"""What every unitok visual tokenizer shares: its config base, its PreTrainedModel base and its output.

A tokenizer is a Hugging Face ``PreTrainedModel`` (``save_pretrained`` writes config.json + safetensors,
``from_pretrained`` loads, ``AutoModel.from_pretrained`` works after ``import unitok``) with a small public API:

- ``encode(pixel_values) -> tokens`` (int64) and ``decode(tokens) -> pixel_values``;
- ``forward(pixel_values) -> TokenizerOutput`` for training (reconstruction, tokens, losses, metrics).

Pixel values are float tensors in [-1, 1] (the diffusers / LlamaGen convention), images (B, C, H, W), video
(B, T, C, H, W); :func:`to_pixel_values` and :func:`to_uint8` convert from and to uint8 arrays. The quantizer
is described by a plain dict in the config (see ``unitok.tokenizers.quantizers.build_quantizer``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class UnitokTokenizerConfig(PretrainedConfig):
    """Fields every tokenizer has. Subclasses set ``model_type`` and add their own fields."""

    model_type = "unitok_tokenizer"
    kind = "base"

    # transformers 5 turns every config class into a dataclass whose generated __eq__ compares only the base
    # fields; ours live in __init__, so every subclass compares the full serialised form instead.
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__eq__ = UnitokTokenizerConfig._same_config
        cls.__hash__ = None

    def _same_config(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    __eq__ = _same_config
    __hash__ = None

    def __init__(
        self,
        in_channels: int = 1,
        image_size: list[int] | tuple[int, int] | int = (28, 28),
        quantizer: dict[str, Any] | None = None,
        **kwargs,
    ):
        self.in_channels = int(in_channels)
        size = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size}")
        self.image_size = [int(s) for s in size]
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.quantizer = dict(quantizer) if quantizer is not None else {"type": "fsq", "levels": [8, 5, 5, 5]}
        super().__init__(**kwargs)


@dataclass
class TokenizerOutput(ModelOutput):
    """``reconstruction``: pixel values like the input. ``tokens``: what ``encode`` returns.
    ``losses``: weighted quantizer losses (the training script adds reconstruction and perceptual terms).
    ``metrics``: detached diagnostics (codebook usage, perplexity, ...)."""

    reconstruction: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] | None = None
    metrics: dict[str, torch.Tensor] | None = None


class UnitokTokenizer(PreTrainedModel):
    """Base class; subclasses implement ``encode``, ``decode`` and ``forward`` and describe their tokens."""

    config_class = UnitokTokenizerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "tokenizer"
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []

    # --- what the AR model and the benchmarks need to know -------------------------------------------------
    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    def tokens_per_image(self) -> int:
        raise NotImplementedError

    def bits_per_token(self) -> float:
        return float(np.log2(self.codebook_size))

    # --- validation shared by every tokenizer --------------------------------------------------------------
    def check_pixel_values(self, pixel_values: torch.Tensor, video: bool = False, multiple: int = 1) -> torch.Tensor:
        """Validate (B, C, H, W) images (or (B, T, C, H, W) video) in [-1, 1]; sides must divide by ``multiple``."""
        want = 5 if video else 4
        layout = "(B, T, C, H, W)" if video else "(B, C, H, W)"
        if not torch.is_tensor(pixel_values):
            raise ValueError(f"pixel_values must be a torch tensor {layout}, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be float in [-1, 1], got {pixel_values.dtype}; convert uint8 images with "
                "unitok.tokenizers.to_pixel_values"
            )
        if pixel_values.dim() != want:
            raise ValueError(f"pixel_values must be {layout}, got shape {tuple(pixel_values.shape)}")
        channels = pixel_values.shape[-3]
        if channels != self.config.in_channels:
            raise ValueError(f"this tokenizer takes {self.config.in_channels}-channel input, got {channels} channels")
        h, w = pixel_values.shape[-2:]
        if h % multiple or w % multiple:
            raise ValueError(f"image sides must be multiples of {multiple}, got {h}x{w}; resize or pad the input")
        if pixel_values.numel() == 0:
            raise ValueError("pixel_values is empty")
        lo, hi = float(pixel_values.min()), float(pixel_values.max())
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"pixel_values must lie in [-1, 1], got [{lo:.3f}, {hi:.3f}]")
        param = next(self.parameters())
        return pixel_values.to(device=param.device, dtype=param.dtype)

    def check_tokens(self, tokens: torch.Tensor, trailing_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Validate int64 token ids in [0, codebook_size) with an optional required trailing shape."""
        if not torch.is_tensor(tokens) or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor, got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if trailing_shape is not None and tuple(tokens.shape[-len(trailing_shape) :]) != tuple(trailing_shape):
            raise ValueError(f"tokens must end in shape {tuple(trailing_shape)}, got {tuple(tokens.shape)}")
        return self.quantizer.check_indices(tokens.to(next(self.parameters()).device))

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Tokenizers keep PyTorch's default initialisation (set when each layer is built)."""


def to_pixel_values(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W) / (N, C, H, W) or clips (N, T, H, W) -> float32 in [-1, 1] with a channel axis.

    (N, H, W) becomes (N, 1, H, W); (N, T, H, W) with ``video`` semantics is not guessed: pass (N, T, 1, H, W)
    or use :func:`clips_to_pixel_values`.
    """
    x = torch.as_tensor(np.array(images) if isinstance(images, np.ndarray) else images)
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images in [0, 255], got {x.dtype}")
    if x.dim() == 3:
        x = x[:, None]
    return x.float() / 127.5 - 1.0


def clips_to_pixel_values(clips: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 clips (N, T, H, W) -> float32 (N, T, 1, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.array(clips) if isinstance(clips, np.ndarray) else clips)
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected uint8 clips (N, T, H, W), got {x.dtype} {tuple(x.shape)}")
    return x[:, :, None].float() / 127.5 - 1.0


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """Pixel values in [-1, 1] (any layout) -> uint8 numpy array of the same shape, rounded and clipped."""
    return ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def to_unit_range(pixel_values: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] (what ``unitok.eval`` metrics take)."""
    return (pixel_values.clamp(-1, 1) + 1) / 2
