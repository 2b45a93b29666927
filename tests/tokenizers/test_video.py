"""Causal video tokenizer: shapes, causality, streaming equality, gradients, save/load and input validation."""

import pytest
import torch

from unitok.tokenizers.base import TokenizerOutput
from unitok.tokenizers.video import CausalCache, VideoTokenizer, VideoTokenizerConfig

TINY = dict(
    image_size=(16, 16),
    num_frames=5,
    channels=8,
    channel_mults=[1, 2],
    patch_size=2,
    spatial_factor=4,
    temporal_factor=2,
    quantizer={"type": "fsq", "levels": [5, 4, 3]},
)


def make(**overrides) -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(VideoTokenizerConfig(**{**TINY, **overrides})).eval()


def clip(t: int, b: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, t, 1, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def model():
    return make()


@pytest.mark.parametrize("t", [1, 3, 5, 9])
def test_shapes(model, t):
    x = clip(t)
    tokens = model.encode(x)
    assert tokens.shape == (2, 1 + (t - 1) // 2, 4, 4) and tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < model.codebook_size == 60
    assert model.decode(tokens).shape == x.shape
    out = model(x)
    assert isinstance(out, TokenizerOutput)
    assert out.reconstruction.shape == x.shape and torch.equal(out.tokens, tokens)


def test_temporal_factor_3_and_non_square():
    m = make(temporal_factor=3, num_frames=7)
    x = torch.rand(1, 7, 1, 16, 24) * 2 - 1
    assert m.encode(x).shape == (1, 3, 4, 6)
    assert m.decode(m.encode(x)).shape == x.shape


def test_token_accounting(model):
    assert model.tokens_per_image() == 3 * 4 * 4  # num_frames 5 -> 3 latent frames of 4x4
    assert model.tokens_per_clip(1) == 16 and model.tokens_per_clip(9) == 5 * 16
    assert model.latent_shape(9) == (5, 4, 4)
    assert model.num_frames_for(5) == 9 and model.num_latent_frames(9) == 5
    assert model.compression == (2, 4, 4) and model.kind == "video"
    assert model.temporal_factor == 2 and model.spatial_factor == 4


def test_encoder_is_causal(model):
    x = clip(9)
    tokens = model.encode(x)
    for last in range(9):  # frames 0..last; latent frame k depends on frames <= 2k
        keep = last // 2 + 1
        y = x.clone()
        y[:, last + 1 :] = clip(9, seed=7)[:, last + 1 :]
        changed = model.encode(y)
        assert torch.equal(changed[:, :keep], tokens[:, :keep]), f"frames > {last} changed latent frames < {keep}"
        if last < 8:  # and the check can fail: the next latent frame does see the changed frames
            assert not torch.equal(changed[:, keep:], tokens[:, keep:])


def test_decoder_is_causal(model):
    tokens = model.encode(clip(9))
    frames = model.decode(tokens)
    for k in range(4):  # latent frames 0..k decode frames 0..2k
        other = tokens.clone()
        other[:, k + 1 :] = (other[:, k + 1 :] + 17) % model.codebook_size
        decoded = model.decode(other)
        assert torch.equal(decoded[:, : 2 * k + 1], frames[:, : 2 * k + 1])
        assert not torch.allclose(decoded[:, 2 * k + 1 :], frames[:, 2 * k + 1 :])


def test_first_frame_is_encoded_alone(model):
    x = clip(9)
    assert torch.equal(model.encode(x)[:, :1], model.encode(x[:, :1]))


@pytest.mark.parametrize("chunk", [2, 4, 6, 8, 16])
def test_chunked_encoding_equals_whole_clip(model, chunk):
    x = clip(17)
    assert torch.equal(model.encode(x, chunk_frames=chunk), model.encode(x))


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_decoding_equals_whole_clip(model, chunk):
    tokens = model.encode(clip(13))
    torch.testing.assert_close(model.decode(tokens, chunk_latents=chunk), model.decode(tokens), atol=1e-5, rtol=1e-5)


def test_streaming_with_uneven_chunks(model):
    x = clip(15)
    cache = CausalCache()
    parts = [model.encode_chunk(x[:, a:b], cache) for a, b in [(0, 3), (3, 5), (5, 11), (11, 15)]]
    assert cache.frames == 15
    assert torch.equal(torch.cat(parts, 1), model.encode(x))
    with pytest.raises(ValueError, match="multiple of 2"):
        model.encode_chunk(x[:, :3], cache)  # after the first chunk, 3 frames is not a whole number of blocks


def test_gradients_reach_encoder():
    m = make().train()
    x = clip(5)
    out = m(x)
    (out.reconstruction - x).pow(2).mean().backward()
    first = m.encoder.layers[0].conv.weight.grad
    assert first is not None and first.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_save_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = VideoTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.config.to_dict()["model_type"] == "unitok_video_tokenizer"
    for key in ("temporal_factor", "spatial_factor", "num_frames", "channel_mults", "quantizer", "image_size"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    x = clip(5)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_config_json_serialisable():
    import json

    config = VideoTokenizerConfig(**TINY)
    again = VideoTokenizerConfig(**json.loads(config.to_json_string()))
    assert again.temporal_factor == 2 and again.channel_mults == [1, 2] and again.quantizer == TINY["quantizer"]


def test_default_config():
    config = VideoTokenizerConfig()
    assert config.kind == "video" and config.temporal_factor == 2 and config.spatial_factor == 4
    assert config.image_size == [64, 64] and (config.num_frames - 1) % 2 == 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(temporal_factor=0), "temporal_factor"),
        (dict(spatial_factor=8), "spatial_factor"),
        (dict(num_frames=4), "num_frames"),
        (dict(image_size=(18, 16)), "divide"),
        (dict(channel_mults=[]), "channel_mults"),
    ],
)
def test_bad_config(bad, match):
    with pytest.raises(ValueError, match=match):
        VideoTokenizerConfig(**{**TINY, **bad})


@pytest.mark.parametrize(
    "x, match",
    [
        (clip(4), "1 \\+ n \\* temporal_factor"),
        (clip(6), "1 \\+ n \\* temporal_factor"),
        (torch.zeros(2, 5, 3, 16, 16), "1-channel"),
        (torch.zeros(2, 5, 1, 18, 16), "multiples of 4"),
        (torch.zeros(2, 5, 1, 16, 16, dtype=torch.uint8), "float"),
        (torch.zeros(5, 1, 16, 16), "\\(B, T, C, H, W\\)"),
        (torch.full((1, 5, 1, 16, 16), 2.0), "\\[-1, 1\\]"),
    ],
)
def test_bad_pixel_values(model, x, match):
    with pytest.raises(ValueError, match=match):
        model.encode(x)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_chunk_frames(model):
    with pytest.raises(ValueError, match="chunk_frames"):
        model.encode(clip(9), chunk_frames=3)
    with pytest.raises(ValueError, match="chunk_latents"):
        model.decode(model.encode(clip(5)), chunk_latents=0)


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.full((1, 3, 4, 4), 60), "\\[0, 60\\)"),
        (torch.full((1, 3, 4, 4), -1), "\\[0, 60\\)"),
        (torch.zeros(3, 4, 4, dtype=torch.long), "\\(B, t, h, w\\)"),
        (torch.zeros(1, 3, 4, 4, 2, dtype=torch.long), "\\(B, t, h, w\\)"),
        (torch.zeros(1, 3, 4, 4), "integer"),
        (torch.zeros(1, 0, 4, 4, dtype=torch.long), "non-empty"),
    ],
)
def test_bad_tokens(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model.decode(tokens)
