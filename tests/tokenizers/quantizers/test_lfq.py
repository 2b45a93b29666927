import itertools
import json
import math
import time

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import unitok.tokenizers.quantizers.binary as binary_module
from unitok.tokenizers.quantizers import LFQ, QUANTIZERS, BinaryQuantizer, QuantizerOutput, build_quantizer

SHAPES = [(2, 5), (2, 3, 4), (2, 2, 3, 3)]  # leading shapes: (B, N), (B, H, W), (B, T, H, W)


def test_every_id_round_trips_through_bits_and_codes():
    q = LFQ(5)
    assert q.codebook_size == 32 and q.bits == 5 and q.dim == 5 and q.bits_per_token == 5.0
    ids = torch.arange(32)
    bits = q.indices_to_bits(ids)
    assert bits.shape == (32, 5) and bits.dtype == torch.int64
    expected = torch.tensor([[(i >> b) & 1 for b in range(5)] for i in range(32)])  # little-endian
    assert torch.equal(bits, expected)
    assert torch.equal(q.bits_to_indices(bits), ids)
    codes = q.indices_to_codes(ids)
    assert torch.equal(codes, bits.float() * 2 - 1)
    assert torch.equal(q.bits_to_codes(bits), codes)
    assert torch.equal(q.codes_to_bits(codes), bits)
    assert torch.equal(q.codes_to_indices(codes), ids)


