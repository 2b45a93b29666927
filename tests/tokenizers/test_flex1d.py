"""The 1D flexible-length tokenizer: shapes for every prefix length, the prefix property, nested dropout,
straight-through gradients, save/load round trip and input validation. Tiny configs (hidden 32, 1 layer)."""

import json

import pytest
import torch

from unitok.tokenizers.base import TokenizerOutput
from unitok.tokenizers.flex1d import Flex1DTokenizer, Flex1DTokenizerConfig

K = 8


def tiny_config(**overrides) -> Flex1DTokenizerConfig:
    kwargs = dict(
        image_size=28,
        patch_size=4,
        num_tokens=K,
        hidden_size=32,
        num_encoder_layers=1,
        num_decoder_layers=1,
        num_attention_heads=2,
        mlp_ratio=2.0,
        conv_channels=0,
        quantizer={"type": "fsq", "levels": [5, 5, 5]},
    )
    kwargs.update(overrides)
    return Flex1DTokenizerConfig(**kwargs)


@pytest.fixture(params=[0, 8], ids=["linear-patches", "conv-patches"])
def model(request) -> Flex1DTokenizer:
    torch.manual_seed(0)
    return Flex1DTokenizer(tiny_config(conv_channels=request.param)).eval()


@pytest.fixture
def images(fashion_test) -> torch.Tensor:
    from unitok.tokenizers.base import to_pixel_values

    return to_pixel_values(fashion_test.images[:6])  # (6, 1, 28, 28)


def test_describes_its_tokens(model):
    assert model.kind == "flex1d"
    assert model.config.model_type == "unitok_flex1d_tokenizer"
    assert model.tokens_per_image() == K
    assert model.codebook_size == 125


def test_encode_decode_shapes_for_every_prefix_length(model, images):
    for k in range(1, K + 1):
        tokens = model.encode(images, num_tokens=k)
        assert tokens.shape == (6, k) and tokens.dtype == torch.int64
        assert int(tokens.min()) >= 0 and int(tokens.max()) < model.codebook_size
        recon = model.decode(tokens)
        assert recon.shape == images.shape and recon.dtype == torch.float32
        assert torch.isfinite(recon).all()
    assert model.encode(images).shape == (6, K)


def test_prefix_property(model, images):
    full = model.encode(images)
    for k in range(1, K + 1):
        assert torch.equal(model.encode(images, num_tokens=k), full[:, :k])


def test_decode_reads_exactly_the_prefix(model, images):
    full = model.encode(images)
    recons = [model.decode(full[:, :k]) for k in range(1, K + 1)]
    # every extra token changes the picture, so the decoder really reads the prefix it is given
    for shorter, longer in zip(recons, recons[1:], strict=False):
        assert not torch.allclose(shorter, longer)
    # and a prefix decodes the same whatever ids would have followed it
    other = full.clone()
    other[:, 3:] = (other[:, 3:] + 1) % model.codebook_size
    assert torch.equal(model.decode(other[:, :3]), recons[2])


def test_eval_forward_equals_encode_then_decode(model, images):
    out = model(images)
    assert isinstance(out, TokenizerOutput)
    assert torch.equal(out.tokens, model.encode(images))
    torch.testing.assert_close(out.reconstruction, model.decode(out.tokens))
    for k in (1, 5):
        torch.testing.assert_close(model(images, num_tokens=k).reconstruction, model.decode(out.tokens[:, :k]))
    assert model(images).reconstruction.equal(out.reconstruction)  # eval mode is deterministic


def test_nested_dropout_drops_in_training(model, images):
    model.train()
    torch.manual_seed(1)
    first = model(images).reconstruction
    torch.manual_seed(2)
    second = model(images).reconstruction
    assert not torch.allclose(first, second)
    torch.manual_seed(1)
    assert torch.equal(model(images).reconstruction, first)  # the randomness is only the drawn lengths


def test_nested_dropout_keeps_a_prefix_per_sample(model, images):
    batch = torch.cat([images, images])  # 12 samples: many different lengths
    torch.manual_seed(3)
    lengths = model.sample_num_tokens(len(batch))
    assert len(set(lengths.tolist())) > 1
    model.train()
    torch.manual_seed(3)
    out = model(batch)
    assert 1.0 <= float(out.metrics["mean_num_tokens"]) <= K
    model.eval()
    for i, k in enumerate(lengths.tolist()):
        expect = model.decode(out.tokens[i : i + 1, :k])
        torch.testing.assert_close(out.reconstruction[i : i + 1], expect, atol=1e-5, rtol=1e-5)


