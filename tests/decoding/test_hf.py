"""model.generate with unitok's logits processors: MM-RoPE positions, visual-only sampling and CFG (constant or
scheduled) give the reference decoder's images, and sampling follows the model's distribution."""

import pytest
import torch

from unitok.decoding.block import decode_blocks
from unitok.decoding.cfg import Guidance
from unitok.decoding.hf import VisualLogitsProcessor, decode_hf
from unitok.decoding.sampling import SamplingConfig
from unitok.decoding.verify import distribution_pvalue, tiny_model
from unitok.model.heads import VisualVocab
from unitok.model.modes import NextBlockMode, NextTokenMode, TokenGrid

P, TEXT, CODES = 3, 10, 16
NULL = torch.tensor([[2, 6, 0]])
GREEDY = SamplingConfig(temperature=0)
VISUAL = VisualVocab(offset=TEXT, size=CODES, boi_id=4)


@pytest.fixture(scope="module")
def model():
    return tiny_model(CODES, seed=0, init=0.5)


@pytest.mark.parametrize("guidance", [1.0, 3.0, Guidance(3.0, ramp="linear"), Guidance(2.0, interval=(0.2, 0.6))])
def test_greedy_generate_equals_the_reference_decoder(model, guidance):
    layout = NextTokenMode().layout(TokenGrid(1, 4, 5), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9], [2, 6, 0]])
    reference = decode_blocks(model, layout, prefix, VISUAL, guidance, NULL, GREEDY)
    out = decode_hf(model, layout, prefix, VISUAL, guidance, NULL, GREEDY)
    assert torch.equal(out.tokens, reference.tokens)


def test_seeded_sampling_is_reproducible_and_leaves_the_global_rng_alone(model):
    layout = NextTokenMode().layout(TokenGrid(1, 3, 3), P)
    prefix = torch.tensor([[2, 7, 0]]).expand(4, -1)
    state = torch.random.get_rng_state()
    runs = [
        decode_hf(model, layout, prefix, VISUAL, 2.0, NULL, SamplingConfig(), torch.Generator().manual_seed(5))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(state, torch.random.get_rng_state())
    assert int(runs[0].tokens.min()) >= 0 and int(runs[0].tokens.max()) < CODES


def test_sampling_follows_the_model_distribution():
    assert distribution_pvalue(decode_hf, samples=4000) > 0.01


def test_processor_masks_everything_but_the_visual_slice(model):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    processor = VisualLogitsProcessor(model, layout, VISUAL)
    scores = processor(torch.tensor([[2, 7, 0, 4]]), torch.zeros(1, model.config.vocab_size))
    assert torch.isinf(scores[:, :TEXT]).all() and torch.isfinite(scores[:, TEXT : TEXT + CODES]).all()


def test_bad_input(model):
    layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    with pytest.raises(ValueError, match="null_prefix_ids"):
        VisualLogitsProcessor(model, layout, VISUAL, guidance=2.0)
    with pytest.raises(ValueError, match="next-token"):
        decode_hf(model, NextBlockMode().layout(TokenGrid(1, 2, 2), P), torch.tensor([[2, 7, 0]]), VISUAL)


def test_pruned_rows_are_not_returned_and_generate_stops_when_none_is_left(model):
    """``prune`` through a stopping criterion: after token k it is asked prune(k); dropped rows leave the result
    (the kept ones equal the full run), and a prune that ends the batch (the native engine's, when every request
    left) stops ``generate`` there."""
    layout = NextTokenMode().layout(TokenGrid(1, 4, 5), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9], [2, 6, 0]])
    full = decode_hf(model, layout, prefix, VISUAL, 3.0, NULL, GREEDY)
    calls = []

    def prune(step):
        calls.append(step)
        return {2: torch.tensor([True, False, True]), 5: torch.tensor([False, True])}.get(step)

    out = decode_hf(model, layout, prefix, VISUAL, 3.0, NULL, GREEDY, prune=prune)
    assert calls == list(range(1, layout.num_visual))
    assert out.rows.tolist() == [2] and torch.equal(out.tokens, full.tokens[[2]])

    class Left(Exception):
        pass

    def everyone_left(step):
        if step == 3:
            raise Left(step)

    with pytest.raises(Left):
        decode_hf(model, layout, prefix, VISUAL, 3.0, NULL, GREEDY, prune=everyone_left)
    with pytest.raises(ValueError, match="bool mask of 3 rows"):
        decode_hf(model, layout, prefix, VISUAL, 3.0, NULL, GREEDY, prune=lambda step: torch.tensor([1, 0, 1]))
