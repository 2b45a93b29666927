"""Visual specs and codecs, and generator folders: save / load round trips and clear errors for broken folders."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.pretrained import TOKENIZER_DIR, Generator, check_pair, load_generator, save_generator
from unitok.model.visual import VisualCodec, VisualSpec
from unitok.model.vocab import UnitokVocabulary
from unitok.tokenizers import BaselineTokenizer, BaselineTokenizerConfig, MultiScaleTokenizer, MultiScaleTokenizerConfig

TINY_TOK = dict(channels=8, channel_mults=[1, 2, 2], num_res_blocks=1, z_channels=8)
TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
CLASSES = ["t-shirt", "ankle boot", "bag"]


def baseline(levels=(4, 3)) -> BaselineTokenizer:
    torch.manual_seed(0)
    return BaselineTokenizer(
        BaselineTokenizerConfig(quantizer={"type": "fsq", "levels": list(levels)}, **TINY_TOK)
    ).eval()


def multiscale() -> MultiScaleTokenizer:
    torch.manual_seed(0)
    config = MultiScaleTokenizerConfig(
        scales=[1, 2, 4, 7], quantizer={"type": "fsq", "levels": [5, 3]}, num_phi=2, **TINY_TOK
    )
    return MultiScaleTokenizer(config).eval()


def make_generator(codec: VisualCodec, classes=CLASSES) -> Generator:
    """As ``unitok.training.ar.build_generator`` does it."""
    vocab = UnitokVocabulary.build([], codec.codebook_size, cond_len=3, class_names=classes)
    config = UnitokConfig(
        vocab_size=vocab.vocab_size,
        max_position_embeddings=vocab.prefix_len + codec.spec.num_tokens + 64,
        tie_word_embeddings=True,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eoi_id,
        pad_token_id=vocab.pad_id,
        attn_implementation="sdpa",
        **TINY_LM,
    )
    torch.manual_seed(1)
    return Generator(UnitokForCausalLM(config).eval(), vocab, codec)


@pytest.fixture
def images():
    return torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def gen() -> Generator:
    return make_generator(VisualCodec.create(baseline(), "next-block", 28))


@pytest.fixture(scope="module")
def saved(gen, tmp_path_factory):
    return save_generator(tmp_path_factory.mktemp("gen") / "generator", gen)


def _logits(gen: Generator, tokens: torch.Tensor) -> torch.Tensor:
    layout = gen.layout()
    embed = gen.model.get_input_embeddings()
    prefix = gen.vocab.prefix_ids([0, "bag"])
    inputs = layout.inputs_embeds(
        embed(prefix), embed(tokens + gen.vocab.visual_offset), embed.weight[gen.vocab.boi_id]
    )
    with torch.no_grad():
        return gen.model(
            inputs_embeds=inputs,
            position_ids=layout.positions[:, None].expand(3, 2, -1),
            attention_mask=layout.attention_mask(0, layout.length, 2),
        ).logits


# --- VisualSpec / VisualCodec -------------------------------------------------------------------------------------


def test_codec_measures_the_tokenizer_grid(images):
    tok = baseline()
    codec = VisualCodec.create(tok, "next-token", 28)
    spec = codec.spec
    assert (spec.frames, spec.height, spec.width) == (1, *tok.encode(images).shape[1:]) == (1, 7, 7)
    assert spec.image_size == (28, 28) and spec.num_tokens == 49 and not spec.is_video
    assert codec.codebook_size == 12
    tokens = codec.encode(images)
    assert tokens.shape == (3, 49) and tokens.dtype == torch.int64
    assert torch.equal(tokens, tok.encode(images).reshape(3, -1))
    pixels = codec.decode(tokens)
    assert pixels.shape == images.shape and pixels.min() >= -1 and pixels.max() <= 1
    assert spec.layout(4).num_blocks == 49


def test_codec_applies_an_image_tokenizer_frame_by_frame():
    tok = baseline()
    codec = VisualCodec.create(tok, "next-block", 28, num_frames=3)
    spec = codec.spec
    assert codec.per_frame and spec.is_video
    assert (spec.frames, spec.height, spec.width, spec.num_frames) == (3, 7, 7, 3)
    clips = torch.rand(2, 3, 1, 28, 28) * 2 - 1
    tokens = codec.encode(clips)
    assert tokens.shape == (2, 3 * 49)
    assert torch.equal(tokens[:, 49:98], tok.encode(clips[:, 1]).reshape(2, -1))  # frame-major order
    assert codec.decode(tokens).shape == (2, 3, 1, 28, 28)
    assert spec.layout(4).num_blocks == 3  # next-block on a video grid: one frame per forward
    with pytest.raises(ValueError, match="clips"):
        codec.encode(clips[:, 0])


def test_codec_with_a_multiscale_tokenizer(images):
    codec = VisualCodec.create(multiscale(), "next-scale", 28)
    assert codec.spec.scales == ((1, 1), (2, 2), (4, 4), (7, 7))
    assert (codec.spec.height, codec.spec.width) == (7, 7) and codec.spec.num_tokens == 70
    tokens = codec.encode(images)
    assert tokens.shape == (3, 70)
    assert codec.decode(tokens).shape == images.shape
    assert codec.spec.layout(4).num_blocks == 4


def test_codec_rejects_tokens_of_the_wrong_shape_or_range():
    codec = VisualCodec.create(baseline(), "next-token", 28)
    with pytest.raises(ValueError, match="tokens must be"):
        codec.decode(torch.zeros(2, 48, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        codec.decode(torch.full((2, 49), 12))
    with pytest.raises(ValueError, match="token ids"):
        codec.decode(torch.full((2, 49), -1))
    with pytest.raises(ValueError, match="tokens"):
        codec.encode(torch.zeros(1, 1, 32, 32))  # 8 x 8 tokens, not the 7 x 7 the spec fixes


@pytest.mark.parametrize(
    "spec",
    [
        VisualSpec("next-token", 7, 7),
        VisualSpec("next-block", 2, 2, frames=3, block="frame", image_size=(8, 8), num_frames=5, time_scale=2.0),
        VisualSpec("next-scale", 4, 4, scales=((1, 1), (2, 2), (4, 4)), image_size=(16, 16)),
    ],
    ids=["image", "video", "scales"],
)
def test_spec_dict_round_trip(spec):
    d = spec.to_dict()
    assert VisualSpec.from_dict(d) == spec
    assert VisualSpec.from_dict(json.loads(json.dumps(d))) == spec  # lists from JSON become tuples again


def test_spec_rejects_unknown_keys_and_bad_values():
    d = VisualSpec("next-token", 7, 7).to_dict()
    with pytest.raises(ValueError, match="unknown visual spec keys"):
        VisualSpec.from_dict({**d, "colour": "red"})
    with pytest.raises(ValueError, match="dict"):
        VisualSpec.from_dict([1, 2])
    with pytest.raises(ValueError, match="mode"):
        VisualSpec("next-pixel", 7, 7)
    with pytest.raises(ValueError, match="block"):
        VisualSpec("next-block", 7, 7, block="diagonal")
    with pytest.raises(ValueError, match="last scale"):
        VisualSpec("next-scale", 4, 4, scales=((1, 1), (2, 2)))
    with pytest.raises(ValueError, match="positive"):
        VisualSpec("next-token", 0, 7)


# --- generators ---------------------------------------------------------------------------------------------------


def test_generate_tokens_with_guidance(gen):
    result = gen.generate_tokens([0, 1], guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert result.tokens.shape == (2, gen.spec.num_tokens) == (2, 49)
    assert result.tokens.min() >= 0 and result.tokens.max() < gen.codec.codebook_size
    assert result.forward_passes == gen.layout().num_blocks == 7
    assert gen.codec.decode(result.tokens).shape == (2, 1, 28, 28)
    by_name = gen.generate_tokens(["T-Shirt", "ankle boot"], 2.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_name.tokens, result.tokens)


def test_video_generator_generates_clips():
    gen = make_generator(VisualCodec.create(baseline(), "next-block", 28, num_frames=3))
    result = gen.generate_tokens(["bag"], guidance_scale=1.5, generator=torch.Generator().manual_seed(0))
    assert result.tokens.shape == (1, 147) and result.forward_passes == 3
    assert gen.codec.decode(result.tokens).shape == (1, 3, 1, 28, 28)


def test_save_load_round_trip(gen, saved, images):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (saved / name).is_file()
    assert (saved / TOKENIZER_DIR / "config.json").is_file()
    loaded = load_generator(saved)
    assert loaded.spec == gen.spec
    assert loaded.vocab.class_names == gen.vocab.class_names
    assert (loaded.vocab.vocab_size, loaded.vocab.visual_offset, loaded.vocab.prefix_len) == (
        gen.vocab.vocab_size,
        gen.vocab.visual_offset,
        gen.vocab.prefix_len,
    )
    assert torch.equal(loaded.vocab.prefix_ids([0, "bag", None]), gen.vocab.prefix_ids([0, "bag", None]))
    assert not loaded.model.training
    tokens = gen.codec.encode(images[:2])
    assert torch.equal(loaded.codec.encode(images[:2]), tokens)
    assert torch.equal(loaded.codec.decode(tokens), gen.codec.decode(tokens))
    torch.testing.assert_close(_logits(loaded, tokens), _logits(gen, tokens))
    a = gen.generate_tokens([0, 2], 2.0, generator=torch.Generator().manual_seed(3)).tokens
    b = loaded.generate_tokens([0, 2], 2.0, generator=torch.Generator().manual_seed(3)).tokens
    assert torch.equal(a, b)


def test_the_transformer_alone_loads_with_auto_classes(gen, saved, images):
    model = AutoModelForCausalLM.from_pretrained(saved).eval()
    assert isinstance(model, UnitokForCausalLM)
    tokens = gen.codec.encode(images[:2])
    torch.testing.assert_close(_logits(Generator(model, gen.vocab, gen.codec), tokens), _logits(gen, tokens))


def test_half_precision_weights_load_as_float32(gen, saved, tmp_path, images):
    half = save_generator(tmp_path / "half", gen, weights_dtype=torch.float16)
    assert (half / "model.safetensors").stat().st_size < (saved / "model.safetensors").stat().st_size
    loaded = load_generator(half)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    tokens = gen.codec.encode(images[:2])
    torch.testing.assert_close(_logits(loaded, tokens), _logits(gen, tokens), rtol=1e-2, atol=1e-2)


def test_save_replaces_an_existing_folder_atomically(gen, tmp_path):
    path = tmp_path / "generator"
    path.mkdir()
    (path / "stale.txt").write_text("from an older save")
    save_generator(path, gen, extra_files={"training.yaml": "steps: 4\n"})
    assert not (path / "stale.txt").exists()
    assert (path / "training.yaml").read_text() == "steps: 4\n"
    save_generator(path, gen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator"]  # no .tmp / .old siblings
    assert load_generator(path).spec == gen.spec


def test_load_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        load_generator(tmp_path)  # exists, but holds no config.json


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved, tmp_path / "copy")


def test_corrupt_config_raises(saved, tmp_path):
    path = _copy(saved, tmp_path)
    (path / "config.json").write_text('{"model_type": "unitok", "visual": {')
    with pytest.raises(ValueError, match="corrupt"):
        load_generator(path)


def test_foreign_or_bare_configs_raise(saved, tmp_path):
    path = _copy(saved, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "llama"}))
    with pytest.raises(ValueError, match="not a unitok generator"):
        load_generator(path)
    del raw["visual"]
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bare unitok transformer"):
        load_generator(path)


def test_truncated_weights_raise(saved, tmp_path):
    path = _copy(saved, tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="weights"):
        load_generator(path)


def test_a_tokenizer_of_another_codebook_size_is_rejected(gen, saved, tmp_path):
    other = VisualCodec(baseline(levels=(5, 3)), gen.spec)
    assert other.codebook_size == 15 != gen.vocab.num_visual_tokens
    with pytest.raises(ValueError, match="does not belong"):
        check_pair(gen.model, gen.vocab, other)
    path = _copy(saved, tmp_path)
    other.tokenizer.save_pretrained(path / TOKENIZER_DIR)
    with pytest.raises(ValueError, match="does not belong"):
        load_generator(path)


def test_a_model_smaller_than_the_vocabulary_is_rejected(gen):
    small = UnitokForCausalLM(UnitokConfig(vocab_size=gen.vocab.vocab_size - 1, **TINY_LM))
    with pytest.raises(ValueError, match="smaller"):
        check_pair(small, gen.vocab, gen.codec)
    check_pair(gen.model, gen.vocab, gen.codec)


def test_spec_survives_the_config_json(saved, gen):
    raw = json.loads((saved / "config.json").read_text())
    assert VisualSpec.from_dict(raw["visual"]) == gen.spec
    assert raw["vocabulary"]["class_names"] == CLASSES
    assert math.isclose(raw["visual"]["time_scale"], 1.0)
