"""One vocabulary for text conditions and visual tokens.

Ids ``[0, text_vocab_size)`` belong to a word-level text tokenizer built with HF ``tokenizers`` (lower-cased,
split on whitespace and punctuation) whose first ids are the specials; visual token v has id
``visual_offset + v``. A sample's prefix is ``[BOS] + condition slot``: the slot has a fixed length
(``cond_len``, as LlamaGen pads captions), so every visual token sits at the same sequence index whatever the
prompt, which keeps positions identical between HF and vLLM. A class label is the prompt of its class name; the
null condition (for classifier-free guidance) is ``[NULL]`` followed by padding.

What is ours: the word-level choice. Conditions here are class names and short prompts; a word-level vocabulary
keeps each word one token, so the slot stays short and a prompt word the model never saw is reported as such
(fine-tune with it) rather than silently split into meaningless pieces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel

PAD, UNK, BOS, EOS, BOI, EOI, NULL = "<pad>", "<unk>", "<bos>", "<eos>", "<boi>", "<eoi>", "<null>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, BOI, EOI, NULL)


def _normalizer():
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def _pre_tokenizer():
    return pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+


def words_of(texts: Iterable[str]) -> list[str]:
    """The distinct words of ``texts`` after normalisation, in first-seen order."""
    norm, pre = _normalizer(), _pre_tokenizer()
    seen: dict[str, None] = {}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(norm.normalize_str(text)):
            seen.setdefault(word, None)
    return list(seen)


class UnitokVocabulary:
    """Text tokenizer + specials + visual id offset, and the condition-slot encoding."""

    def __init__(self, tokenizer: Tokenizer, num_visual_tokens: int, cond_len: int, class_names: Sequence[str] = ()):
        if num_visual_tokens < 1:
            raise ValueError(f"num_visual_tokens must be >= 1, got {num_visual_tokens}")
        if cond_len < 1:
            raise ValueError(f"cond_len must be >= 1, got {cond_len}")
        for token in SPECIAL_TOKENS:
            if tokenizer.token_to_id(token) is None:
                raise ValueError(f"the text tokenizer lacks the special token {token}")
        self.tokenizer = tokenizer
        self.num_visual_tokens = int(num_visual_tokens)
        self.cond_len = int(cond_len)
        self.class_names = list(class_names)
        for name in self.class_names:
            self._words(name)  # every class name must encode
            if len(self.tokenize(name)) > cond_len:
                raise ValueError(f"class name {name!r} needs more than cond_len={cond_len} tokens")

    @classmethod
    def build(
        cls, texts: Iterable[str], num_visual_tokens: int, cond_len: int = 8, class_names: Sequence[str] = ()
    ) -> UnitokVocabulary:
        """A vocabulary whose words are those of ``texts`` and ``class_names``."""
        vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        for word in words_of([*class_names, *texts]):
            vocab.setdefault(word, len(vocab))
        tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
        tokenizer.normalizer = _normalizer()
        tokenizer.pre_tokenizer = _pre_tokenizer()
        return cls(tokenizer, num_visual_tokens, cond_len, class_names)

    def extended(
        self, texts: Iterable[str], class_names: Sequence[str], cond_len: int | None = None
    ) -> UnitokVocabulary:
        """A vocabulary that keeps every id of this one and appends the new words of ``texts`` and ``class_names``
        (fine-tuning on new classes or prompts). Visual ids move up by the number of new words."""
        vocab = dict(self.tokenizer.get_vocab())
        for word in words_of([*class_names, *texts]):
            vocab.setdefault(word, len(vocab))
        tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
        tokenizer.normalizer = _normalizer()
        tokenizer.pre_tokenizer = _pre_tokenizer()
        return UnitokVocabulary(tokenizer, self.num_visual_tokens, cond_len or self.cond_len, class_names)

    # --- ids --------------------------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    @property
    def bos_id(self) -> int:
        return self.token_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_id(EOS)

    @property
    def boi_id(self) -> int:
        return self.token_id(BOI)

    @property
    def eoi_id(self) -> int:
        return self.token_id(EOI)

    @property
    def null_id(self) -> int:
        return self.token_id(NULL)

    @property
    def text_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def visual_offset(self) -> int:
        return self.text_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.text_vocab_size + self.num_visual_tokens

    @property
    def prefix_len(self) -> int:
        """BOS + the condition slot."""
        return 1 + self.cond_len

    # --- conditions -------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def _words(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"a prompt must be a non-empty string, got {text!r}")
        ids = self.tokenize(text)
        if not ids:
            raise ValueError(f"prompt {text!r} has no words")
        words = [w for w, _ in _pre_tokenizer().pre_tokenize_str(_normalizer().normalize_str(text))]
        unknown = [w for w, i in zip(words, ids, strict=True) if i == self.token_id(UNK)]
        if unknown:
            raise ValueError(
                f"prompt {text!r} has words this model never saw: {unknown}; known prompts are the class names "
                f"{self.class_names} (fine-tune with scripts/finetune.py to add new prompts)"
            )
        return ids

    def class_id(self, name_or_label: str | int) -> int:
        """A class index from its index or its name (case-insensitive)."""
        if isinstance(name_or_label, bool):
            raise ValueError(f"not a class: {name_or_label!r}")
        if isinstance(name_or_label, int):
            if not 0 <= name_or_label < len(self.class_names):
                raise ValueError(f"class index {name_or_label} is outside 0..{len(self.class_names) - 1}")
            return name_or_label
        lowered = [n.lower() for n in self.class_names]
        if isinstance(name_or_label, str) and name_or_label.strip().lower() in lowered:
            return lowered.index(name_or_label.strip().lower())
        raise ValueError(f"unknown class {name_or_label!r}; this model knows {self.class_names}")

    def condition_ids(self, condition: str | int | None) -> list[int]:
        """One condition -> its slot (cond_len ids). ``None`` is the null condition; an int is a class index; a
        string is a class name or a prompt."""
        if condition is None:
            ids = [self.null_id]
        elif isinstance(condition, int) and not isinstance(condition, bool):
            ids = self.tokenize(self.class_names[self.class_id(condition)])
        elif isinstance(condition, str):
            ids = self._words(condition)
            if len(ids) > self.cond_len:
                raise ValueError(
                    f"prompt {condition!r} has {len(ids)} tokens; this model's condition slot holds {self.cond_len}"
                )
        else:
            raise ValueError(f"a condition is a class index, a class name or prompt, or None; got {condition!r}")
        return ids + [self.pad_id] * (self.cond_len - len(ids))

    def prefix_ids(self, conditions: Sequence[str | int | None]) -> torch.Tensor:
        """(B, prefix_len) long: ``[BOS] + slot`` per condition."""
        if len(conditions) == 0:
            raise ValueError("need at least one condition")
        return torch.tensor([[self.bos_id, *self.condition_ids(c)] for c in conditions], dtype=torch.long)

    def class_prefix_ids(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Training: (B,) class indices (and an optional (B,) bool "use the null condition") -> (B, prefix_len)."""
        table = self.prefix_ids(list(range(len(self.class_names))))  # (C, P)
        ids = table[labels.long()]
        if drop is not None:
            ids = torch.where(drop[:, None], self.prefix_ids([None]), ids)
        return ids

    # --- visual tokens ----------------------------------------------------------------------------------------
    def to_model_ids(self, visual: torch.Tensor) -> torch.Tensor:
        if visual.numel() and (int(visual.min()) < 0 or int(visual.max()) >= self.num_visual_tokens):
            raise ValueError(
                f"visual token ids must lie in [0, {self.num_visual_tokens}), got [{int(visual.min())}, "
                f"{int(visual.max())}]"
            )
        return visual + self.visual_offset

    def to_visual_ids(self, ids: torch.Tensor) -> torch.Tensor:
        visual = ids - self.visual_offset
        if visual.numel() and (int(visual.min()) < 0 or int(visual.max()) >= self.num_visual_tokens):
            raise ValueError("these ids are not all visual tokens")
        return visual

    # --- persistence ------------------------------------------------------------------------------------------
    def to_config(self) -> dict:
        return {"num_visual_tokens": self.num_visual_tokens, "cond_len": self.cond_len, "class_names": self.class_names}

    def save(self, path: str | Path) -> None:
        """``tokenizer.json`` + ``tokenizer_config.json`` (loadable by ``AutoTokenizer``) in ``path``."""
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(
            tokenizer_object=self.tokenizer, pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS
        )
        fast.save_pretrained(str(path))

    @classmethod
    def load(cls, path: str | Path, config: dict) -> UnitokVocabulary:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no text tokenizer at {file}")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on corrupt JSON
            raise ValueError(f"corrupt text tokenizer {file}: {err}") from err
        return cls(tokenizer, config["num_visual_tokens"], config["cond_len"], config.get("class_names", ()))
