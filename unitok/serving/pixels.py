"""Tokens -> pixels for the server, batched across concurrent requests.

Requests served by vLLM come back as tokens and need the generator's codec to become pixels. Decoded one request at
a time, 16 requests that finish on the same vLLM step queued 16 small decodes behind one lock (and tied up the thread
pool that PNG encoding shares): ~115 ms per request on the bundled model under 16 concurrent clients, for ~2 ms of
work each. :class:`PixelBatcher` decodes whatever is waiting as one batch per codec: requests that arrive while a
batch decodes form the next one, so a burst costs one forward.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import torch


class PixelBatcher:
    """``await batcher.decode(codec, tokens)`` -> ``codec.decode(tokens)``, shared with concurrent callers.

    ``run(fn)`` runs ``fn()`` off the event loop and returns its result (the server's: in a thread, under the lock
    the native engine computes under). Use it from one event loop."""

    def __init__(self, run: Callable[[Callable[[], Any]], Awaitable[Any]]):
        self._run = run
        self._waiting: list[tuple[Any, torch.Tensor, asyncio.Future]] = []
        self._draining = False

    async def decode(self, codec, tokens: torch.Tensor) -> torch.Tensor:
        """(n, ...) tokens of ``codec`` -> its (n, ...) pixels."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((codec, tokens, future))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                by_codec: dict[int, list[tuple[Any, torch.Tensor, asyncio.Future]]] = {}
                for job in batch:
                    by_codec.setdefault(id(job[0]), []).append(job)
                for jobs in by_codec.values():
                    await self._decode_jobs(jobs)
        finally:
            self._draining = False

    async def _decode_jobs(self, jobs: list[tuple[Any, torch.Tensor, asyncio.Future]]) -> None:
        jobs = [job for job in jobs if not job[2].done()]  # a cancelled caller (client gone) needs nothing
        if not jobs:
            return
        codec = jobs[0][0]
        sizes = [tokens.shape[0] for _, tokens, _ in jobs]
        try:
            pixels = await self._run(lambda: codec.decode(torch.cat([tokens for _, tokens, _ in jobs])))
        except Exception as err:  # e.g. tokens the codec refuses: every caller of this batch hears it
            if len(jobs) > 1:  # decode one by one, so only the bad request fails
                for job in jobs:
                    await self._decode_jobs([job])
                return
            for _, _, future in jobs:
                if not future.done():
                    future.set_exception(err)
            return
        for (_, _, future), part in zip(jobs, pixels.split(sizes), strict=True):
            if not future.done():
                future.set_result(part)
