"""SJD: greedy equals greedy AR token for token; sampled outputs follow the AR distribution (chi-square over an
enumerable output space), and a deliberately broken residual rule fails the same test."""

import pytest
import torch

import unitok.decoding.sjd as sjd_module
from unitok.decoding.block import decode_blocks
from unitok.decoding.cfg import Guidance
from unitok.decoding.sampling import SamplingConfig, draw
from unitok.decoding.sjd import decode_sjd
from unitok.decoding.verify import chi_square_pvalue, distribution_pvalue, exact_distribution, tiny_model
from unitok.model.heads import VisualVocab
from unitok.model.modes import NextBlockMode, NextTokenMode, TokenGrid

P, TEXT = 3, 10
NULL = torch.tensor([[2, 6, 0]])
GREEDY = SamplingConfig(temperature=0)


def _model(codes: int, seed: int = 0, init: float = 0.5):
    return tiny_model(codes, seed, init)


@pytest.mark.parametrize("window", [1, 3, 16])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_greedy_sjd_equals_greedy_ar(window, guidance):
    codes = 16
    model, visual = _model(codes), VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 4, 5), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9], [2, 6, 0]])
    ar = decode_blocks(model, layout, prefix, visual, guidance, NULL, GREEDY)
    out = decode_sjd(model, layout, prefix, visual, guidance, NULL, GREEDY, torch.Generator().manual_seed(1), window)
    assert torch.equal(out.tokens, ar.tokens)
    assert out.forward_passes <= ar.forward_passes


def _exact_distribution(model, layout, visual, prefix, guidance, codes):
    return exact_distribution(model, layout, visual, prefix, NULL, guidance)


_chi_square_pvalue = chi_square_pvalue


def _sjd_samples(model, layout, visual, prefix, guidance, n, seed, window=3, init="spatial"):
    return decode_sjd(
        model,
        layout,
        prefix.expand(n, -1),
        visual,
        guidance,
        NULL,
        SamplingConfig(),
        torch.Generator().manual_seed(seed),
        window,
        init=init,
    ).tokens


@pytest.fixture(scope="module")
def tiny_case():
    codes = 3
    model = _model(codes, seed=3, init=0.6)
    visual = VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 1, 3), P)
    prefix = torch.tensor([[2, 7, 0]])
    with torch.no_grad():
        outcomes, probs = _exact_distribution(model, layout, visual, prefix, 2.0, codes)
    return model, visual, layout, prefix, outcomes, probs, codes


@pytest.mark.parametrize("init", ["spatial", "random"])
def test_sjd_reproduces_the_ar_distribution(tiny_case, init):
    model, visual, layout, prefix, outcomes, probs, codes = tiny_case
    samples = _sjd_samples(model, layout, visual, prefix, 2.0, 20000, seed=0, init=init)
    assert _chi_square_pvalue(samples, outcomes, probs, codes) > 0.01


def test_a_broken_residual_rule_fails_the_same_test(tiny_case, monkeypatch):
    model, visual, layout, prefix, outcomes, probs, codes = tiny_case

    def resample_from_p(p, q, generator):  # the classic bug: ignore what the draft already covered
        return draw(p, generator)

    monkeypatch.setattr(sjd_module, "_residual_sample", resample_from_p)
    samples = _sjd_samples(model, layout, visual, prefix, 2.0, 20000, seed=0)
    assert _chi_square_pvalue(samples, outcomes, probs, codes) < 0.01


def test_sjd_bad_input():
    codes = 8
    model, visual = _model(codes), VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    prefix = torch.tensor([[2, 7, 0]])
    for window in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            decode_sjd(model, layout, prefix, visual, window=window)
    with pytest.raises(ValueError, match="next-token"):
        decode_sjd(model, NextBlockMode().layout(TokenGrid(1, 2, 2), P), prefix, visual)
    with pytest.raises(ValueError, match="null_prefix_ids"):
        decode_sjd(model, layout, prefix, visual, guidance_scale=2.0)


def test_library_distribution_check_agrees():
    assert distribution_pvalue(decode_sjd, samples=8000, window=3) > 0.01


@pytest.mark.parametrize("schedule", [Guidance(3.0, ramp="linear"), Guidance(3.0, interval=(0.3, 0.8))])
def test_guidance_schedules_follow_the_reference_decoder(schedule):
    codes = 16
    model, visual = _model(codes), VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 4, 5), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9]])
    ar = decode_blocks(model, layout, prefix, visual, schedule, NULL, GREEDY)
    out = decode_sjd(model, layout, prefix, visual, schedule, NULL, GREEDY, torch.Generator().manual_seed(1), 4)
    assert torch.equal(out.tokens, ar.tokens)
    constant = decode_blocks(model, layout, prefix, visual, 3.0, NULL, GREEDY)
    assert not torch.equal(ar.tokens, constant.tokens)  # the schedule changes what is generated
    assert torch.equal(
        constant.tokens, decode_blocks(model, layout, prefix, visual, Guidance(3.0), NULL, GREEDY).tokens
    )


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_pruned_rows_leave_and_kept_rows_keep_their_greedy_tokens(guidance, forward_rows, scripted_prune):
    """``prune`` (a server's requests whose clients left) drops rows between passes: later passes carry only the
    kept rows (and their null rows), which still get greedy AR's tokens; ``rows`` names them."""
    codes = 16
    model, visual = _model(codes), VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 4, 5), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9], [2, 6, 0], [2, 9, 9]])
    ar = decode_blocks(model, layout, prefix, visual, guidance, NULL, GREEDY)
    masks = {1: torch.tensor([True, False, True, True]), 3: torch.tensor([False, True, True])}
    prune = scripted_prune(masks)
    forward_rows.clear()
    out = decode_sjd(model, layout, prefix, visual, guidance, NULL, GREEDY, None, window=3, prune=prune)
    pair = 2 if guidance != 1.0 else 1
    assert prune.calls == list(range(1, out.forward_passes))  # before every pass after the first
    assert forward_rows[:4] == [4 * pair, 3 * pair, 3 * pair, 2 * pair] and set(forward_rows[4:]) <= {2 * pair}
    assert out.rows.tolist() == [2, 3] and torch.equal(out.tokens, ar.tokens[[2, 3]])


def test_sjd_prune_must_return_a_row_mask_that_keeps_a_row():
    codes = 4
    model, visual = _model(codes), VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 2, 3), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9]])
    for bad in (torch.tensor([False, False]), torch.tensor([1, 0]), torch.tensor([True])):
        with pytest.raises(ValueError, match="bool mask of 2 rows"):
            decode_sjd(model, layout, prefix, visual, 1.0, NULL, GREEDY, None, window=2, prune=lambda s, b=bad: b)
