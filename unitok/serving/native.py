"""The native batching engine: concurrent generation requests share forward passes, seeds stay per request.

One worker thread owns the transformer. Requests wait in a bounded FIFO queue; whenever the worker is free it takes
the oldest request and every waiting request with the same :class:`BatchKey` (generator, guidance, sampling,
decoder and its options), up to ``max_batch_images`` samples, and runs them as ONE batch through the decoder: the
rows of all requests ride in the same forwards (CFG null rows included), which is what makes a busy server faster
per image than requests served one by one. Requests that arrive while a batch runs wait for the next one, so under
load batches fill up by themselves (continuous batching at request granularity).

Seeds (what is ours): the block decoder draws every token through the visual head's ``sample``, so the batch runs
with :class:`RowSeededVisual`, a head that samples each request's rows from that request's own
``torch.Generator``. A request's random stream is then exactly the one ``UnitokPipeline(prompt, num_images=n,
seed=s)`` uses alone: the same seed gives the same tokens batched or not (up to float rounding of batched
matmuls, which can flip a draw lying on a boundary of the inverse CDF; tested equal on the bundled models).
Requests without a seed get a random one, reported back so their samples can be reproduced. The speculative
decoders (sjd, grouped, relaxed, draft, hf) draw from one generator for the whole batch, so for them only requests
*without* a seed are batched together (their result reports no seed: no single seed reproduces a shared stream);
a seeded request runs alone, again equal to the pipeline run with its seed.

Limits and cancellation: at most ``max_queue`` requests are admitted (waiting or running); :meth:`submit` raises
:class:`QueueFullError` beyond that. A request cancelled (:meth:`NativeEngine.cancel`, or its awaiting task
cancelled: its client went away) while it waits leaves the queue at once and frees its slot. One cancelled while its
block-decoder batch runs leaves the batch before the next block: its rows are dropped from the KV cache and from every
later forward, its slot frees up, and the others go on with the tokens they would have had anyway (each draws from
its own generator); when every request is cancelled the batch stops. The speculative decoders (sjd, grouped,
relaxed, draft) drop a cancelled request's rows the same way before their next pass (the others then draw from the
shared stream of a smaller batch: they were unseeded anyway). ``hf`` (transformers' ``generate``, which cannot
shrink its batch) hears it after the next token through a stopping criterion: the request is answered and its slot
freed at once, its rows are computed on (and dropped from the result) until every request has left, which stops
``generate``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from unitok.decoding.cfg import Guidance
from unitok.decoding.sampling import SamplingConfig
from unitok.model.heads import VisualVocab
from unitok.model.pretrained import Generator

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The engine already holds ``max_queue`` requests."""


class EngineClosedError(RuntimeError):
    """The engine was shut down before the request ran."""


