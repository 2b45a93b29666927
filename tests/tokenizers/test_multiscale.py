import pytest
import torch
import torch.nn.functional as F

from unitok.tokenizers import MultiScaleTokenizer, MultiScaleTokenizerConfig, load_tokenizer

TINY = dict(channels=8, channel_mults=[1, 2, 2], num_res_blocks=1, z_channels=8, num_phi=2)


@pytest.fixture
def tok():
    torch.manual_seed(0)
    cfg = MultiScaleTokenizerConfig(scales=[1, 2, 4, 7], quantizer={"type": "fsq", "levels": [5, 5, 3]}, **TINY)
    return MultiScaleTokenizer(cfg).eval()


def test_scales_tokens_and_round_trip(tok, images):
    maps = tok.encode_scales(images)
    assert [tuple(m.shape) for m in maps] == [(3, 1, 1), (3, 2, 2), (3, 4, 4), (3, 7, 7)]
    flat = tok.encode(images)
    assert flat.shape == (3, 1 + 4 + 16 + 49) == (3, tok.tokens_per_image())
    assert all(torch.equal(a, b) for a, b in zip(tok.tokens_to_scales(flat), maps, strict=True))
    out = tok(images)
    assert torch.equal(out.tokens, flat)
    assert torch.allclose(tok.decode(flat), out.reconstruction, atol=1e-5)
    assert torch.allclose(tok.decode(maps), out.reconstruction, atol=1e-5)


def test_residual_scales_refine_the_latent(tok, images):
    # Every additional scale must bring the accumulated latent closer to the encoder's latent.
    f = tok._latent(images)
    maps = tok.encode_scales(images)
    f_hats = tok._fhat_from_ids(maps, (7, 7))
    errors = [F.mse_loss(fh, f).item() for fh in f_hats]
    assert errors[-1] < errors[0]


def test_next_scale_inputs_are_the_accumulated_latent_resized(tok, images):
    maps = tok.encode_scales(images)
    inputs = tok.next_scale_inputs(maps)
    assert [tuple(x.shape) for x in inputs] == [(3, 4, 3), (3, 16, 3), (3, 49, 3)]
    f_hats = tok._fhat_from_ids(maps, (7, 7))
    expected = F.interpolate(f_hats[1], size=(4, 4), mode="area").flatten(2).transpose(1, 2)
    assert torch.allclose(inputs[1], expected)
    assert torch.allclose(inputs[2], f_hats[2].flatten(2).transpose(1, 2))


def test_any_aspect_ratio(tok):
    x = torch.rand(2, 1, 16, 40) * 2 - 1  # latent 4 x 10
    maps = tok.encode_scales(x)
    assert tuple(maps[-1].shape[-2:]) == (4, 10)
    assert [tuple(m.shape[-2:]) for m in maps] == tok.scale_schedule((4, 10))
    assert tok.decode(maps).shape == (2, 1, 16, 40)


def test_gradients_and_save_load(tok, images, tmp_path):
    tok.train()
    tok(images).reconstruction.mean().backward()
    assert tok.encoder.net[0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tok.phis.parameters())
    tok.eval()
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.config.scales == [[1, 1], [2, 2], [4, 4], [7, 7]]
    assert torch.equal(loaded.encode(images), tok.encode(images))


def test_bad_input(tok, images):
    with pytest.raises(ValueError, match="tokens must be"):
        tok.decode(torch.zeros(1, 10, dtype=torch.long))
    maps = tok.encode_scales(images)
    with pytest.raises(ValueError, match="do not match the schedule"):
        tok.decode(maps[1:])
    with pytest.raises(ValueError, match=r"\[0, 75\)"):
        tok.decode([torch.full_like(m, 75) for m in maps])
    with pytest.raises(ValueError, match="last scale"):
        MultiScaleTokenizerConfig(scales=[1, 2, 4], **TINY)
    with pytest.raises(ValueError, match="shrink"):
        MultiScaleTokenizerConfig(scales=[1, 4, 2, 7], **TINY)