def test_index_is_sum_of_bits_times_powers_of_two():
    q = LFQ(4)
    z = torch.tensor([[0.3, -2.0, 5.0, -0.1], [-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    out = q(z)
    assert out.indices.tolist() == [1 + 4, 0, 15, 2]  # bit = z > 0, so 0.0 is a 0 bit
    assert torch.equal(out.quantized, torch.where(z > 0, 1.0, -1.0))


@pytest.mark.parametrize("lead", SHAPES)
def test_any_leading_shape(lead):
    torch.manual_seed(0)
    q = LFQ(12)
    z = torch.randn(*lead, 12)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.indices.shape == lead and out.indices.dtype == torch.int64
    assert torch.allclose(out.quantized, q.indices_to_codes(out.indices), atol=1e-6)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)
    assert torch.equal(q.codes_to_bits(out.quantized), (z > 0).long())
    assert torch.equal(q(z.reshape(-1, 12)).indices, out.indices.reshape(-1))


def test_gradients_losses_and_metrics():
    torch.manual_seed(0)
    q = LFQ(16, commitment_weight=0.5)
    z = torch.randn(2, 4, 4, 16, requires_grad=True)
    out = q(z)
    assert set(out.losses) == {"commitment", "entropy"}
    for value in list(out.losses.values()) + list(out.metrics.values()):
        assert value.shape == () and torch.isfinite(value)
    assert torch.allclose(out.losses["commitment"], 0.5 * (z - torch.where(z > 0, 1.0, -1.0)).pow(2).mean())
    (out.quantized * torch.randn_like(out.quantized)).sum().add(out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert {"bit_balance", "bit_imbalance", "usage", "perplexity", "per_sample_entropy", "codebook_entropy"} <= set(
        out.metrics
    )


def test_bit_metrics_on_known_bits():
    q = LFQ(4, entropy_group_size=2)  # two groups of 2 bits -> 4 sub-codes each
    z = torch.tensor([[1.0, 1.0, -1.0, 1.0], [1.0, -1.0, -1.0, 1.0]])
    m = q(z).metrics
    assert float(m["bit_balance"]) == pytest.approx(5 / 8)
    assert float(m["bit_imbalance"]) == pytest.approx((0.5 + 0.0 + 0.5 + 0.5) / 4)
    # group 1 sees sub-codes {3, 1}, group 2 sees {2, 2}: usage (2/4 + 1/4) / 2, perplexity (2 + 1) / 2
    assert float(m["usage"]) == pytest.approx(0.375)
    assert float(m["perplexity"]) == pytest.approx(1.5)


def _brute_force_entropies(x: torch.Tensor, inv_temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Full softmax over all 2^bits codes of -inv_temperature * ||x - c||^2 (small bits only)."""
    bits = x.shape[-1]
    codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)))  # (2^bits, bits)
    prob = torch.softmax(-inv_temperature * torch.cdist(x, codes).pow(2), dim=-1)
    per_sample = -(prob * prob.log()).sum(-1).mean()
    avg = prob.mean(0)
    return per_sample, -(avg * avg.log()).sum()


@pytest.mark.parametrize("inv_temperature", [0.5, 2.0])
def test_single_group_entropy_equals_the_full_softmax(inv_temperature):
    torch.manual_seed(0)
    q = LFQ(8, entropy_group_size=8, inv_temperature=inv_temperature)
    x = torch.randn(64, 8) * 0.7 + 0.3
    per_sample, codebook = q.entropy_terms(x)
    ref_per_sample, ref_codebook = _brute_force_entropies(x, inv_temperature)
    assert torch.allclose(per_sample, ref_per_sample, atol=1e-4)
    assert torch.allclose(codebook, ref_codebook, atol=1e-4)


def test_grouped_entropy_is_the_sum_over_groups():
    torch.manual_seed(0)
    q = LFQ(9, entropy_group_size=3)
    assert [size for _, n, size in q.entropy_blocks for _ in range(n)] == [3, 3, 3]
    x = torch.randn(50, 9)
    per_sample, codebook = q.entropy_terms(x)
    refs = [_brute_force_entropies(x[:, i : i + 3], 1.0) for i in (0, 3, 6)]
    assert torch.allclose(per_sample, sum(r[0] for r in refs), atol=1e-4)
    assert torch.allclose(codebook, sum(r[1] for r in refs), atol=1e-4)
    # the factorised codebook entropy never exceeds the bits' capacity
    assert codebook <= 9 * math.log(2) + 1e-5


def test_entropy_without_autograd_is_chunked_and_identical(monkeypatch):
    torch.manual_seed(0)
    q = LFQ(20)
    x = torch.randn(60, 20, requires_grad=True)  # groups of 7, 7 and 6 bits
    with_grad = q.entropy_terms(x)
    monkeypatch.setattr(binary_module, "_CHUNK_ELEMENTS", 3 * 256)  # 3 rows per chunk of the 7-bit block
    with torch.no_grad():
        chunked = q.entropy_terms(x)
    for a, b in zip(with_grad, chunked, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("bits,group,sizes", [(18, 8, [6, 6, 6]), (20, 8, [7, 7, 6]), (16, 8, [8, 8]), (5, 8, [5])])
def test_entropy_groups_have_near_equal_sizes(bits, group, sizes):
    q = LFQ(bits, entropy_group_size=group)
    assert [size for _, n, size in q.entropy_blocks for _ in range(n)] == sizes


@pytest.mark.parametrize("bits,index_groups", [(64, 2), (128, 4), (124, 2)])
def test_wide_codes_use_grouped_indices(bits, index_groups):
    torch.manual_seed(0)
    q = LFQ(bits, index_groups=index_groups)
    assert q.codebook_size == 2**bits
    per = bits // index_groups
    rand_bits = torch.randint(0, 2, (3, 7, bits))
    ids = q.bits_to_indices(rand_bits)
    assert ids.shape == (3, 7, index_groups) and ids.dtype == torch.int64
    assert torch.equal(q.indices_to_bits(ids), rand_bits)
    expected = sum(rand_bits[..., i].long() << i for i in range(per))  # first group: the lowest bits
    assert torch.equal(ids[..., 0], expected)
    ones = torch.ones(1, bits, dtype=torch.long)
    assert q.bits_to_indices(ones).tolist() == [[2**per - 1] * index_groups]
    z = torch.randn(2, 3, bits)
    out = q(z)
    assert out.indices.shape == (2, 3, index_groups)
    assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
    with pytest.raises(ValueError, match=f"2\\^{per}"):
        q.indices_to_codes(torch.full((1, index_groups), 2**per))
    with pytest.raises(ValueError, match=f"\\(\\.\\.\\., {index_groups}\\)"):
        q.indices_to_codes(torch.zeros(1, index_groups + 1, dtype=torch.long))


@pytest.mark.parametrize("bits,index_groups", [(64, 2), (128, 4)])
def test_wide_codes_are_fast_and_memory_light(bits, index_groups):
    torch.manual_seed(0)
    q = LFQ(bits, index_groups=index_groups)
    assert sum(b.numel() for b in q.buffers()) < 10_000  # no table grows with 2^bits
    tokens, groups = 4 * 16 * 16, bits // 8
    z = torch.randn(4, 16, 16, bits, requires_grad=True)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = q(z)
        (out.loss + out.quantized.sum()).backward()
    elapsed = time.perf_counter() - start
    largest = max(event.cpu_memory_usage for event in prof.events())
    # the largest allocation is one (tokens, groups, 2^8) soft-assignment table
    assert largest <= 1.5 * tokens * groups * 256 * 4
    assert elapsed < 5.0
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("entropy_weight", [0.1, 0.0])
def test_entropy_loss_pushes_bits_toward_balance(entropy_weight):
    torch.manual_seed(0)
    q = LFQ(16, entropy_weight=entropy_weight)
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
    else:  # the commitment loss alone only pulls latents to their current sign
        assert end == pytest.approx(start, abs=0.01)


def test_state_dict_round_trip_gives_identical_outputs():
    torch.manual_seed(0)
    spec = {"type": "lfq", "bits": 64, "index_groups": 2, "entropy_group_size": 4, "inv_temperature": 2.0}
    a = build_quantizer(spec)
    b = build_quantizer(json.loads(json.dumps(spec)))
    b.load_state_dict(a.state_dict())
    z = torch.randn(2, 3, 3, 64)
    oa, ob = a(z), b(z)
    assert torch.equal(oa.quantized, ob.quantized) and torch.equal(oa.indices, ob.indices)
    for key in oa.losses:
        assert torch.equal(oa.losses[key], ob.losses[key])


def test_bad_inputs_raise_value_error():
    q = LFQ(8)
    with pytest.raises(ValueError, match="channel-last"):
        q(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="float"):
        q(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"2\^8"):
        q.indices_to_codes(torch.tensor([256]))
    with pytest.raises(ValueError, match=r"2\^8"):
        q.indices_to_bits(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        q.indices_to_codes(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="zeros and ones"):
        q.bits_to_indices(torch.full((1, 8), 2))
    with pytest.raises(ValueError, match="zeros and ones"):
        q.bits_to_codes(torch.ones(1, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        q.bits_to_indices(torch.ones(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="codes must be"):
        q.codes_to_indices(torch.ones(1, 9))
    for kwargs, message in [
        ({"bits": 10, "index_groups": 3}, "divisible"),
        ({"bits": 64}, "index_groups=2"),
        ({"bits": 128, "index_groups": 2}, "index_groups=4"),
        ({"bits": 0}, "bits"),
        ({"bits": 8.0}, "bits"),
        ({"bits": 8, "entropy_group_size": 0}, "entropy_group_size"),
        ({"bits": 32, "entropy_group_size": 20}, "entropy_group_size"),
        ({"bits": 8, "entropy_weight": -1.0}, "entropy_weight"),
        ({"bits": 8, "index_groups": 0}, "index_groups"),
    ]:
        with pytest.raises(ValueError, match=message):
            LFQ(**kwargs)


def test_registry_and_build():
    assert QUANTIZERS["lfq"] is LFQ and issubclass(LFQ, BinaryQuantizer)
    q = build_quantizer({"type": "lfq", "bits": 16})
    assert isinstance(q, LFQ) and q.codebook_size == 65536
