"""Speculative decoding with a draft model: greedy equals greedy AR; sampled outputs follow the AR distribution
(chi-square), a broken residual rule fails it; bad input."""

import pytest
import torch

import unitok.decoding.draft as draft_module
from unitok.decoding.block import decode_blocks
from unitok.decoding.draft import decode_draft
from unitok.decoding.sampling import SamplingConfig
from unitok.model.heads import VisualVocab
from unitok.model.modes import NextBlockMode, NextTokenMode, TokenGrid

from .test_sjd import NULL, TEXT, P, _chi_square_pvalue, _exact_distribution, _model

GREEDY = SamplingConfig(temperature=0)


def _greedy_case(guidance):
    """(target, drafter, visual, layout, prefix, greedy AR tokens) of a 16-code, 20-token case with 3 prompts."""
    codes = 16
    target, drafter = _model(codes, seed=0), _model(codes, seed=1)
    visual = VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 4, 5), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9], [2, 6, 0]])
    ar = decode_blocks(target, layout, prefix, visual, guidance, NULL, GREEDY)
    return target, drafter, visual, layout, prefix, ar


@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_draft_equals_greedy_ar(gamma, guidance):
    target, drafter, visual, layout, prefix, ar = _greedy_case(guidance)
    out = decode_draft(target, layout, prefix, visual, guidance, NULL, GREEDY, None, draft_model=drafter, gamma=gamma)
    assert torch.equal(out.tokens, ar.tokens)
    # a perfect draft (the target itself) is always accepted: one target pass per gamma + 1 tokens
    same = decode_draft(target, layout, prefix, visual, guidance, NULL, GREEDY, None, draft_model=target, gamma=gamma)
    assert torch.equal(same.tokens, ar.tokens)
    assert same.forward_passes == -(-20 // (gamma + 1))


@pytest.fixture(scope="module")
def tiny_case():
    codes = 3
    target, drafter = _model(codes, seed=3, init=0.6), _model(codes, seed=4, init=0.6)
    visual = VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 1, 3), P)
    prefix = torch.tensor([[2, 7, 0]])
    with torch.no_grad():
        outcomes, probs = _exact_distribution(target, layout, visual, prefix, 2.0, codes)
    return target, drafter, visual, layout, prefix, outcomes, probs, codes


def _samples(case, seed=0, n=20000):
    target, drafter, visual, layout, prefix, *_ = case
    return decode_draft(
        target,
        layout,
        prefix.expand(n, -1),
        visual,
        2.0,
        NULL,
        SamplingConfig(),
        torch.Generator().manual_seed(seed),
        draft_model=drafter,
        gamma=2,
    ).tokens


def test_draft_reproduces_the_ar_distribution(tiny_case):
    *_, outcomes, probs, codes = tiny_case
    assert _chi_square_pvalue(_samples(tiny_case), outcomes, probs, codes) > 0.01


def test_a_broken_residual_rule_fails_the_same_test(tiny_case, monkeypatch):
    *_, outcomes, probs, codes = tiny_case
    monkeypatch.setattr(draft_module, "_residual_sample", lambda p, q, g: torch.multinomial(p, 1, generator=g)[:, 0])
    assert _chi_square_pvalue(_samples(tiny_case), outcomes, probs, codes) < 0.01


def test_draft_bad_input():
    codes = 8
    target = _model(codes)
    visual = VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    prefix = torch.tensor([[2, 7, 0]])
    with pytest.raises(ValueError, match="draft_model"):
        decode_draft(target, layout, prefix, visual)
    for gamma in (0, -2, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            decode_draft(target, layout, prefix, visual, draft_model=target, gamma=gamma)
    with pytest.raises(ValueError, match="vocabulary"):
        decode_draft(target, layout, prefix, visual, draft_model=_model(codes + 1))
    with pytest.raises(ValueError, match="next-token"):
        decode_draft(target, NextBlockMode().layout(TokenGrid(1, 2, 2), P), prefix, visual, draft_model=target)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pruned_rows_leave_both_models_and_kept_rows_keep_their_greedy_tokens(guidance, forward_rows):
    target, drafter, visual, layout, prefix, ar = _greedy_case(guidance)
    prune = {2: torch.tensor([False, True, True])}.get  # before the third target pass
    forward_rows.clear()
    out = decode_draft(
        target, layout, prefix, visual, guidance, NULL, GREEDY, None, draft_model=drafter, gamma=3, prune=prune
    )
    pair = 2 if guidance != 1.0 else 1
    first = 2 * (3 + 1)  # two iterations of gamma draft forwards and one target forward
    assert set(forward_rows[:first]) == {3 * pair} and set(forward_rows[first:]) == {2 * pair}
    assert out.rows.tolist() == [1, 2] and torch.equal(out.tokens, ar.tokens[[1, 2]])
