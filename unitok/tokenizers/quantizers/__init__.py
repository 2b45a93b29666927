"""Quantizers, one algorithm per file, one interface (:class:`Quantizer`) and one result (:class:`QuantizerOutput`).

``build_quantizer({"type": "fsq", "levels": [8, 5, 5, 5]})`` builds one from the plain dict stored in a
tokenizer's config, so a saved tokenizer round-trips through ``config.json``.
"""

from __future__ import annotations

from typing import Any

from unitok.tokenizers.quantizers.base import Quantizer, QuantizerOutput
from unitok.tokenizers.quantizers.binary import BinaryQuantizer
from unitok.tokenizers.quantizers.bsq import BSQ
from unitok.tokenizers.quantizers.fsq import FSQ
from unitok.tokenizers.quantizers.lfq import LFQ
from unitok.tokenizers.quantizers.vq import VectorQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {"fsq": FSQ, "vq": VectorQuantizer, "lfq": LFQ, "bsq": BSQ}


def build_quantizer(spec: dict[str, Any]) -> Quantizer:
    """Build a quantizer from ``{"type": NAME, **kwargs}``; NAME is one of ``QUANTIZERS``."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f'a quantizer spec is a dict with a "type" key, got {spec!r}')
    kwargs = dict(spec)
    name = kwargs.pop("type")
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    try:
        return QUANTIZERS[name](**kwargs)
    except TypeError as err:
        raise ValueError(f"bad options for quantizer {name!r}: {err}") from err


__all__ = [
    "BSQ",
    "FSQ",
    "LFQ",
    "QUANTIZERS",
    "BinaryQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "VectorQuantizer",
    "build_quantizer",
]
