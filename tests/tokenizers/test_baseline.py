import numpy as np
import pytest
import torch
from transformers import AutoModel

import unitok.tokenizers  # noqa: F401  (registers the Auto classes)
from unitok.tokenizers import BaselineTokenizer, BaselineTokenizerConfig, load_tokenizer, to_pixel_values, to_uint8

TINY = dict(channels=8, channel_mults=[1, 2, 2], num_res_blocks=1, z_channels=8)


@pytest.fixture
def tok():
    torch.manual_seed(0)
    return BaselineTokenizer(BaselineTokenizerConfig(quantizer={"type": "fsq", "levels": [4, 3]}, **TINY)).eval()


def test_round_trip_shapes_and_consistency(tok, images):
    tokens = tok.encode(images)
    assert tokens.shape == (3, 7, 7) and tokens.dtype == torch.int64
    assert tokens.min() >= 0 and tokens.max() < 12
    recon = tok.decode(tokens)
    assert recon.shape == images.shape
    out = tok(images)
    assert torch.equal(out.tokens, tokens)
    assert torch.allclose(out.reconstruction, recon, atol=1e-5)
    assert tok.tokens_per_image() == 49


def test_other_sizes_and_aspect_ratios(tok):
    x = torch.rand(2, 1, 16, 36) * 2 - 1
    assert tok.encode(x).shape == (2, 4, 9)
    assert tok.decode(tok.encode(x)).shape == (2, 1, 16, 36)


def test_straight_through_gradients_reach_the_encoder(tok, images):
    tok.train()
    tok(images).reconstruction.pow(2).mean().backward()
    grad = tok.encoder.net[0].weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_save_load_equality_and_auto_model(tok, images, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    for loaded in (load_tokenizer(tmp_path), AutoModel.from_pretrained(tmp_path).eval()):
        assert isinstance(loaded, BaselineTokenizer)
        assert torch.equal(loaded.encode(images), tok.encode(images))
        assert torch.equal(loaded.decode(tok.encode(images)), tok.decode(tok.encode(images)))


def test_pixel_helpers_round_trip():
    u8 = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    x = to_pixel_values(u8)
    assert x.shape == (2, 1, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x)[:, 0], u8)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 3, 28, 28), "1-channel"),
        (torch.zeros(2, 1, 30, 30), "multiples of 4"),
        (torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "to_pixel_values"),
        (torch.zeros(1, 28, 28), r"\(B, C, H, W\)"),
        (torch.full((1, 1, 28, 28), 3.0), r"\[-1, 1\]"),
        (np.zeros((1, 1, 28, 28), np.float32), "torch tensor"),
    ],
)
def test_bad_pixel_values(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        tok.encode(bad)


def test_bad_tokens(tok):
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        tok.decode(torch.full((1, 7, 7), 12))
    with pytest.raises(ValueError, match="integer"):
        tok.decode(torch.zeros(1, 7, 7))
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        tok.decode(torch.zeros(7, 7, dtype=torch.long))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a unitok tokenizer"):
        load_tokenizer(tmp_path)


def test_truncated_weights_are_refused(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="cannot load"):
        load_tokenizer(tmp_path)


def test_bad_config():
    with pytest.raises(ValueError, match="quantizer"):
        BaselineTokenizer(BaselineTokenizerConfig(quantizer={"type": "nope"}, **TINY))
    with pytest.raises(ValueError, match="channel_mults"):
        BaselineTokenizerConfig(channel_mults=[])


@pytest.mark.parametrize(
    "quantizer",
    [{"type": "bsq", "bits": 16}, {"type": "lfq", "bits": 16}, {"type": "vq", "codebook_size": 32, "dim": 4}],
)
def test_every_quantizer_survives_from_pretrained(quantizer, images, tmp_path):
    # transformers builds models on the meta device: constant tables kept as non-persistent buffers come back as
    # garbage. Every quantizer must encode identically after a save/load round trip.
    torch.manual_seed(0)
    tok = BaselineTokenizer(BaselineTokenizerConfig(quantizer=quantizer, **TINY))
    tok.train()
    tok(images)  # initialise learned codebooks
    tok.eval()
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert torch.equal(loaded.encode(images), tok.encode(images))
    assert torch.equal(loaded.decode(tok.encode(images)), tok.decode(tok.encode(images)))


def test_config_equality_compares_every_field():
    from unitok.tokenizers import BaselineTokenizerConfig

    assert BaselineTokenizerConfig(in_channels=1) == BaselineTokenizerConfig(in_channels=1)
    assert BaselineTokenizerConfig(in_channels=1) != BaselineTokenizerConfig(in_channels=3)
    assert BaselineTokenizerConfig(channels=8) != BaselineTokenizerConfig(channels=16)
