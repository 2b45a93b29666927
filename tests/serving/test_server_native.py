"""The native batching engine on its own: batches, per-request seeds, bounded queue, cancellation, shutdown."""

from __future__ import annotations

import threading

import pytest
import torch

from unitok.decoding.cfg import Guidance
from unitok.decoding.sampling import SamplingConfig
from unitok.serving.native import (
    BatchAbandonedError,
    BatchKey,
    EngineClosedError,
    NativeEngine,
    NativeRequest,
    QueueFullError,
    RowSeededVisual,
)

from .conftest import CHECKPOINTS  # noqa: E402

KEY = BatchKey("gen-next-block", Guidance(3.0), SamplingConfig())


class Gate:
    """A ``resolve`` that holds the worker on its first call until ``open()``."""

    def __init__(self, gen):
        self.gen, self.entered, self.opened = gen, threading.Event(), threading.Event()

    def __call__(self, model_id: str):
        self.entered.set()
        self.opened.wait(60)
        return self.gen

    def open(self):
        self.opened.set()


@pytest.fixture
def gen(pipeline):
    return pipeline.generator("next-block")


def test_batched_requests_equal_each_request_alone(pipeline, gen):
    gate = Gate(gen)
    engine = NativeEngine(gate, max_queue=8)
    try:
        first = engine.submit(NativeRequest(KEY, ["bag"], seed=0))
        assert gate.entered.wait(30)
        requests = [(["sneaker", "sneaker"], 7), ([1, "coat", 9], 8), (["dress"], None)]
        futures = [engine.submit(NativeRequest(KEY, c, s)) for c, s in requests]
        gate.open()
        results = [f.result(60) for f in futures]
        assert first.result(60).batch_requests == 1
    finally:
        engine.close()
    assert engine.stats.batches == 2 and engine.stats.max_batch_requests == 3 and engine.stats.images == 7
    for (conditions, seed), result in zip(requests, results, strict=True):
        assert result.batch_requests == 3 and result.batch_images == 6
        if seed is not None:
            assert result.seed == seed
        # an unseeded request reports the random seed that reproduces it
        n = len(conditions)
        alone = pipeline(conditions, num_images=n, mode="next-block", guidance_scale=3.0, seed=result.seed)
        assert torch.equal(result.tokens, alone.tokens)


def test_row_seeded_head_draws_each_group_from_its_own_generator(gen):
    scores = torch.randn(5, 7, gen.visual.size)
    seen = []
    listen = lambda *args: seen.append(args)  # noqa: E731
    groups = [(2, torch.Generator().manual_seed(1), None), (3, torch.Generator().manual_seed(2), listen)]
    head = RowSeededVisual(gen.visual, groups)
    drawn = head.sample(scores, SamplingConfig())
    expected = torch.cat(
        [
            gen.visual.sample(scores[:2], SamplingConfig(), torch.Generator().manual_seed(1)),
            gen.visual.sample(scores[2:], SamplingConfig(), torch.Generator().manual_seed(2)),
        ]
    )
    assert torch.equal(drawn, expected)
    assert len(seen) == 1 and seen[0][0] == 0 and torch.equal(seen[0][1], expected[2:])  # block 0, its own rows
    head.sample(scores, SamplingConfig())
    assert len(seen) == 2 and seen[1][0] == 1 and seen[1][1].shape == (3, 14)  # tokens so far
    with pytest.raises(ValueError, match="rows"):
        head.sample(scores[:4], SamplingConfig())


def test_bounded_queue_cancellation_and_shutdown(gen):
    gate = Gate(gen)
    engine = NativeEngine(gate, max_queue=2, max_batch_images=4)
    with pytest.raises(ValueError, match="at most 4 samples"):
        engine.submit(NativeRequest(KEY, ["bag"] * 5))
    with pytest.raises(ValueError, match="seed"):
        NativeRequest(KEY, ["bag"], seed=-1)
    running = engine.submit(NativeRequest(KEY, ["bag"], seed=0))
    assert gate.entered.wait(30)
    waiting = engine.submit(NativeRequest(KEY, ["coat"], seed=0))
    with pytest.raises(QueueFullError, match="busy"):
        engine.submit(NativeRequest(KEY, ["coat"]))
    assert waiting.cancel() and engine.pending == 1 and engine.stats.cancelled == 1  # the slot is free again
    again = engine.submit(NativeRequest(KEY, ["coat"], seed=0))
    engine.close(timeout=0)  # fails what waits; the running batch finishes
    with pytest.raises(EngineClosedError):
        again.result(10)
    gate.open()
    assert running.result(60).tokens.shape == (1, gen.spec.num_tokens)
    with pytest.raises(EngineClosedError):
        engine.submit(NativeRequest(KEY, ["bag"]))


