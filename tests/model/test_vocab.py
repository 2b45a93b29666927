"""The vocabulary: specials, visual offset, fixed condition slot, null condition, errors, save/load."""

import pytest
import torch
from transformers import AutoTokenizer

from unitok.data.fashion_mnist import CLASS_NAMES
from unitok.model.vocab import SPECIAL_TOKENS, UnitokVocabulary


@pytest.fixture
def vocab() -> UnitokVocabulary:
    return UnitokVocabulary.build(["a red sneaker"], num_visual_tokens=100, cond_len=6, class_names=CLASS_NAMES)


def test_ids_layout(vocab):
    assert [vocab.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert vocab.visual_offset == vocab.text_vocab_size and vocab.vocab_size == vocab.text_vocab_size + 100
    v = torch.tensor([0, 99])
    assert torch.equal(vocab.to_visual_ids(vocab.to_model_ids(v)), v)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        vocab.to_model_ids(torch.tensor([100]))
    with pytest.raises(ValueError, match="not all visual"):
        vocab.to_visual_ids(torch.tensor([3]))


def test_condition_slot_has_fixed_length(vocab):
    ids = vocab.prefix_ids(["sneaker", 0, None, "A red SNEAKER", "Ankle boot"])
    assert ids.shape == (5, 1 + 6) and (ids[:, 0] == vocab.bos_id).all()
    assert ids[0, 1] == vocab.tokenize("sneaker")[0] and (ids[0, 2:] == vocab.pad_id).all()
    assert ids[2, 1] == vocab.null_id and (ids[2, 2:] == vocab.pad_id).all()
    assert torch.equal(ids[1], vocab.prefix_ids([CLASS_NAMES[0]])[0])
    assert ids[3, 1:4].tolist() == vocab.tokenize("a red sneaker")


def test_class_prefixes_with_condition_dropout(vocab):
    labels = torch.tensor([7, 9, 7])
    ids = vocab.class_prefix_ids(labels, drop=torch.tensor([False, False, True]))
    assert torch.equal(ids[0], vocab.prefix_ids([7])[0]) and torch.equal(ids[1], vocab.prefix_ids(["ankle boot"])[0])
    assert torch.equal(ids[2], vocab.prefix_ids([None])[0])


def test_class_lookup(vocab):
    assert vocab.class_id("Sneaker") == 7 and vocab.class_id(9) == 9
    with pytest.raises(ValueError, match="unknown class 'unicorn'"):
        vocab.class_id("unicorn")
    with pytest.raises(ValueError, match="outside 0..9"):
        vocab.class_id(10)


@pytest.mark.parametrize(
    ("condition", "match"),
    [
        ("", "non-empty"),
        ("   ", "non-empty"),
        ("a purple unicorn", r"never saw: \['purple', 'unicorn'\]"),
        ("a red sneaker a red sneaker a", "has 7 tokens"),
        (3.5, "a condition is"),
        (12, "outside"),
    ],
)
def test_bad_conditions(vocab, condition, match):
    with pytest.raises(ValueError, match=match):
        vocab.prefix_ids([condition])


def test_save_and_load(vocab, tmp_path):
    vocab.save(tmp_path)
    loaded = UnitokVocabulary.load(tmp_path, vocab.to_config())
    assert torch.equal(loaded.prefix_ids(["sneaker", None]), vocab.prefix_ids(["sneaker", None]))
    assert AutoTokenizer.from_pretrained(tmp_path)("a red sneaker")["input_ids"] == vocab.tokenize("a red sneaker")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt text tokenizer"):
        UnitokVocabulary.load(tmp_path, vocab.to_config())
    with pytest.raises(FileNotFoundError):
        UnitokVocabulary.load(tmp_path / "missing", vocab.to_config())


def test_bad_vocabulary():
    with pytest.raises(ValueError, match="cond_len"):
        UnitokVocabulary.build([], num_visual_tokens=10, cond_len=0)
    with pytest.raises(ValueError, match="more than cond_len"):
        UnitokVocabulary.build([], num_visual_tokens=10, cond_len=1, class_names=["ankle boot"])
