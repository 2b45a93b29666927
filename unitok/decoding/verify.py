"""Does a decoder sample the model's distribution? An exact check on a tiny model with an enumerable output space.

:func:`exact_distribution` enumerates every output sequence of a tiny next-token model (V^N of them) and computes its
probability under guided AR sampling by teacher-forced forwards; :func:`chi_square_pvalue` compares decoder samples
with it (cells with expected count < 5 merged). :func:`distribution_pvalue` runs the whole check for one decoder;
the tests and ``unitok bench decoding`` both use it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from unitok.decoding.cfg import guide
from unitok.model.heads import VisualVocab
from unitok.model.modes import Layout, NextTokenMode, TokenGrid

TEXT = 10  # text ids of the tiny check model; visual ids follow
NULL = torch.tensor([[2, 6, 0]])
PREFIX = torch.tensor([[2, 7, 0]])


@torch.no_grad()
def exact_distribution(model, layout: Layout, visual: VisualVocab, prefix, null, guidance: float):
    """(outcomes (K, N), probabilities (K,)) of every visual sequence under guided AR sampling."""
    outcomes = torch.tensor(list(itertools.product(range(visual.size), repeat=layout.num_visual)))
    k = len(outcomes)
    embed = model.get_input_embeddings()
    logits = []
    for ids in (prefix.expand(k, -1), null.expand(k, -1)):
        inputs = layout.inputs_embeds(embed(ids), visual.embed(model, outcomes), visual.start(model))
        out = model(
            inputs_embeds=inputs,
            position_ids=layout.positions[:, None],
            attention_mask=layout.attention_mask(0, layout.length, k),
        )
        logits.append(out.logits[:, layout.prefix_len :, visual.offset : visual.offset + visual.size])
    guided = guide(torch.cat(logits), guidance)
    logp = torch.log_softmax(guided, -1).gather(-1, outcomes[..., None])[..., 0].sum(1)
    return outcomes, logp.exp()


def chi_square_pvalue(samples: torch.Tensor, outcomes: torch.Tensor, probs: torch.Tensor, codes: int) -> float:
    base = codes ** torch.arange(outcomes.shape[1] - 1, -1, -1)
    counts = torch.bincount((samples * base).sum(1), minlength=len(outcomes)).double()
    expected = probs.double() / probs.sum() * len(samples)
    keep = expected >= 5
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    expect = torch.cat([expected[keep], expected[~keep].sum()[None]])
    stat = float(((observed - expect) ** 2 / expect.clamp_min(1e-12)).sum())
    dof = int(keep.sum())  # cells - 1, counting the merged cell
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))


def tiny_model(codes: int, seed: int, init: float = 0.6):
    from unitok.model import UnitokConfig, UnitokForCausalLM

    torch.manual_seed(seed)
    config = UnitokConfig(
        vocab_size=TEXT + codes,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
        initializer_range=init,
    )
    return UnitokForCausalLM(config).eval()


def distribution_pvalue(decode: Callable, samples: int = 20000, seed: int = 0, guidance: float = 2.0, **options):
    """Chi-square p-value of ``decode``'s samples (3 tokens of 3 codes, 27 outcomes) against exact AR sampling."""
    from unitok.decoding.sampling import SamplingConfig

    codes = 3
    model = tiny_model(codes, seed=3)
    visual = VisualVocab(offset=TEXT, size=codes, boi_id=4)
    layout = NextTokenMode().layout(TokenGrid(1, 1, 3), PREFIX.shape[1])
    outcomes, probs = exact_distribution(model, layout, visual, PREFIX, NULL, guidance)
    if options.get("draft_model") == "tiny":
        options["draft_model"] = tiny_model(codes, seed=4)
    out = decode(
        model,
        layout,
        PREFIX.expand(samples, -1),
        visual,
        guidance,
        NULL,
        SamplingConfig(),
        torch.Generator().manual_seed(seed),
        **options,
    )
    return chi_square_pvalue(out.tokens, outcomes, probs, codes)
