"""Grouped (GSD-style) and relaxed (LANTERN-style) acceptance: exact SJD at their zero settings, never stricter than
exact acceptance, bounded by their parameter, and clear errors."""

import pytest
import torch

from unitok.decoding.relaxed import (
    GroupedAcceptance,
    RelaxedAcceptance,
    code_neighbors,
    decode_grouped,
    decode_relaxed,
)
from unitok.decoding.sampling import SamplingConfig
from unitok.decoding.sjd import Acceptance, decode_sjd
from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.heads import VisualVocab
from unitok.model.modes import NextTokenMode, TokenGrid

P, TEXT, CODES = 3, 10, 12
NULL = torch.tensor([[2, 6, 0]])
CODE_VECTORS = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 2)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    config = UnitokConfig(
        vocab_size=TEXT + CODES,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="sdpa",
        initializer_range=0.5,
    )
    model = UnitokForCausalLM(config).eval()
    return model, VisualVocab(offset=TEXT, size=CODES, boi_id=4), NextTokenMode().layout(TokenGrid(1, 3, 4), P)


def test_code_neighbors_put_itself_first_then_the_nearest():
    table = code_neighbors(CODE_VECTORS, 3)
    assert torch.equal(table[:, 0], torch.arange(CODES))
    # code 5 sits at (1, 1): its nearest are at distance 1
    assert all(float((CODE_VECTORS[j] - CODE_VECTORS[5]).norm()) == 1.0 for j in table[5, 1:].tolist())


def _random_pq(seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(4, 5, CODES, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(4, 5, CODES, generator=g) * 2, -1)
    draft = torch.randint(0, CODES, (4, 5), generator=g)
    return p, q, draft


def test_relaxed_and_grouped_never_stricter_than_exact_and_relaxed_is_bounded():
    p, q, draft = _random_pq()
    exact = Acceptance()(p, q, draft)
    table = code_neighbors(CODE_VECTORS, CODES)
    for delta in (0.0, 0.1, 0.5):
        relaxed = RelaxedAcceptance(table, delta)(p, q, draft)
        assert (relaxed >= exact - 1e-6).all()
        p_d, q_d = p.gather(-1, draft[..., None])[..., 0], q.gather(-1, draft[..., None])[..., 0]
        assert (relaxed <= ((p_d + delta) / q_d).clamp(max=1) + 1e-6).all()
    torch.testing.assert_close(RelaxedAcceptance(table, 0.0)(p, q, draft), exact)
    grouped = GroupedAcceptance(code_neighbors(CODE_VECTORS, 1), 0.9)(p, q, draft)
    torch.testing.assert_close(grouped, exact)


def test_only_plausible_neighbours_count():
    # A flat draft distribution q and a target whose mass sits far from the draft: the draft's neighbours are
    # individually implausible (below min_p of the peak), so neither rule may add them, however many there are.
    table = code_neighbors(CODE_VECTORS, CODES)
    draft = torch.tensor([[3]])
    near = table[3]
    p = torch.full((1, 1, CODES), 1e-4)
    p[0, 0, near[1:]] = 0.004  # each neighbour: 0.4% of the peak's mass
    p[0, 0, near[-1]] = 0.0  # the farthest code holds the peak instead
    p[0, 0, near[-1]] = 1 - p.sum() + p[0, 0, near[-1]]
    q = torch.full((1, 1, CODES), 1.0 / CODES)
    exact = Acceptance()(p, q, draft)
    for rule in (RelaxedAcceptance(table[:, :-1], 0.5, min_p=0.05), GroupedAcceptance(table[:, :-1], 0.05)):
        torch.testing.assert_close(rule(p, q, draft), exact)
    # with min_p = 0 every neighbour counts and the same draft is accepted far more often
    assert RelaxedAcceptance(table[:, :-1], 0.5, min_p=0.0)(p, q, draft) > 2 * exact
    assert GroupedAcceptance(table[:, :-1], 0.0)(p, q, draft) > 2 * exact


def test_zero_settings_equal_exact_sjd(setup):
    model, visual, layout = setup
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9]])
    sampling = SamplingConfig()

    def run(fn, **kw):
        return fn(model, layout, prefix, visual, 2.0, NULL, sampling, torch.Generator().manual_seed(5), **kw).tokens

    exact = run(decode_sjd, window=4)
    assert torch.equal(run(decode_relaxed, codes=CODE_VECTORS, delta=0.0, window=4), exact)
    assert torch.equal(run(decode_grouped, codes=CODE_VECTORS, group_size=1, window=4), exact)
    loose = decode_relaxed(
        model,
        layout,
        prefix,
        visual,
        2.0,
        NULL,
        sampling,
        torch.Generator().manual_seed(5),
        codes=CODE_VECTORS,
        delta=0.5,
        window=4,
    )
    assert loose.tokens.shape == exact.shape and int(loose.tokens.max()) < CODES


@pytest.mark.parametrize(
    ("fn", "kwargs", "message"),
    [
        (decode_relaxed, {"codes": CODE_VECTORS, "delta": 1.0}, "delta"),
        (decode_relaxed, {"codes": CODE_VECTORS, "delta": -0.1}, "delta"),
        (decode_relaxed, {"codes": CODE_VECTORS, "min_p": -0.1}, "min_p"),
        (decode_relaxed, {"codes": CODE_VECTORS, "neighbors": 0}, "neighbors"),
        (decode_relaxed, {}, "code vectors"),
        (decode_relaxed, {"codes": CODE_VECTORS[:5]}, "codes must be"),
        (decode_grouped, {"codes": CODE_VECTORS, "group_size": 0}, "group_size"),
        (decode_grouped, {"codes": CODE_VECTORS, "min_p": 1.5}, "min_p"),
        (decode_grouped, {"codes": CODE_VECTORS, "window": 0}, "window"),
    ],
)
def test_bad_options(setup, fn, kwargs, message):
    model, visual, layout = setup
    with pytest.raises(ValueError, match=message):
        fn(model, layout, torch.tensor([[2, 7, 0]]), visual, **kwargs)