class BatchAbandonedError(RuntimeError):
    """Every request of a running batch was cancelled, so the batch stopped early."""


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to ride in one batch."""

    model: str  # the served model id (one generator)
    guidance: Guidance
    sampling: SamplingConfig
    decoder: str = "block"
    options: tuple[tuple[str, Any], ...] = ()  # the decoder's options, sorted by name


@dataclass
class NativeRequest:
    key: BatchKey
    conditions: list  # one condition per sample (class index, class name or prompt)
    seed: int | None = None  # None: a random seed, drawn at submission and reported in the result
    on_tokens: TokensCallback | None = None  # block decoder only: called after every block (streaming previews)
    pixels: bool = False  # also decode the samples to pixels (on the worker, with the batch: one decode per batch)

    def __post_init__(self):
        if not self.conditions:
            raise ValueError("a request needs at least one condition")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")
        if self.on_tokens is not None and self.key.decoder != "block":
            raise ValueError("on_tokens (streaming) needs the block decoder")


@dataclass
class NativeResult:
    tokens: torch.Tensor  # (n, N) visual token ids, what ``gen.codec.decode`` takes
    pixels: torch.Tensor | None  # (n, C, H, W) or (n, T, C, H, W) in [-1, 1] when the request asked for pixels
    seed: int | None  # the seed that reproduces these samples; None when no single seed does (see module doc)
    batch_requests: int  # how many requests shared the batch (when it started)
    batch_images: int  # how many samples the batch started with


@dataclass
class EngineStats:
    batches: int = 0
    requests: int = 0
    images: int = 0
    max_batch_requests: int = 0
    max_batch_images: int = 0
    cancelled: int = 0  # requests dropped because their client went away
    failed: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _Job:
    request: NativeRequest
    seed: int
    seeded: bool  # the caller chose the seed (matters for decoders that cannot seed rows separately)
    future: Future = field(default_factory=Future)
    abandoned: bool = False  # cancelled while running: not answered (set from the caller's thread)

    @property
    def size(self) -> int:
        return len(self.request.conditions)


TokensCallback = Callable[[int, torch.Tensor], None]  # (block index, (rows, tokens so far)), from the worker


class RowSeededVisual(VisualVocab):
    """The visual head whose ``sample`` draws each request's rows from that request's own generator.

    ``groups`` lists (rows, generator, on_tokens or None) in row order. The generator the decoder passes is ignored:
    every draw of the block decoder goes through this method, one call per block with (B, ...) guided scores, which
    also makes it the place to report each request's tokens so far (streaming previews). Requests whose callers
    left are dropped between blocks (the decoder's ``prune``, then :meth:`keep_groups`)."""

    def __init__(
        self,
        base: VisualVocab,
        groups: list[tuple[int, torch.Generator, TokensCallback | None]],
    ):
        super().__init__(base.offset, base.size, base.boi_id, base.bits)
        self.groups = groups
        self.blocks = 0
        self.so_far: list[torch.Tensor | None] = [None] * len(groups)

    def keep_groups(self, keep: list[bool]) -> None:
        """Drop the groups (requests) whose ``keep`` is False: the decoder dropped their rows."""
        self.groups = [g for g, k in zip(self.groups, keep, strict=True) if k]
        self.so_far = [t for t, k in zip(self.so_far, keep, strict=True) if k]

    def sample(self, scores: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None):
        total = sum(rows for rows, _, _ in self.groups)
        if scores.shape[0] != total:
            raise ValueError(f"scores have {scores.shape[0]} rows, the batch's requests {total}")
        parts, start = [], 0
        for i, (rows, rng, on_tokens) in enumerate(self.groups):
            drawn = super().sample(scores[start : start + rows], sampling, rng)  # (rows, block size)
            parts.append(drawn)
            start += rows
            if on_tokens is not None:
                before = self.so_far[i]
                self.so_far[i] = drawn if before is None else torch.cat([before, drawn], dim=1)
                try:
                    on_tokens(self.blocks, self.so_far[i].clone())
                except Exception:  # a listener's failure must not fail the batch
                    logger.exception("a tokens callback failed")
        self.blocks += 1
        return torch.cat(parts)


class NativeEngine:
    """A bounded request queue and one worker thread that batches compatible requests (see the module docstring).

    ``resolve(model_id) -> Generator`` gives the loaded generator of a :class:`BatchKey`'s model;
    ``decoder_resources(model_id, decoder) -> dict`` may add decoder options that are objects (the draft model).
    """

    def __init__(
        self,
        resolve: Callable[[str], Generator],
        max_queue: int = 64,
        max_batch_images: int = 64,
        batch_window_s: float = 0.004,
        max_wait_s: float = 0.05,
        decoder_resources: Callable[[str, str], dict] | None = None,
    ):
        for name, value in (("max_queue", max_queue), ("max_batch_images", max_batch_images)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= batch_window_s <= max_wait_s <= 1:
            raise ValueError(
                f"need 0 <= batch_window_s <= max_wait_s <= 1 seconds, got {batch_window_s!r} and {max_wait_s!r}"
            )
        self.resolve = resolve
        self.decoder_resources = decoder_resources
        self.max_queue = max_queue
        self.max_batch_images = max_batch_images
        self.batch_window_s = batch_window_s
        self.max_wait_s = max_wait_s
        self.stats = EngineStats()
        self._queue: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._jobs: dict[Future, _Job] = {}  # admitted and not finished
        self._cond = threading.Condition()
        # Held while a batch computes; other torch work of the process (the server's pixel decoding) takes it too,
        # so two OpenMP thread teams never compete for the same cores (a 2-core CPU slowed ~20x when they did).
        self.compute_lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="unitok-native-engine", daemon=True)
        self._thread.start()

    # --- caller side ------------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests admitted and not finished (waiting + running)."""
        with self._cond:
            return len(self._queue) + len(self._running)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, request: NativeRequest) -> Future:
        """Queue ``request``; a ``concurrent.futures.Future`` of its :class:`NativeResult`. Cancelling the future
        before the request runs removes it from the queue; :meth:`cancel` also cancels a running request."""
        return self._submit(request).future

    def _submit(self, request: NativeRequest) -> _Job:
        if len(request.conditions) > self.max_batch_images:
            raise ValueError(f"a request may ask for at most {self.max_batch_images} samples")
        seeded = request.seed is not None
        job = _Job(request, request.seed if seeded else secrets.randbits(63), seeded)
        with self._cond:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if len(self._queue) + len(self._running) >= self.max_queue:
                raise QueueFullError(f"the server is busy: {self.max_queue} requests are already queued or running")
            self._queue.append(job)
            self._jobs[job.future] = job
            self._cond.notify()
        job.future.add_done_callback(self._finished)
        return job

    def cancel(self, future: Future) -> bool:
        """Cancel the request of ``future`` (from :meth:`submit`): a waiting one leaves the queue and its future is
        cancelled; a running one is not answered (its future fails with :class:`BatchAbandonedError`) and leaves its
        batch before the next block or pass (the batch stops when none is left; see the module docstring for
        ``hf``). False if the request had finished already."""
        if future.cancel():
            return True
        with self._cond:
            job = self._jobs.get(future)
            if job is None or future.done():
                return False
            job.abandoned = True
            return True

    async def generate(self, request: NativeRequest) -> NativeResult:
        """Submit and await; cancelling the awaiting task cancels the request (:meth:`cancel`)."""
        job = self._submit(request)
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            self.cancel(job.future)
            raise

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, fail those still waiting, and let the running batch finish."""
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosedError("the engine was shut down before this request ran"))
        self._thread.join(timeout)

    def _finished(self, future: Future) -> None:
        with self._cond:
            job = self._jobs.pop(future, None)
            if job is None or not future.cancelled():
                return
            try:
                self._queue.remove(job)
            except ValueError:
                return  # already taken by the worker (it skips cancelled jobs)
            self.stats.cancelled += 1

    # --- worker side ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            self._gather()
            with self._cond:
                batch = self._take_batch()
                self._running = batch
            if batch:
                try:
                    self._run(batch)
                finally:
                    with self._cond:
                        self._running = []

    def _gather(self) -> None:
        """Let a burst of arrivals join the batch about to start: wait while requests keep coming (every
        ``batch_window_s``), at most ``max_wait_s``. Clients answered by the previous batch come back one by one
        (each response is decoded and sent in turn), and without this wait the next batch would start with the
        first of them alone."""
        if not self.batch_window_s:
            return
        deadline = time.monotonic() + self.max_wait_s
        seen = -1
        while time.monotonic() < deadline:
            with self._cond:
                count = len(self._queue)
            if count == seen or count >= self.max_batch_images:
                return
            seen = count
            time.sleep(self.batch_window_s)

    def _take_batch(self) -> list[_Job]:
        """The oldest live job and every compatible waiting job after it (holding the lock)."""
        batch: list[_Job] = []
        images = 0
        kept: deque[_Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if not batch:
                if not job.future.set_running_or_notify_cancel():
                    self.stats.cancelled += 1
                    continue
                batch.append(job)
                images = job.size
                continue
            if self._compatible(batch[0], job) and images + job.size <= self.max_batch_images:
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    images += job.size
                else:
                    self.stats.cancelled += 1
                continue
            kept.append(job)
        self._queue = kept
        return batch

    @staticmethod
    def _compatible(first: _Job, job: _Job) -> bool:
        if job.request.key != first.request.key:
            return False
        if first.request.key.decoder == "block":
            return True  # rows are seeded per request (RowSeededVisual)
        return not first.seeded and not job.seeded

    def _run(self, batch: list[_Job]) -> None:
        start = time.perf_counter()
        key = batch[0].request.key
        try:
            with self.compute_lock:
                tokens, live = self._decode(key, batch)
                pixels = None if self._abandoned(live) else self._pixels(key, live, tokens)
        except BatchAbandonedError as err:
            logger.info("native engine: %s", err)
            self.stats.cancelled += sum(not job.future.done() for job in batch)
            self.stats.busy_seconds += time.perf_counter() - start
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        except BaseException as err:  # every waiting caller learns why; the worker lives on
            logger.exception("native engine: a batch of %d request(s) for %s failed", len(batch), key.model)
            self.stats.failed += len(batch)
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err if isinstance(err, Exception) else RuntimeError(repr(err)))
            return
        elapsed = time.perf_counter() - start
        images = sum(job.size for job in live)
        stats = self.stats
        stats.batches += 1
        stats.requests += len(live)
        stats.images += images
        stats.max_batch_requests = max(stats.max_batch_requests, len(batch))
        started = sum(job.size for job in batch)  # the batch's images when it started (some may have left)
        stats.max_batch_images = max(stats.max_batch_images, started)
        stats.busy_seconds += elapsed
        stats.cancelled += sum(job.abandoned for job in live)
        row = 0
        for job in live:
            reproducible = key.decoder == "block" or len(batch) == 1
            seed = job.seed if reproducible else None
            mine = slice(row, row + job.size)
            own = pixels[mine].clone() if pixels is not None and job.request.pixels else None
            result = NativeResult(tokens[mine].clone(), own, seed, len(batch), started)
            row += job.size
            if not job.abandoned:  # a cancelled caller is simply not answered
                job.future.set_result(result)
            else:
                job.future.set_exception(BatchAbandonedError("this request was cancelled while its batch ran"))

    @staticmethod
    def _abandoned(batch: list[_Job]) -> bool:
        return all(job.abandoned for job in batch)

    def _pixels(self, key: BatchKey, batch: list[_Job], tokens: torch.Tensor) -> torch.Tensor | None:
        """Pixels of the whole batch in one decode, when a request wants them. Decoding here, not in the caller's
        thread, keeps torch work on one thread and lets the answers go out before the next batch starts."""
        if not any(job.request.pixels for job in batch):
            return None
        with torch.inference_mode():
            return self.resolve(key.model).codec.decode(tokens)

    def _drop_abandoned(self, live: list[_Job], visual: RowSeededVisual | None) -> Callable[[int], torch.Tensor | None]:
        """A decoder's ``prune``: before each block or pass, the rows of requests cancelled since the last one leave
        the batch (their callers hear :class:`BatchAbandonedError` and their queue slots free up at once); ``live``
        and ``visual``'s groups (the block decoder's per-request generators) follow. With every request cancelled
        the batch stops instead."""

        def prune(block: int) -> torch.Tensor | None:
            keep = [not job.abandoned for job in live]  # one reading: callers may cancel meanwhile
            if all(keep):
                return None
            if not any(keep):
                raise BatchAbandonedError(f"every request of the batch was cancelled (stopped at block {block})")
            rows = torch.tensor([k for job, k in zip(live, keep, strict=True) for _ in range(job.size)])
            dropped = [job for job, k in zip(live, keep, strict=True) if not k]
            live[:] = [job for job, k in zip(live, keep, strict=True) if k]
            if visual is not None:
                visual.keep_groups(keep)
            with self._cond:
                self._running = [job for job in self._running if all(job is not d for d in dropped)]
            self.stats.cancelled += len(dropped)
            for job in dropped:
                job.future.set_exception(
                    BatchAbandonedError(f"this request was cancelled; it left its batch at block {block}")
                )
            return rows

        return prune

    def _decode(self, key: BatchKey, batch: list[_Job]) -> tuple[torch.Tensor, list[_Job]]:
        """(sum of n, N) tokens of the jobs of ``batch`` still wanted at the end (decoders that take ``prune`` drop
        cancelled ones as they go), in job order, and those jobs."""
        from unitok.decoding import NEEDS_CODES, PRUNABLE, get_decoder

        gen = self.resolve(key.model)
        conditions = [c for job in batch for c in job.request.conditions]
        options = dict(key.options)
        if self.decoder_resources is not None:
            options.update(self.decoder_resources(key.model, key.decoder))
        if key.decoder in NEEDS_CODES:
            options["codes"] = gen.codec.code_table()
        vocab = gen.vocab
        live = list(batch)
        if key.decoder == "block":
            groups = [(job.size, torch.Generator().manual_seed(job.seed), job.request.on_tokens) for job in batch]
            visual = RowSeededVisual(gen.visual, groups)
            generator = None
        else:  # one generator for the batch: a lone seeded job, or unseeded jobs (seeded with the first's seed)
            visual = gen.visual
            generator = torch.Generator().manual_seed(batch[0].seed)
        if key.decoder in PRUNABLE:
            options["prune"] = self._drop_abandoned(live, visual if key.decoder == "block" else None)
        with torch.inference_mode():
            result = get_decoder(key.decoder)(
                gen.model,
                gen.layout(),
                vocab.prefix_ids(conditions),
                visual,
                guidance_scale=key.guidance,
                null_prefix_ids=vocab.prefix_ids([None]),
                sampling=key.sampling,
                generator=generator,
                **options,
            )
        return result.tokens, live
