"""A generator folder: the transformer, its vocabulary, its visual spec and its tokenizer, saved and loaded as one.

Layout of a saved generator (what ``UnitokPipeline.from_pretrained`` and the trainers read)::

    config.json              UnitokConfig + "visual" (VisualSpec) + "vocabulary" (condition slot, class names)
    model.safetensors        Llama-named weights
    tokenizer.json           the text/condition tokenizer (HF tokenizers; AutoTokenizer loads it)
    tokenizer_config.json
    *_unitok.py              the model's source, so trust_remote_code loads it where unitok is not installed
    visual_tokenizer/        the unitok tokenizer (config.json + model.safetensors)

``AutoModelForCausalLM.from_pretrained(folder)`` loads the transformer alone. Folders are written to a temporary
sibling and renamed into place, so a failed save never leaves a half-written generator.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unitok.model.configuration import UnitokConfig
from unitok.model.modeling import UnitokForCausalLM
from unitok.model.remote import export_remote_code
from unitok.model.visual import VisualCodec, VisualSpec
from unitok.model.vocab import UnitokVocabulary

TOKENIZER_DIR = "visual_tokenizer"
GENERATION_DEFAULTS = {"guidance_scale": 2.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@dataclass
class Generator:
    model: UnitokForCausalLM
    vocab: UnitokVocabulary
    codec: VisualCodec

    generation: dict = field(default_factory=dict)  # recommended sampling settings (config.json "generation")

    @property
    def spec(self) -> VisualSpec:
        return self.codec.spec

    def sampling_defaults(self) -> dict:
        """guidance_scale, temperature, top_k, top_p this generator recommends (chosen by FD when it was bundled)."""
        return {**GENERATION_DEFAULTS, **(self.generation or {})}

    def layout(self):
        return self.spec.layout(self.vocab.prefix_len)

    @property
    def visual(self):
        """The :class:`~unitok.model.heads.VisualVocab` head: vocabulary slice, or bitwise for ``visual_bits``."""
        from unitok.model.heads import VisualVocab

        vocab = self.vocab
        bits = int(getattr(self.model.config, "visual_bits", 0) or 0)
        return VisualVocab(vocab.visual_offset, vocab.num_visual_tokens, vocab.boi_id, bits)

    @torch.no_grad()
    def generate_tokens(
        self,
        conditions: list,
        guidance_scale: float = 1.0,
        sampling=None,
        generator: torch.Generator | None = None,
        decoder: str = "block",
        **decoder_options,
    ):
        """Conditions (class indices, class names, prompts, or None) -> ``DecodeResult`` of (B, N) visual tokens,
        decoded by the decoder registered as ``decoder`` (see :mod:`unitok.decoding`)."""
        from unitok.decoding import NEEDS_CODES, get_decoder

        decode = get_decoder(decoder)
        if decoder in NEEDS_CODES and "codes" not in decoder_options:
            decoder_options["codes"] = self.codec.code_table()
        vocab = self.vocab
        return decode(
            self.model,
            self.layout(),
            vocab.prefix_ids(list(conditions)),
            self.visual,
            guidance_scale=guidance_scale,
            null_prefix_ids=vocab.prefix_ids([None]),
            sampling=sampling,
            generator=generator,
            **decoder_options,
        )


def check_pair(model: UnitokForCausalLM, vocab: UnitokVocabulary, codec: VisualCodec) -> None:
    """A model, vocabulary and tokenizer fit together, or a ValueError saying which part does not."""
    if vocab.num_visual_tokens != codec.codebook_size:
        raise ValueError(
            f"the tokenizer has {codec.codebook_size} codes but the generator was trained on "
            f"{vocab.num_visual_tokens}: this tokenizer does not belong to this model"
        )
    bits = int(getattr(model.config, "visual_bits", 0) or 0)
    if bits:
        if vocab.num_visual_tokens != 1 << bits:
            raise ValueError(
                f"a bitwise model over {bits} bits needs a {bits}-bit tokenizer, got {vocab.num_visual_tokens} codes"
            )
        if model.config.vocab_size < vocab.text_vocab_size:
            raise ValueError(
                f"the model's vocabulary ({model.config.vocab_size}) is smaller than its text ({vocab.text_vocab_size})"
            )
        return
    if model.config.vocab_size < vocab.vocab_size:
        raise ValueError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than text + visual ({vocab.vocab_size})"
        )


def save_generator(
    path: str | Path,
    generator: Generator,
    extra_files: dict[str, str] | None = None,
    weights_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``generator`` to ``path`` atomically (replacing an existing folder only once the new one is complete).

    ``weights_dtype=torch.float16`` halves the file (bundled checkpoints); loading upcasts to float32 again."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        model = generator.model
        model.config.visual = generator.spec.to_dict()
        model.config.vocabulary = generator.vocab.to_config()
        model.config.generation = generator.sampling_defaults()
        model.config.bos_token_id = generator.vocab.bos_id
        model.config.eos_token_id = generator.vocab.eoi_id
        model.config.pad_token_id = generator.vocab.pad_id
        state = None
        if weights_dtype is not None:
            state = {
                k: v.detach().to(weights_dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()
            }
            if model.config.tie_word_embeddings:
                state.pop("lm_head.weight", None)  # the cast copies lose the tie; store the shared matrix once
        model.save_pretrained(tmp, state_dict=state)
        export_remote_code(tmp)  # AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) without unitok
        generator.vocab.save(tmp)
        generator.codec.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def read_generator_config(path: Path, missing: type[Exception] = FileNotFoundError) -> dict:
    """``path/config.json`` of a generator folder as a dict; ``missing`` is raised when there is none, ValueError
    for a corrupt file or another model type."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise missing(f"no generator at {path}: {config_file} is missing")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt generator config {config_file}: {err}") from err
    if raw.get("model_type") != UnitokConfig.model_type:
        raise ValueError(f"{path} holds a {raw.get('model_type')!r} model, not a unitok generator")
    return raw


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load a generator folder with clear errors for missing, foreign, corrupt or mismatched parts."""
    from safetensors import SafetensorError

    from unitok.tokenizers import load_tokenizer

    path = Path(path)
    raw = read_generator_config(path)
    config_file = path / "config.json"
    if "visual" not in raw or "vocabulary" not in raw:
        raise ValueError(
            f"{path} is a bare unitok transformer without 'visual'/'vocabulary' entries; save it with "
            "unitok.model.pretrained.save_generator (the training scripts do)"
        )
    spec = VisualSpec.from_dict(raw["visual"])
    vocab = UnitokVocabulary.load(path, raw["vocabulary"])
    tokenizer = load_tokenizer(path / TOKENIZER_DIR)
    try:
        model = UnitokForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"cannot load the generator weights in {path}: {err}") from err
    codec = VisualCodec(tokenizer.to(device), spec)
    check_pair(model, vocab, codec)
    generation = raw.get("generation") or {}
    unknown = set(generation) - set(GENERATION_DEFAULTS)
    if unknown:
        raise ValueError(
            f"{config_file}: unknown generation settings {sorted(unknown)}; known: {sorted(GENERATION_DEFAULTS)}"
        )
    return Generator(model.to(device).eval(), vocab, codec, dict(generation))
