"""What the vLLM path needs to know about a next-token generator folder, read without importing vLLM.

The vLLM model file and :mod:`unitok.serving.vllm_engine` both need the same facts: the condition-slot length and
the null prefix (for the unconditional half of classifier-free guidance), where visual ids live in the vocabulary,
how many tokens an image has, the guidance scale, and the (t, h, w) MM-RoPE position of every sequence index. Because
the condition slot has a fixed length, a sequence index determines the token's role and its 3-D position, so vLLM's
plain 1-D positions are enough to reproduce the HF model exactly (see :mod:`unitok.model.vocab`).

Only next-token generators with a vocabulary head run in vLLM: one token per step is all vLLM schedules. Next-scale
and next-block blocks are built from earlier blocks' embeddings, and bitwise heads have no vocabulary to sample;
those stay on unitok's native decoders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from unitok.decoding.cfg import check_guidance_scale
from unitok.model.pretrained import GENERATION_DEFAULTS, read_generator_config
from unitok.model.visual import VisualSpec
from unitok.model.vocab import UnitokVocabulary


@dataclass(frozen=True)
class ImageSpec:
    """The sequence ``[BOS] slot(cond_len) [BOI] v_0 .. v_{N-1}`` of one next-token image, and its guidance."""

    prefix_len: int  # BOS + condition slot
    null_prefix_ids: tuple[int, ...]  # the null condition's prefix (what the unconditional half reads)
    boi_id: int
    visual_offset: int
    num_visual_tokens: int  # codebook size: visual ids are visual_offset .. visual_offset + num_visual_tokens - 1
    num_visual: int  # tokens per image
    vocab_size: int
    guidance_scale: float  # the engine's scale (with per_request_guidance: the scale of requests that name none)
    positions: torch.Tensor  # (3, prefix_len + num_visual) float MM-RoPE (t, h, w) of every sequence index
    per_request_guidance: bool = False  # each request brings its own scale (see unitok.serving.vllm_guidance)

    @property
    def prompt_len(self) -> int:
        """The prompt vLLM receives: prefix + BOI."""
        return self.prefix_len + 1

    @property
    def max_model_len(self) -> int:
        """Prompt + a whole image (the last visual token is sampled, never fed)."""
        return self.prompt_len + self.num_visual

    @property
    def guided(self) -> bool:
        """Whether the model runs the unconditional stream."""
        return self.per_request_guidance or self.guidance_scale != 1.0

    @classmethod
    def from_config(
        cls, config: Mapping | object, tokenizer_dir: str | Path, guidance_scale: float | None = None
    ) -> ImageSpec:
        """From a generator's config (``config.json`` as a dict, or a ``UnitokConfig`` with its extra entries) and
        the folder holding its ``tokenizer.json``. ``guidance_scale`` None reads ``generation.guidance_scale``;
        ``generation.per_request_guidance`` true lets every request bring its own scale."""

        def entry(name: str):
            return config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)

        visual, vocabulary = entry("visual"), entry("vocabulary")
        if not visual or not vocabulary:
            raise ValueError(
                f"{tokenizer_dir} is not a unitok generator: its config lacks the 'visual' / 'vocabulary' entries "
                "(save it with unitok.model.pretrained.save_generator)"
            )
        spec = VisualSpec.from_dict(dict(visual))
        if spec.mode != "next-token":
            raise ValueError(
                f"vLLM serves next-token generators; this one predicts {spec.mode} (use unitok's native engine)"
            )
        if int(entry("visual_bits") or 0):
            raise ValueError("vLLM needs a vocabulary head; this generator has a bitwise head (visual_bits > 0)")
        if int(entry("num_block_embeddings") or 0):
            raise ValueError("vLLM cannot add block embeddings; this generator has num_block_embeddings > 0")
        vocab = UnitokVocabulary.load(tokenizer_dir, dict(vocabulary))
        vocab_size = int(entry("vocab_size"))
        if vocab_size < vocab.vocab_size:
            raise ValueError(
                f"the model's vocabulary ({vocab_size}) is smaller than text + visual ({vocab.vocab_size})"
            )
        generation = entry("generation") or {}
        if guidance_scale is None:
            guidance_scale = generation.get("guidance_scale", GENERATION_DEFAULTS["guidance_scale"])
        layout = spec.layout(vocab.prefix_len)
        return cls(
            prefix_len=vocab.prefix_len,
            null_prefix_ids=tuple(vocab.prefix_ids([None])[0].tolist()),
            boi_id=vocab.boi_id,
            visual_offset=vocab.visual_offset,
            num_visual_tokens=vocab.num_visual_tokens,
            num_visual=layout.num_visual,
            vocab_size=vocab_size,
            guidance_scale=check_guidance_scale(guidance_scale),
            positions=layout.positions.clone(),
            per_request_guidance=bool(generation.get("per_request_guidance", False)),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, guidance_scale: float | None = None) -> ImageSpec:
        path = Path(path)
        return cls.from_config(read_generator_config(path, missing=ValueError), path, guidance_scale)

    def rope_positions(self, length: int) -> torch.Tensor:
        """(length, 3) float (t, h, w) for sequence indices 0..length-1: the layout's positions, then 1-D text
        positions past the image (where nothing is sampled, but vLLM may still index, e.g. speculative drafts)."""
        known = self.positions.shape[1]
        extra = torch.arange(known, max(known, length), dtype=torch.float32)[None].expand(3, -1)
        return torch.cat([self.positions, extra], dim=1)[:, :length].t().contiguous()

    def prompt(self, prefix_ids: Sequence[int]) -> list[int]:
        """A prefix (BOS + condition slot) -> the prompt vLLM generates an image from (prefix + BOI)."""
        ids = [int(i) for i in prefix_ids]
        if len(ids) != self.prefix_len:
            raise ValueError(f"a prefix has {self.prefix_len} ids (BOS + condition slot), got {len(ids)}")
        if ids[0] != self.null_prefix_ids[0]:
            raise ValueError(f"a prefix starts with BOS ({self.null_prefix_ids[0]}), got {ids[0]}")
        if any(not 0 <= i < self.visual_offset for i in ids):
            raise ValueError(f"prefix ids must be text ids in [0, {self.visual_offset}), got {ids}")
        return [*ids, self.boi_id]