def test_training_with_explicit_length_or_without_nested_dropout_is_deterministic(images):
    model = Flex1DTokenizer(tiny_config(nested_dropout=False)).train()
    torch.manual_seed(1)
    first = model(images).reconstruction
    torch.manual_seed(2)
    assert torch.equal(model(images).reconstruction, first)
    model = Flex1DTokenizer(tiny_config()).train()
    torch.manual_seed(1)
    first = model(images, num_tokens=3).reconstruction
    torch.manual_seed(2)
    assert torch.equal(model(images, num_tokens=3).reconstruction, first)


def test_sample_num_tokens_distribution():
    model = Flex1DTokenizer(tiny_config(nested_dropout_full_prob=0.5))
    lengths = model.sample_num_tokens(20000, generator=torch.Generator().manual_seed(0))
    assert int(lengths.min()) == 1 and int(lengths.max()) == K
    counts = torch.bincount(lengths, minlength=K + 1)[1:].float() / len(lengths)
    torch.testing.assert_close(counts[-1], torch.tensor(0.5 + 0.5 / K), atol=0.02, rtol=0)
    torch.testing.assert_close(counts[:-1], torch.full((K - 1,), 0.5 / K), atol=0.02, rtol=0)


def test_straight_through_gradients_reach_the_encoder(model, images):
    model.train()
    out = model(images)
    loss = (out.reconstruction - images).pow(2).mean() + sum(out.losses.values(), torch.zeros(()))
    loss.backward()
    encoder_params = [model.registers, model.encoder_pos, *model.patch_embed.parameters(), *model.encoder.parameters()]
    for param in encoder_params + list(model.quant_proj.parameters()):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_save_and_load_round_trip(model, images, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_tokens"] == K and saved["quantizer"] == {"type": "fsq", "levels": [5, 5, 5]}
    loaded = Flex1DTokenizer.from_pretrained(tmp_path).eval()
    fields = {name: value for name, value in model.config.to_dict().items() if name != "_name_or_path"}
    assert {name: loaded.config.to_dict()[name] for name in fields} == fields
    tokens = model.encode(images)
    assert torch.equal(loaded.encode(images), tokens)
    for k in (1, 4, K):
        assert torch.equal(loaded.decode(tokens[:, :k]), model.decode(tokens[:, :k]))


def test_default_config_is_json_serialisable_and_builds():
    config = Flex1DTokenizerConfig()
    restored = Flex1DTokenizerConfig.from_dict(json.loads(config.to_json_string()))
    assert restored.to_dict() == config.to_dict()
    assert restored.num_tokens == 32 and restored.image_size == [28, 28]


@pytest.mark.parametrize("num_tokens", [0, -1, K + 1, 2.0, True])
def test_bad_num_tokens(model, images, num_tokens):
    with pytest.raises(ValueError, match="num_tokens"):
        model.encode(images, num_tokens=num_tokens)
    with pytest.raises(ValueError, match="num_tokens"):
        model(images, num_tokens=num_tokens)


@pytest.mark.parametrize(
    ("pixel_values", "match"),
    [
        (torch.zeros(2, 3, 28, 28), "1-channel"),
        (torch.zeros(2, 1, 32, 32), "28x28"),
        (torch.zeros(2, 1, 30, 30), "multiples of 4"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "float"),
        (torch.zeros(1, 28, 28), r"\(B, C, H, W\)"),
        (torch.full((2, 1, 28, 28), 2.0), r"\[-1, 1\]"),
    ],
)
def test_bad_pixel_values(model, pixel_values, match):
    with pytest.raises(ValueError, match=match):
        model.encode(pixel_values)
    with pytest.raises(ValueError, match=match):
        model(pixel_values)


@pytest.mark.parametrize(
    ("tokens", "match"),
    [
        (torch.zeros(2, 0, dtype=torch.long), "length 1..8"),
        (torch.zeros(2, K + 1, dtype=torch.long), "length 1..8"),
        (torch.full((2, 3), 125), r"\[0, 125\)"),
        (torch.full((2, 3), -1), r"\[0, 125\)"),
        (torch.zeros(2, 3, 1, dtype=torch.long), r"\(B, k\)"),
        (torch.zeros(3, dtype=torch.long), r"\(B, k\)"),
        (torch.zeros(2, 3), "integer"),
    ],
)
def test_bad_tokens(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model.decode(tokens)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"patch_size": 5}, "divisible by patch_size"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "multiple of num_attention_heads"),
        ({"num_tokens": 0}, "num_tokens"),
        ({"nested_dropout_full_prob": 1.5}, "nested_dropout_full_prob"),
        ({"conv_channels": 8, "patch_size": 7}, "power-of-two"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)
