"""Visual tokenizers (pixels <-> discrete tokens): quantizers, multi-scale, 1D, binary, video.

Every tokenizer is a Hugging Face ``PreTrainedModel`` with its own config class, registered with ``AutoConfig``
and ``AutoModel`` so ``AutoModel.from_pretrained(path)`` (or :func:`load_tokenizer`) loads any saved one.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel

from unitok.tokenizers.base import (
    TokenizerOutput,
    UnitokTokenizer,
    UnitokTokenizerConfig,
    clips_to_pixel_values,
    to_pixel_values,
    to_uint8,
    to_unit_range,
)
from unitok.tokenizers.baseline import BaselineTokenizer, BaselineTokenizerConfig
from unitok.tokenizers.binary import BinaryTokenizer, BinaryTokenizerConfig
from unitok.tokenizers.flex1d import Flex1DTokenizer, Flex1DTokenizerConfig
from unitok.tokenizers.multiscale import MultiScaleTokenizer, MultiScaleTokenizerConfig
from unitok.tokenizers.video import VideoTokenizer, VideoTokenizerConfig

TOKENIZERS: dict[str, type[UnitokTokenizer]] = {
    "baseline": BaselineTokenizer,
    "binary": BinaryTokenizer,
    "multiscale": MultiScaleTokenizer,
    "flex1d": Flex1DTokenizer,
    "video": VideoTokenizer,
}

for _cls in TOKENIZERS.values():
    AutoConfig.register(_cls.config_class.model_type, _cls.config_class, exist_ok=True)
    AutoModel.register(_cls.config_class, _cls, exist_ok=True)


def load_tokenizer(path: str | Path) -> UnitokTokenizer:
    """Load a saved unitok tokenizer (any kind) in eval mode, with clear errors for wrong or damaged folders."""
    import json

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: {config_file} is missing")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt tokenizer config {config_file}: {err}") from err
    by_type = {cls.config_class.model_type: cls for cls in TOKENIZERS.values()}
    if model_type not in by_type:
        raise ValueError(f"{path} holds a {model_type!r} model, not a unitok tokenizer ({sorted(by_type)})")
    from safetensors import SafetensorError

    try:
        model = by_type[model_type].from_pretrained(path)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"cannot load the tokenizer weights in {path}: {err}") from err
    return model.eval()


__all__ = [
    "TOKENIZERS",
    "BaselineTokenizer",
    "BaselineTokenizerConfig",
    "BinaryTokenizer",
    "BinaryTokenizerConfig",
    "Flex1DTokenizer",
    "Flex1DTokenizerConfig",
    "MultiScaleTokenizer",
    "MultiScaleTokenizerConfig",
    "TokenizerOutput",
    "UnitokTokenizer",
    "UnitokTokenizerConfig",
    "VideoTokenizer",
    "VideoTokenizerConfig",
    "clips_to_pixel_values",
    "load_tokenizer",
    "to_pixel_values",
    "to_uint8",
    "to_unit_range",
]
