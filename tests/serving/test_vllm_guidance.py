"""Per-request guidance scales inside vLLM: the logits processor on its own, and ``unitok serve
--per-request-guidance`` (a subprocess) whose every sampled token has the HF guided log-prob at its request's scale."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", exc_type=ImportError)

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402

from unitok.bench.serving import ServerProcess  # noqa: E402
from unitok.decoding.cfg import next_token_guided_logprobs  # noqa: E402
from unitok.serving.vllm_guidance import GuidanceLogitsProcessor  # noqa: E402
from unitok.serving.vllm_spec import ImageSpec  # noqa: E402

pytestmark = pytest.mark.vllm

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
CHECKPOINT = CHECKPOINTS / "gen-next-token"


@pytest.fixture(scope="module")
def spec():
    if not (CHECKPOINT / "config.json").is_file():
        pytest.skip("no bundled gen-next-token checkpoint")
    return dataclasses.replace(ImageSpec.from_pretrained(CHECKPOINT), per_request_guidance=True)


def _added(index: int, scale: float | None):
    extra = None if scale is None else {"guidance_scale": scale}
    return (index, SamplingParams(extra_args=extra), [], [])


def test_processor_guides_each_row_with_its_requests_scale(spec):
    processor = GuidanceLogitsProcessor.for_spec(spec)
    assert not processor.is_argmax_invariant()
    v, visual = spec.vocab_size, slice(spec.visual_offset, spec.visual_offset + spec.num_visual_tokens)
    # rows 0..3: scales 1.5, default (3.0), 0.0, 5.0; then row 3 moves to row 1 and row 0 leaves
    processor.update_state(BatchUpdate(4, [], [_added(0, 1.5), _added(1, None), _added(2, 0.0), _added(3, 5.0)], []))
    logits = torch.randn(4, 2 * v)
    out = processor.apply(logits.clone())
    assert out.shape == (4, v)
    for row, scale in enumerate([1.5, 3.0, 0.0, 5.0]):
        cond, uncond = logits[row, :v][visual], logits[row, v:][visual]
        assert torch.allclose(out[row, visual], uncond + scale * (cond - uncond), atol=1e-5)
    outside = torch.ones(v, dtype=torch.bool)
    outside[visual] = False
    assert torch.isneginf(out[:, outside]).all()
    processor.update_state(BatchUpdate(3, [0, 1], [], [(3, 1, MoveDirectionality.UNIDIRECTIONAL)]))
    out = processor.apply(logits[:3].clone())
    cond, uncond = logits[1, :v][visual], logits[1, v:][visual]
    assert torch.allclose(out[1, visual], uncond + 5.0 * (cond - uncond), atol=1e-5)  # the moved request's scale
    cond, uncond = logits[0, :v][visual], logits[0, v:][visual]
    assert torch.allclose(out[0, visual], uncond + 3.0 * (cond - uncond), atol=1e-5)  # a freed row: the default
    with pytest.raises(RuntimeError, match="paired logits"):
        processor.apply(torch.randn(2, v))
    with pytest.raises(ValueError, match="guidance_scale"):
        GuidanceLogitsProcessor.validate_params(SamplingParams(extra_args={"guidance_scale": -1.0}))
    with pytest.raises(ValueError, match="per_request_guidance"):
        GuidanceLogitsProcessor.for_spec(dataclasses.replace(spec, per_request_guidance=False))


def test_per_request_guidance_does_not_combine_with_a_draft():
    from unitok.serving.vllm_engine import VllmImageEngine

    with pytest.raises(ValueError, match="draft"):
        VllmImageEngine.start(CHECKPOINT, draft=CHECKPOINTS / "gen-draft", per_request_guidance=True)


def test_server_serves_every_scale_through_vllm(spec):
    import httpx
    import openai

    from unitok.model.pretrained import load_generator
    from unitok.serving.server import vllm_importable

    if not vllm_importable():
        pytest.skip("vllm does not import here")
    gen = load_generator(CHECKPOINT)
    extra = ["--enforce-eager", "--per-request-guidance"]
    with ServerProcess(CHECKPOINT, "vllm", max_n=4, max_queue=8, extra_args=extra) as server:
        health = httpx.get(f"{server.url}/health").json()
        vllm = health["vllm"]["gen-next-token"]
        assert vllm["guidance_scale"] == 3.0 and vllm["per_request_guidance"] is True and vllm["alive"] is True
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
        jobs = [("bag", 1.0), ("sneaker", 1.5), ("coat", None), ("dress", 5.0), ("boot", 0.0)]

        def call(job):
            prompt, scale = job
            extra_body = {} if scale is None else {"guidance_scale": scale}
            out = client.completions.create(
                model="gen-next-token", prompt=prompt, seed=3, logprobs=0, extra_body=extra_body
            )
            return out.choices[0]

        with ThreadPoolExecutor(len(jobs)) as pool:  # concurrent: the scales share vLLM's batches
            choices = list(pool.map(call, jobs))
        for (prompt, scale), choice in zip(jobs, choices, strict=True):
            tokens = torch.tensor([[int(t) for t in choice.text.split()]])
            served = torch.tensor([choice.logprobs.token_logprobs])
            own = 3.0 if scale is None else scale
            for other, close in ((own, True), (own + 0.5, False)):
                reference = next_token_guided_logprobs(gen, [prompt], tokens, other)
                error = float((served - reference.gather(-1, tokens[..., None])[..., 0]).abs().max())
                assert error < 2e-3 if close else error > 0.1, (prompt, scale, other, error)
        client.images.generate(model="gen-next-token", prompt="bag", extra_body={"guidance_scale": 1.5, "seed": 0})
        counters = httpx.get(f"{server.url}/health").json()["counters"]
        assert counters["vllm_requests"] == len(jobs) + 1 and counters["native_requests"] == 0
        with pytest.raises(openai.BadRequestError, match="guidance_scale"):
            client.images.generate(model="gen-next-token", prompt="bag", extra_body={"guidance_scale": -2})
