import json

import pytest
import torch

from unitok.tokenizers.quantizers import FSQ, QuantizerOutput, build_quantizer

SHAPES = [(2, 5), (2, 3, 4), (2, 2, 3, 3)]  # leading shapes: (B, N), (B, H, W), (B, T, H, W)


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [3, 4], [2, 2, 2]])
def test_every_id_round_trips(levels):
    q = FSQ(levels)
    size = 1
    for v in levels:
        size *= v
    assert q.codebook_size == size
    ids = torch.arange(size)
    codes = q.indices_to_codes(ids)
    assert codes.shape == (size, len(levels))
    assert torch.equal(q.codes_to_indices(codes), ids)
    assert torch.unique(codes, dim=0).shape[0] == size  # all distinct
    assert codes.min() >= -1 and codes.max() <= 1
    for channel, n in enumerate(levels):  # every channel uses exactly its number of levels
        assert torch.unique(codes[:, channel]).numel() == n


@pytest.mark.parametrize("lead", SHAPES)
def test_any_leading_shape(lead):
    torch.manual_seed(0)
    q = FSQ([8, 5, 5, 5])
    z = torch.randn(*lead, 4) * 2
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.quantized.dtype == torch.float32
    assert out.indices.shape == lead and out.indices.dtype == torch.int64
    assert torch.allclose(out.quantized, q.indices_to_codes(out.indices), atol=1e-6)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)
    # the same vectors give the same ids whatever the layout
    assert torch.equal(q(z.reshape(-1, 4)).indices, out.indices.reshape(-1))


def test_rounding_matches_definition():
    q = FSQ([5, 3])
    # bounded values are tanh(z) * 2 (L=5) and tanh(z) * 1 (L=3); large |z| saturates to the outermost levels.
    z = torch.tensor([[10.0, -10.0], [0.0, 0.0], [-10.0, 10.0]])
    out = q(z)
    expected = torch.tensor([[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]])
    assert torch.allclose(out.quantized, expected, atol=1e-6)
    assert out.indices.tolist() == [4 + 5 * 0, 2 + 5 * 1, 0 + 5 * 2]


def test_straight_through_gradient_and_no_losses():
    torch.manual_seed(0)
    q = FSQ([8, 5, 5, 5])
    z = torch.randn(2, 6, 4, requires_grad=True)
    out = q(z)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert out.losses == {}
    assert out.loss.shape == () and float(out.loss) == 0.0
    for value in out.metrics.values():
        assert value.shape == () and torch.isfinite(value)
    assert 0 < float(out.metrics["usage"]) <= 1


def test_input_is_not_modified_and_low_precision_is_upcast():
    q = FSQ([4, 3])
    z = torch.randn(3, 2)
    before = z.clone()
    q(z)
    assert torch.equal(z, before)
    out = q(z.to(torch.bfloat16))
    assert out.quantized.dtype == torch.float32


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    spec = {"type": "fsq", "levels": [8, 5, 5, 5]}
    a = build_quantizer(spec)
    b = build_quantizer(json.loads(json.dumps(spec)))
    b.load_state_dict(a.state_dict())
    z = torch.randn(2, 3, 3, 4)
    assert torch.equal(a(z).quantized, b(z).quantized)
    assert torch.equal(a(z).indices, b(z).indices)


def test_bad_inputs_raise_value_error():
    q = FSQ([8, 5, 5, 5])
    with pytest.raises(ValueError, match="channel-last"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="float"):
        q(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q.indices_to_codes(torch.tensor([1000]))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        q.indices_to_codes(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        q.indices_to_codes(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="grid"):
        q.codes_to_indices(torch.full((1, 4), 3.0))
    with pytest.raises(ValueError, match="codes must be"):
        q.codes_to_indices(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=">= 2"):
        FSQ([8, 1])
    with pytest.raises(ValueError, match=">= 2"):
        FSQ([])


def test_build_quantizer_errors():
    with pytest.raises(ValueError, match="unknown quantizer"):
        build_quantizer({"type": "nope"})
    with pytest.raises(ValueError, match='"type"'):
        build_quantizer({"levels": [3]})
    with pytest.raises(ValueError, match="bad options"):
        build_quantizer({"type": "fsq", "levels": [3], "colour": "red"})
