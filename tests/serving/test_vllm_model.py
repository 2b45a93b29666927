"""The bundled next-token generator through vLLM (one AsyncLLM for the module): HF-vs-vLLM log-prob parity, CFG pairs
that stay paired under concurrent requests, the visual-only vocabulary, seeds, and input validation."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", exc_type=ImportError)

from unitok.decoding.block import decode_blocks  # noqa: E402
from unitok.decoding.cfg import next_token_guided_logprobs  # noqa: E402
from unitok.decoding.sampling import SamplingConfig  # noqa: E402
from unitok.model.pretrained import load_generator  # noqa: E402

pytestmark = pytest.mark.vllm

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "gen-next-token"
SCALE = 3.0
ATOL = 2e-3  # fp32 log-probs of the same model, different kernels and batch shapes


@pytest.fixture(scope="module")
def engine(loop):
    from unitok.serving.vllm_engine import VllmImageEngine

    if not (CHECKPOINT / "config.json").is_file():
        pytest.skip("no bundled gen-next-token checkpoint")
    engine = VllmImageEngine.start(CHECKPOINT, guidance_scale=SCALE, max_logprobs=-1)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def gen():
    return load_generator(CHECKPOINT)


def hf_logprobs(gen, conditions: list, tokens: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    return next_token_guided_logprobs(gen, conditions, tokens, scale)


def test_plugin_is_installed_and_unitok_does_not_import_vllm():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from unitok.serving.vllm_plugin import ARCHITECTURE, register

    plugins = {p.name: p.value for p in entry_points(group="vllm.general_plugins")}
    assert plugins.get("unitok") == "unitok.serving.vllm_plugin:register"
    register()
    register()  # idempotent: vLLM loads plugins in every process
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    code = "import sys, unitok, unitok.serving; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_greedy_logprobs_match_hf(engine, gen, loop):
    """check_logprobs_close, stricter: vLLM's top-5 log-probs at every step of every class equal HF's for the same
    tokens, and where greedy HF and greedy vLLM differ, the two choices are a near-tie in both models."""
    classes = list(range(10))
    greedy = SamplingConfig(temperature=0.0)
    prefixes = gen.vocab.prefix_ids(classes)

    async def run():
        return await asyncio.gather(*(engine.sample(p.tolist(), sampling=greedy, logprobs=5) for p in prefixes))

    results = loop.run_until_complete(run())
    tokens = torch.cat([r.tokens for r in results])  # (10, N)
    reference = hf_logprobs(gen, classes, tokens)  # (10, N, V)
    worst = 0.0
    for row, result in enumerate(results):
        for step, top in enumerate(result.logprobs[0]):
            assert len(top) >= 5
            for token, logprob in top.items():
                worst = max(worst, abs(logprob - float(reference[row, step, token])))
            chosen = int(tokens[row, step])
            assert float(reference[row, step].max() - reference[row, step, chosen]) < ATOL  # vLLM's argmax is HF's
    assert worst < ATOL

    hf = decode_blocks(
        gen.model, gen.layout(), prefixes, gen.visual, SCALE, gen.vocab.prefix_ids([None]), greedy
    ).tokens  # (10, N): HF greedy, its own prefix of choices
    for row in range(len(classes)):
        mismatch = (hf[row] != tokens[row]).nonzero()
        if len(mismatch):  # identical up to here, so the same context: the two choices must nearly tie
            step = int(mismatch[0])
            ref = reference[row, step]
            assert abs(float(ref[tokens[row, step]] - ref[hf[row, step]])) < ATOL


def test_cfg_pairs_stay_paired_under_concurrent_requests(engine, gen, loop):
    """16 staggered requests (different classes, seeds and filters) share the batch; every sampled token's vLLM
    log-prob equals the HF log-prob of the pair (this request's condition, the null condition) fed this request's
    tokens. A sequence whose unconditional half were missing, late, or another request's would not match; the same
    check against the wrong condition must fail, which shows the check can."""
    filters = [SamplingConfig(top_k=(0, 50, 200)[i % 3], top_p=(1.0, 0.9)[i % 2]) for i in range(16)]
    requests = [(i % 10, 1000 + i, filters[i]) for i in range(16)]

    async def one(i, condition, seed, sampling):
        await asyncio.sleep(0.15 * i)  # join a batch that is already decoding
        prefix = gen.vocab.prefix_ids([condition])[0].tolist()
        return await engine.sample(prefix, seed=seed, sampling=sampling, logprobs=0)

    async def run():
        return await asyncio.gather(*(one(i, *r) for i, r in enumerate(requests)))

    results = loop.run_until_complete(run())
    tokens = torch.cat([r.tokens for r in results])  # (16, N)
    conditions = [c for c, _, _ in requests]
    reported = torch.tensor(
        [[step[int(t)] for step, t in zip(r.logprobs[0], r.tokens[0], strict=True)] for r in results]
    )
    reference = hf_logprobs(gen, conditions, tokens).gather(-1, tokens[..., None])[..., 0]  # (16, N)
    assert (reported - reference).abs().max() < ATOL
    wrong = hf_logprobs(gen, [(c + 1) % 10 for c in conditions], tokens).gather(-1, tokens[..., None])[..., 0]
    assert ((reported - wrong).abs().amax(1) > 0.1).all()

    # A seed makes a request reproducible whatever else shares the batch.
    for i in (0, 7):
        condition, seed, sampling = requests[i]
        prefix = gen.vocab.prefix_ids([condition])[0].tolist()
        alone = loop.run_until_complete(engine.sample(prefix, seed=seed, sampling=sampling)).tokens
        assert torch.equal(alone[0], tokens[i])


def test_visual_vocabulary_only(engine, gen, loop):
    """Every text id has probability 0 at every step (asked for explicitly), every sample is a visual token."""
    from vllm import SamplingParams

    spec = engine.spec
    text_ids = list(range(spec.visual_offset))
    params = SamplingParams(
        temperature=1.5, max_tokens=spec.num_visual, ignore_eos=True, detokenize=False, logprob_token_ids=text_ids
    )
    prompt = spec.prompt(gen.vocab.prefix_ids(["sneaker"])[0].tolist())

    async def run():
        final = None
        async for out in engine.llm.generate({"prompt_token_ids": prompt}, params, request_id="visual-only"):
            final = out
        return final.outputs[0]

    out = loop.run_until_complete(run())
    assert len(out.token_ids) == spec.num_visual
    assert all(spec.visual_offset <= t < spec.visual_offset + spec.num_visual_tokens for t in out.token_ids)
    for step in out.logprobs:
        assert all(step[t].logprob == float("-inf") for t in text_ids)


def test_n_images_follow_seed_plus_index(engine, gen, loop):
    prefix = gen.vocab.prefix_ids(["bag"])[0].tolist()

    async def run():
        many = engine.generate(prefix, n=3, seed=5)
        singles = [engine.generate(prefix, n=1, seed=5 + i) for i in range(3)]
        return await asyncio.gather(many, *singles)

    many, *singles = loop.run_until_complete(run())
    assert many.shape == (3, engine.spec.num_visual) and many.dtype == torch.long
    assert torch.equal(many, torch.cat(singles))
    assert not torch.equal(many[0], many[1])


def test_cpu_engine_core_runs_the_model(engine):
    """vLLM's CPU default (a third, single-threaded ``VLLM::Worker`` process busy-polling the engine core) decoded
    27 images/s where the engine core running the model decodes 35 (eager) to 58 (compiled) on the 2-core machine."""
    import psutil

    assert engine.llm.vllm_config.parallel_config.distributed_executor_backend == "uni"
    names = [p.name() for p in psutil.Process().children(recursive=True)]
    assert "VLLM::EngineCore" in names and "VLLM::Worker" not in names


SCRIPT_START_STOP = """
import asyncio, gc, sys, weakref
from unitok.serving.vllm_engine import VllmImageEngine, close_loop

if __name__ == "__main__":
    engine = VllmImageEngine.start(sys.argv[1])  # the first import of vLLM in this process
    llm = weakref.ref(engine.llm)
    loop = asyncio.new_event_loop()
    tokens = loop.run_until_complete(engine.generate([2] + [0] * (engine.spec.prefix_len - 1), seed=0))
    engine.shutdown()
    close_loop(loop)
    gc.collect()
    print("tokens", tuple(tokens.shape), "released", llm() is None)
"""


def test_a_script_that_starts_and_shuts_down_an_engine_releases_it_and_exits_cleanly(tmp_path):
    """vLLM keeps an optional dependency's ImportError with its traceback, and so the frames of the call that first
    imported vLLM: ``VllmImageEngine.start``'s held the AsyncLLM past ``shutdown()``, and vLLM's finaliser then failed
    at interpreter exit ("Exception ignored in AsyncLLM.__del__")."""
    script = tmp_path / "start_stop.py"
    script.write_text(SCRIPT_START_STOP)
    done = subprocess.run([sys.executable, str(script), str(CHECKPOINT)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tokens (1, 49) released True" in done.stdout, done.stdout[-2000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


def test_lower_priority_nices_every_thread_and_caps_at_19():
    """``lower_priority`` (what ``VllmImageEngine.start(nice=...)`` applies to the engine core) adds to the niceness
    of every thread of a process, never past 19."""
    from unitok.serving.vllm_engine import lower_priority

    code = "import threading, time; [threading.Thread(target=time.sleep, args=(60,)).start() for _ in range(2)]"
    child = subprocess.Popen([sys.executable, "-c", code + "; time.sleep(60)"])
    try:
        tasks = Path(f"/proc/{child.pid}/task")
        deadline = time.monotonic() + 30
        while len(list(tasks.iterdir())) < 3:
            assert time.monotonic() < deadline, "the child's threads never started"
            time.sleep(0.05)
        base = os.getpriority(os.PRIO_PROCESS, child.pid)
        niceness = lambda: {os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in tasks.iterdir()}  # noqa: E731
        lower_priority(child.pid, 3)
        assert niceness() == {min(19, base + 3)}
        lower_priority(child.pid, 19)
        assert niceness() == {19}
    finally:
        child.kill()
        child.wait()


def test_compile_cache_is_per_user_and_falls_back_to_a_temporary_folder(tmp_path, monkeypatch):
    from unitok.serving.vllm_engine import compile_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "unitok" / "vllm" and (tmp_path / "unitok" / "vllm").is_dir()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # cannot hold folders
    fallback = compile_cache_dir()
    assert fallback.is_dir() and fallback.name.startswith("unitok-vllm-") and not str(fallback).startswith(str(blocked))


def test_start_refuses_a_bad_nice():
    from unitok.serving.vllm_engine import VllmImageEngine

    for bad in (-1, 20, 2.5, True):
        with pytest.raises(ValueError, match="nice must be"):
            VllmImageEngine.start(CHECKPOINT, nice=bad)


def test_greedy_n_images_are_one_image_repeated(engine, gen, loop):
    """vLLM refuses n > 1 with temperature 0; the engine samples once and repeats (greedy samples are equal)."""
    prefix = gen.vocab.prefix_ids(["shirt"])[0].tolist()

    async def run():
        return await asyncio.gather(engine.generate(prefix, n=3, temperature=0.0), engine.generate(prefix, n=1))

    many, _ = loop.run_until_complete(run())
    one = loop.run_until_complete(engine.generate(prefix, temperature=0.0))
    assert many.shape == (3, engine.spec.num_visual) and torch.equal(many, one.expand(3, -1))


def test_cancelled_request_frees_the_engine(engine, gen, loop):
    prefix = gen.vocab.prefix_ids(["boot"])[0].tolist()

    async def run():
        task = asyncio.ensure_future(engine.generate(prefix, n=8, seed=1))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await engine.generate(prefix, seed=2)

    assert loop.run_until_complete(run()).shape == (1, engine.spec.num_visual)


def test_bad_requests_raise_value_error(engine, gen, loop):
    prefix = gen.vocab.prefix_ids(["coat"])[0].tolist()
    with pytest.raises(ValueError, match="guides with scale"):
        loop.run_until_complete(engine.generate(prefix, guidance_scale=1.5))
    with pytest.raises(ValueError, match="prefix has"):
        loop.run_until_complete(engine.generate(prefix[:-1]))
    with pytest.raises(ValueError, match="text ids"):
        loop.run_until_complete(engine.generate([prefix[0], *[engine.spec.visual_offset] * (len(prefix) - 1)]))
    with pytest.raises(ValueError, match="n must be"):
        loop.run_until_complete(engine.generate(prefix, n=0))
    with pytest.raises(ValueError, match="top_p"):
        loop.run_until_complete(engine.generate(prefix, top_p=0.0))
