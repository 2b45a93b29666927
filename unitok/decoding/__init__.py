"""Decoding algorithms: sampling, CFG, the block decoder, speculative Jacobi decoding and its relatives.

Every decoder has the signature of :func:`unitok.decoding.block.decode_blocks` (model, layout, prefix ids, visual
head, guidance, null prefix, sampling, generator) plus its own keyword options, returns a ``DecodeResult`` and is
picked by name: ``UnitokPipeline(..., decoder="sjd")``, ``unitok generate --decoder sjd``.
"""

from __future__ import annotations

from collections.abc import Callable

DECODER_MODULES: dict[str, str] = {
    "block": "unitok.decoding.block:decode_blocks",  # one forward per block of the mode (plain AR for next-token)
    "sjd": "unitok.decoding.sjd:decode_sjd",  # speculative Jacobi decoding, lossless (next-token)
    "grouped": "unitok.decoding.relaxed:decode_grouped",  # GSD-style group acceptance, lossy, bounded
    "relaxed": "unitok.decoding.relaxed:decode_relaxed",  # LANTERN-style latent-neighbour acceptance, delta-bounded
    "draft": "unitok.decoding.draft:decode_draft",  # speculative decoding with a small draft model, lossless
    "hf": "unitok.decoding.hf:decode_hf",  # transformers' model.generate + unitok's logits processors (next-token)
}
NEEDS_CODES = {"grouped", "relaxed"}  # decoders that read the tokenizer's code vectors
PRUNABLE = {"block", "sjd", "grouped", "relaxed", "draft", "hf"}  # decoders that take ``prune`` (cancelled rows)


def get_decoder(name: str) -> Callable:
    """The decoding function registered under ``name``."""
    import importlib

    if name not in DECODER_MODULES:
        raise ValueError(f"unknown decoder {name!r}; choose one of {sorted(DECODER_MODULES)}")
    module, attr = DECODER_MODULES[name].split(":")
    return getattr(importlib.import_module(module), attr)