def test_a_running_batch_stops_when_every_request_is_cancelled(gen):
    blocks = gen.layout().num_blocks
    engine = NativeEngine(lambda model_id: gen, batch_window_s=0)

    def one_batch(on_tokens) -> list:
        """Two requests queued behind a held blocker request, so they run as one batch."""
        gate = Gate(gen)
        engine.resolve = gate
        blocker = engine.submit(NativeRequest(KEY, ["bag"], seed=9))
        assert gate.entered.wait(30)
        futures = [engine.submit(NativeRequest(KEY, ["coat"], seed=i, on_tokens=on_tokens(i))) for i in range(2)]
        gate.open()
        assert blocker.result(60).batch_requests == 1
        return futures

    try:
        # the first request is cancelled at block 2: it leaves the batch before block 3 (answered, its slot free
        # while the batch still runs), the second goes on with the tokens it gets when nobody leaves
        uncancelled = one_batch(lambda i: None)[1].result(60)
        seen: list = []
        left: list = []

        def cancel_first(i):
            def on_tokens(block, tokens):
                seen.append((i, block))
                if i == 0 and block == 2:
                    assert engine.cancel(futures[0])
                if i == 1 and block == 4:
                    left.append((futures[0].done(), engine.pending))

            return on_tokens

        futures = one_batch(cancel_first)
        survivor = futures[1].result(60)
        with pytest.raises(BatchAbandonedError, match="left its batch at block 3"):
            futures[0].result(1)
        assert survivor.batch_requests == 2 and torch.equal(survivor.tokens, uncancelled.tokens)
        assert left == [(True, 1)]  # answered and out of the count two blocks before the batch ends
        assert [b for i, b in seen if i == 0] == [0, 1, 2] and [b for i, b in seen if i == 1] == list(range(blocks))
        assert engine.stats.cancelled == 1
        # both cancelled at block 2: the batch stops before drawing block 3, and the worker goes on
        seen.clear()

        def cancel_both(i):
            def on_tokens(block, tokens):
                seen.append((i, block))
                if i == 1 and block == 2:
                    assert engine.cancel(futures[0]) and engine.cancel(futures[1])

            return on_tokens

        futures = one_batch(cancel_both)
        for future in futures:
            with pytest.raises(BatchAbandonedError, match="cancelled"):
                future.result(60)
        assert max(b for _, b in seen) == 2 < blocks - 1 and engine.stats.cancelled == 3
        after = engine.submit(NativeRequest(KEY, ["bag"], seed=0))
        assert after.result(60).tokens.shape[0] == 1 and not engine.cancel(after)  # finished: nothing to cancel
    finally:
        engine.close()


def test_a_multi_image_request_leaves_a_running_batch_whole(gen):
    """A cancelled request of 2 images leaves its batch with both rows (and their CFG rows); the 1-image request
    after it keeps its own rows and gets the image it gets alone."""
    engine = NativeEngine(lambda model_id: gen, batch_window_s=0)
    try:
        alone = engine.submit(NativeRequest(KEY, ["bag"], seed=5)).result(60)
        gate = Gate(gen)
        engine.resolve = gate
        blocker = engine.submit(NativeRequest(KEY, ["coat"], seed=9))
        assert gate.entered.wait(30)
        futures = []

        def leave(block, tokens):
            assert tokens.shape[0] == 2
            if block == 1:
                assert engine.cancel(futures[0])

        futures.append(engine.submit(NativeRequest(KEY, ["dress", "shirt"], seed=3, on_tokens=leave)))
        futures.append(engine.submit(NativeRequest(KEY, ["bag"], seed=5)))
        gate.open()
        blocker.result(60)
        stayed = futures[1].result(60)
        with pytest.raises(BatchAbandonedError, match="left its batch at block 2"):
            futures[0].result(1)
        assert torch.equal(stayed.tokens, alone.tokens) and stayed.batch_images == 3
        assert engine.stats.images == 3 and engine.stats.cancelled == 1  # bag, coat, bag: the pair was never finished
    finally:
        engine.close()


