import itertools
import json
import math
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from unitok.tokenizers.quantizers import BSQ, LFQ, QUANTIZERS, BinaryQuantizer, QuantizerOutput, build_quantizer

SHAPES = [(2, 5), (2, 3, 4), (2, 2, 3, 3)]  # leading shapes: (B, N), (B, H, W), (B, T, H, W)


def test_every_id_round_trips_through_bits_and_codes():
    q = BSQ(6)
    assert q.codebook_size == 64 and q.bits == 6 and q.dim == 6 and q.bits_per_token == 6.0
    ids = torch.arange(64)
    bits = q.indices_to_bits(ids)
    expected = torch.tensor([[(i >> b) & 1 for b in range(6)] for i in range(64)])  # little-endian
    assert torch.equal(bits, expected)
    assert torch.equal(q.bits_to_indices(bits), ids)
    codes = q.indices_to_codes(ids)
    assert torch.allclose(codes, (bits.float() * 2 - 1) / math.sqrt(6))
    assert torch.allclose(codes.norm(dim=-1), torch.ones(64))  # corners of the cube inscribed in the sphere
    assert torch.equal(q.bits_to_codes(bits), codes)
    assert torch.equal(q.codes_to_bits(codes), bits)
    assert torch.equal(q.codes_to_indices(codes), ids)


@pytest.mark.parametrize("lead", SHAPES)
def test_any_leading_shape(lead):
    torch.manual_seed(0)
    q = BSQ(10)
    z = torch.randn(*lead, 10)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.indices.shape == lead and out.indices.dtype == torch.int64
    assert torch.allclose(out.quantized, q.indices_to_codes(out.indices), atol=1e-6)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)
    assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(lead), atol=1e-6)
    assert torch.equal(q.codes_to_bits(out.quantized), (z > 0).long())


def test_scale_invariance_and_difference_from_lfq():
    torch.manual_seed(0)
    bsq, lfq = BSQ(8), LFQ(8)
    z = torch.randn(32, 8)
    assert torch.equal(bsq(z).indices, bsq(3.7 * z).indices)
    assert torch.equal(bsq(z).indices, lfq(z).indices)  # same signs, same ids
    assert torch.allclose(bsq(z).quantized * math.sqrt(8), lfq(z).quantized, atol=1e-6)


def test_gradient_passes_through_the_sphere_projection():
    torch.manual_seed(0)
    q = BSQ(16, commitment_weight=0.5)
    z = torch.randn(2, 4, 4, 16, requires_grad=True)
    out = q(z)
    for value in list(out.losses.values()) + list(out.metrics.values()):
        assert value.shape == () and torch.isfinite(value)
    u = torch.nn.functional.normalize(z.detach(), dim=-1)
    expected = 0.5 * (u - torch.where(z > 0, 1.0, -1.0) / 4).pow(2).sum(-1).mean()
    assert torch.allclose(out.losses["commitment"], expected, atol=1e-6)
    (out.quantized * torch.randn_like(out.quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # the normalisation's Jacobian removes the radial component: the gradient is orthogonal to z
    radial = (z.grad * z.detach()).sum(-1) / (z.grad.norm(dim=-1) * z.detach().norm(dim=-1))
    assert radial.abs().max() < 1e-4


def test_entropy_matches_the_papers_formula():
    """One group: our entropy equals BSQ's softmax over c in {+-1/sqrt(L)}^L of 2 * (inv_temperature * L) * u.c."""
    torch.manual_seed(0)
    bits, t = 6, 0.5
    q = BSQ(bits, entropy_group_size=bits, inv_temperature=t)
    z = torch.randn(40, bits)
    u = torch.nn.functional.normalize(z, dim=-1)
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits))) / math.sqrt(bits)
    prob = torch.softmax(2 * (t * bits) * u @ codes.t(), dim=-1)
    avg = prob.mean(0)
    per_sample, codebook = q.entropy_terms(q.to_unit(z))
    assert torch.allclose(per_sample, -(prob * prob.log()).sum(-1).mean(), atol=1e-4)
    assert torch.allclose(codebook, -(avg * avg.log()).sum(), atol=1e-4)
    out = q(z)
    assert torch.allclose(out.losses["entropy"], 0.1 * (per_sample - codebook), atol=1e-5)


