"""The binary tokenizer: ids, bits and codes agree exactly; decode from bits equals decode from ids; bad input."""

import pytest
import torch

from unitok.tokenizers import BinaryTokenizer, BinaryTokenizerConfig, load_tokenizer

SMALL = {"channels": 8, "channel_mults": [1, 1, 1], "z_channels": 8}


@pytest.fixture(params=["bsq", "lfq"])
def tok(request) -> BinaryTokenizer:
    torch.manual_seed(0)
    return BinaryTokenizer(BinaryTokenizerConfig(quantizer={"type": request.param, "bits": 16}, **SMALL)).eval()


def test_default_has_at_least_16_bits():
    tok = BinaryTokenizer(BinaryTokenizerConfig(**SMALL))
    assert tok.bits >= 16 and tok.bits_per_token() == tok.bits


def test_ids_bits_codes_agree(tok, images):
    ids, bits = tok.encode(images), tok.encode_bits(images)
    assert ids.shape == (3, 7, 7) and bits.shape == (3, 7, 7, 16)
    assert set(bits.unique().tolist()) <= {0, 1}
    assert torch.equal(tok.quantizer.indices_to_bits(ids), bits)
    assert torch.equal(tok.quantizer.bits_to_indices(bits), ids)
    q = tok.quantizer
    assert torch.equal(q.bits_to_codes(bits), q.indices_to_codes(ids))  # the decoder sees the same codes
    torch.testing.assert_close(tok.decode_bits(bits), tok.decode(ids))  # up to the conv kernels' memory layout
    assert tok.decode(ids).shape == images.shape


def test_bit_flip_changes_the_image(tok, images):
    bits = tok.encode_bits(images)
    flipped = bits.clone()
    flipped[0, 3, 3, 0] ^= 1
    assert not torch.equal(tok.decode_bits(flipped)[0], tok.decode_bits(bits)[0])
    torch.testing.assert_close(tok.decode_bits(flipped)[1:], tok.decode_bits(bits)[1:])


def test_straight_through_gradients(tok, images):
    tok.train()
    x = images.clone().requires_grad_(True)
    out = tok(x)
    out.reconstruction.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    first = next(tok.encoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_save_load_equality(tok, images, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BinaryTokenizer)
    assert torch.equal(loaded.encode_bits(images), tok.encode_bits(images))
    assert torch.equal(loaded.decode(tok.encode(images)), tok.decode(tok.encode(images)))


def test_bad_input(tok, images):
    with pytest.raises(ValueError, match="binary quantizer"):
        BinaryTokenizerConfig(quantizer={"type": "fsq", "levels": [5, 5]})
    bits = tok.encode_bits(images)
    with pytest.raises(ValueError, match=r"\(B, h, w, 16\)"):
        tok.decode_bits(bits[..., :8])
    with pytest.raises(ValueError, match="zeros and ones"):
        tok.decode_bits(bits * 2)
    with pytest.raises(ValueError, match="zeros and ones"):
        tok.decode_bits(bits.float())
    with pytest.raises(ValueError):
        tok.decode(torch.full((1, 7, 7), 1 << 16))
    with pytest.raises(ValueError, match="channel"):
        tok.encode_bits(images.repeat(1, 3, 1, 1))