@pytest.mark.parametrize("decoder", ["sjd", "draft"])
def test_a_request_cancelled_in_a_speculative_batch_leaves_before_the_next_pass(pipeline, decoder, monkeypatch):
    """Unseeded requests share a speculative-decoder batch; one cancelled mid-batch is answered at once and its rows
    (and CFG rows) take no part in later passes; the other still gets a whole image."""
    import unitok.decoding.engine as engine_module

    gen = pipeline.generator("next-token")
    options = {"draft_model": pipeline._draft_model(gen, CHECKPOINTS / "gen-draft")} if decoder == "draft" else {}
    key = BatchKey("gen-next-token", Guidance(3.0), SamplingConfig(), decoder)
    engine = NativeEngine(lambda model_id: gen, batch_window_s=0, decoder_resources=lambda model_id, name: options)
    futures, widths = [], []
    forward = engine_module.KVEngine.forward

    def spy(self, inputs_embeds, *args, **kw):
        widths.append(inputs_embeds.shape[0])
        if widths.count(4) == 2 and not futures[0].done():  # the pair's second forward: the first request leaves
            assert engine.cancel(futures[0])
        return forward(self, inputs_embeds, *args, **kw)

    try:
        gate = Gate(gen)
        engine.resolve = gate
        blocker = engine.submit(NativeRequest(key, ["bag"], seed=9))  # seeded: runs alone
        assert gate.entered.wait(30)
        futures += [engine.submit(NativeRequest(key, [c])) for c in ("coat", "dress")]
        monkeypatch.setattr(engine_module.KVEngine, "forward", spy)
        gate.open()
        assert blocker.result(60).batch_requests == 1
        stayed = futures[1].result(60)
        with pytest.raises(BatchAbandonedError, match="left its batch"):
            futures[0].result(1)
    finally:
        engine.close()
    assert stayed.tokens.shape == (1, 49) and stayed.batch_requests == 2
    # the shared batch's forwards: 2 requests x (cond + null) rows until the pass the cancel fell in is over (sjd:
    # one forward a pass; draft: 4 draft forwards and a target one), then 1 x 2
    full = 2 if decoder == "sjd" else 5
    after = widths[widths.index(4) :]
    assert after[:full] == [4] * full and set(after[full:]) == {2} and engine.stats.cancelled == 1


def test_a_request_cancelled_in_an_hf_batch_is_answered_before_the_batch_ends(pipeline, monkeypatch):
    """``generate`` cannot shrink its batch, but a request cancelled in an ``hf`` batch is answered (and its slot
    freed) at the next token, while the other goes on to a whole image."""
    import unitok.decoding.engine as engine_module

    gen = pipeline.generator("next-token")
    key = BatchKey("gen-next-token", Guidance(3.0), SamplingConfig(), "hf")
    engine = NativeEngine(lambda model_id: gen, batch_window_s=0)
    futures, seen = [], []
    forward = engine_module.KVEngine.forward  # the unconditional rows' forwards (VisualLogitsProcessor), one a step

    def spy(self, inputs_embeds, *args, **kw):
        if inputs_embeds.shape[0] == 2:  # the shared batch (the blocker runs alone: 1 row)
            seen.append((futures[0].done(), engine.pending))
            if len(seen) == 3:
                assert engine.cancel(futures[0])
        return forward(self, inputs_embeds, *args, **kw)

    try:
        gate = Gate(gen)
        engine.resolve = gate
        blocker = engine.submit(NativeRequest(key, ["bag"], seed=9))
        assert gate.entered.wait(30)
        futures += [engine.submit(NativeRequest(key, [c])) for c in ("coat", "dress")]
        monkeypatch.setattr(engine_module.KVEngine, "forward", spy)
        gate.open()
        blocker.result(60)
        stayed = futures[1].result(60)
        with pytest.raises(BatchAbandonedError, match="left its batch at block 3"):
            futures[0].result(1)
    finally:
        engine.close()
    assert stayed.tokens.shape == (1, 49) and stayed.batch_requests == 2 and engine.stats.cancelled == 1
    assert seen[2] == (False, 2) and seen[4] == (True, 1) and len(seen) == 49  # answered two steps later, mid-batch


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on(gen):
    calls = []

    def resolve(model_id):
        calls.append(model_id)
        if len(calls) == 1:
            raise RuntimeError("broken generator")
        return gen

    engine = NativeEngine(resolve)
    try:
        with pytest.raises(RuntimeError, match="broken generator"):
            engine.submit(NativeRequest(KEY, ["bag"])).result(60)
        assert engine.submit(NativeRequest(KEY, ["bag"])).result(60).tokens.shape[0] == 1
    finally:
        engine.close()
    assert engine.stats.failed == 1 and engine.stats.requests == 1


def test_engine_arguments_are_checked(gen):
    for kwargs in ({"max_queue": 0}, {"max_batch_images": True}, {"batch_window_s": 5}):
        with pytest.raises(ValueError):
            NativeEngine(lambda m: gen, **kwargs)
