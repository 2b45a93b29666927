"""Sampling from logits: greedy, top-k, top-p, temperature, seeded draws and config validation."""

import math

import pytest
import torch

from unitok.decoding.sampling import SamplingConfig, sample


@pytest.fixture
def logits():
    return torch.randn(4, 3, 17, generator=torch.Generator().manual_seed(0))  # (B, slots, V)


def test_greedy_is_argmax(logits):
    config = SamplingConfig(temperature=0)
    assert config.greedy
    tokens = sample(logits, config)
    assert tokens.shape == (4, 3) and tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.equal(config.probs(logits), torch.nn.functional.one_hot(logits.argmax(-1), 17).float())


def test_top_k_one_equals_greedy(logits):
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert torch.equal(sample(logits, SamplingConfig(temperature=1.0, top_k=1), g), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingConfig(temperature=2.5, top_k=1), g), logits.argmax(-1))


def test_top_k_larger_than_the_vocabulary_is_no_filter(logits):
    assert torch.allclose(SamplingConfig(top_k=1000).probs(logits), torch.softmax(logits, -1))


def test_top_k_keeps_the_k_most_likely(logits):
    probs = SamplingConfig(top_k=3).probs(logits)
    assert torch.equal((probs > 0).sum(-1), torch.full((4, 3), 3))
    top = logits.topk(3, dim=-1).indices
    assert torch.allclose(probs.gather(-1, top).sum(-1), torch.ones(4, 3))


def test_top_p_keeps_the_nucleus():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()[None].expand(3, -1)
    probs = SamplingConfig(top_p=0.7).probs(logits)
    # The smallest set of most likely tokens whose mass reaches 0.7 is {0, 1}; it is renormalised.
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]).div(0.8).expand(3, -1), atol=1e-6)
    draws = sample(p.log().expand(2000, -1), SamplingConfig(top_p=0.7), torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert 0.55 < float((draws == 0).float().mean()) < 0.70  # 0.625 expected
    # top_p = 1 is no filter; a tiny top_p keeps only the argmax.
    assert torch.allclose(SamplingConfig(top_p=1.0).probs(logits), p.expand(3, -1), atol=1e-6)
    assert torch.equal(SamplingConfig(top_p=1e-3).probs(logits), torch.tensor([1.0, 0, 0, 0]).expand(3, -1))


def test_temperature_scales_the_logits(logits):
    assert torch.allclose(SamplingConfig(temperature=0.5).probs(logits), torch.softmax(logits / 0.5, -1), atol=1e-6)
    assert torch.allclose(SamplingConfig(temperature=1).probs(logits), torch.softmax(logits, -1), atol=1e-6)


def test_sample_does_not_write_to_the_callers_logits(logits):
    before = logits.clone()
    sample(logits, SamplingConfig(temperature=0.7, top_k=5, top_p=0.9), torch.Generator().manual_seed(0))
    assert torch.equal(logits, before)


def test_seeded_generator_is_reproducible(logits):
    config = SamplingConfig(temperature=1.5, top_k=10, top_p=0.95)
    a = sample(logits, config, torch.Generator().manual_seed(123))
    b = sample(logits, config, torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    wide = logits.repeat(16, 1, 1)  # enough draws that two seeds cannot agree by chance
    assert not torch.equal(
        sample(wide, config, torch.Generator().manual_seed(1)), sample(wide, config, torch.Generator().manual_seed(2))
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_p": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"top_p": math.nan},
        {"top_p": True},
        {"top_k": -1},
        {"top_k": 2.0},
        {"top_k": True},
        {"temperature": -1},
        {"temperature": -1e-9},
        {"temperature": math.nan},
        {"temperature": True},
        {"temperature": False},
    ],
    ids=str,
)
def test_invalid_configs_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingConfig(**kwargs)


def test_defaults_are_plain_sampling():
    config = SamplingConfig()
    assert (config.temperature, config.top_k, config.top_p, config.greedy) == (1.0, 0, 1.0, False)