@pytest.mark.parametrize("bits,index_groups", [(64, 2), (128, 4)])
def test_wide_codes_are_exact_fast_and_memory_light(bits, index_groups):
    torch.manual_seed(0)
    q = BSQ(bits, index_groups=index_groups)
    assert q.codebook_size == 2**bits
    assert sum(b.numel() for b in q.buffers()) < 10_000
    rand_bits = torch.randint(0, 2, (5, bits))
    ids = q.bits_to_indices(rand_bits)
    assert ids.shape == (5, index_groups) and torch.equal(q.indices_to_bits(ids), rand_bits)
    tokens, groups = 4 * 16 * 16, bits // 8
    z = torch.randn(4, 16, 16, bits, requires_grad=True)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = q(z)
        (out.loss + out.quantized.sum()).backward()
    elapsed = time.perf_counter() - start
    assert max(event.cpu_memory_usage for event in prof.events()) <= 1.5 * tokens * groups * 256 * 4
    assert elapsed < 5.0
    assert out.indices.shape == (4, 16, 16, index_groups)
    assert torch.equal(q.indices_to_bits(out.indices), (z > 0).long())
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert 0 < float(out.metrics["usage"]) <= 1 and 0.4 < float(out.metrics["bit_balance"]) < 0.6


@pytest.mark.parametrize("entropy_weight", [0.1, 0.0])
def test_entropy_loss_pushes_bits_toward_balance(entropy_weight):
    torch.manual_seed(0)
    q = BSQ(16, entropy_weight=entropy_weight)
    z = torch.nn.Parameter(torch.randn(128, 16) * 0.5 + 0.6)  # about 90% ones in every bit
    opt = torch.optim.Adam([z], lr=0.05)
    start = float(q(z).metrics["bit_imbalance"])
    assert start > 0.3
    for _ in range(25):
        out = q(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    end = float(q(z).metrics["bit_imbalance"])
    if entropy_weight > 0:
        assert end < 0.7 * start
    else:
        assert end == pytest.approx(start, abs=0.01)


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    spec = {"type": "bsq", "bits": 18, "entropy_group_size": 9, "diversity_gamma": 2.0}
    a = build_quantizer(spec)
    b = build_quantizer(json.loads(json.dumps(spec)))
    b.load_state_dict(a.state_dict())
    z = torch.randn(2, 7, 7, 18)
    oa, ob = a(z), b(z)
    assert torch.equal(oa.quantized, ob.quantized) and torch.equal(oa.indices, ob.indices)
    for key in oa.losses:
        assert torch.equal(oa.losses[key], ob.losses[key])


def test_bad_inputs_raise_value_error():
    q = BSQ(8)
    with pytest.raises(ValueError, match="channel-last"):
        q(torch.randn(4, 9))
    with pytest.raises(ValueError, match="float"):
        q(torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"2\^8"):
        q.indices_to_codes(torch.tensor([[0, 300]]))
    with pytest.raises(ValueError, match="zeros and ones"):
        q.bits_to_codes(torch.full((2, 8), -1))
    with pytest.raises(ValueError, match="divisible"):
        BSQ(18, index_groups=4)
    with pytest.raises(ValueError, match="int64"):
        BSQ(126, index_groups=2)
    with pytest.raises(ValueError, match="inv_temperature"):
        BSQ(8, inv_temperature=-1.0)


def test_registry_and_build():
    assert QUANTIZERS["bsq"] is BSQ and issubclass(BSQ, BinaryQuantizer)
    q = build_quantizer({"type": "bsq", "bits": 18})
    assert isinstance(q, BSQ) and q.codebook_size == 2**18 and q.dim == 18
