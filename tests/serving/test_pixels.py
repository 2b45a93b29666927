"""The server's pixel batcher: concurrent decodes share one codec call, each caller gets its own rows, a bad request
fails alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from unitok.serving.pixels import PixelBatcher


class FakeCodec:
    """``decode`` maps token rows to their row sums (so a caller can check it got its own rows back); a negative
    token is refused like a real codec refuses out-of-range ids."""

    def __init__(self):
        self.calls: list[int] = []

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        if (tokens < 0).any():
            raise ValueError("token ids must be >= 0")
        self.calls.append(tokens.shape[0])
        return tokens.sum(dim=1, keepdim=True).float()


async def _in_thread(fn):
    return await asyncio.to_thread(fn)


def test_concurrent_requests_share_one_decode_and_get_their_own_rows():
    codec = FakeCodec()

    async def run():
        batcher = PixelBatcher(_in_thread)
        requests = [torch.full((n, 4), i) for i, n in enumerate([1, 3, 2, 1])]
        return requests, await asyncio.gather(*(batcher.decode(codec, r) for r in requests))

    requests, pixels = asyncio.run(run())
    assert codec.calls == [7]  # one call for all of them
    for tokens, out in zip(requests, pixels, strict=True):
        assert torch.equal(out, tokens.sum(dim=1, keepdim=True).float())


def test_requests_arriving_during_a_decode_form_the_next_batch():
    codec = FakeCodec()

    async def run():
        batcher = PixelBatcher(_in_thread)
        first = asyncio.ensure_future(batcher.decode(codec, torch.ones(2, 4)))
        await asyncio.sleep(0)  # the first batch has started
        rest = [batcher.decode(codec, torch.ones(1, 4)) for _ in range(3)]
        return await asyncio.gather(first, *rest)

    outs = asyncio.run(run())
    assert codec.calls == [2, 3] and [o.shape[0] for o in outs] == [2, 1, 1, 1]


def test_a_bad_request_fails_alone():
    codec = FakeCodec()

    async def run():
        batcher = PixelBatcher(_in_thread)
        good = [batcher.decode(codec, torch.ones(1, 4)) for _ in range(2)]
        bad = batcher.decode(codec, -torch.ones(1, 4))
        return await asyncio.gather(*good, bad, return_exceptions=True)

    *good, bad = asyncio.run(run())
    assert all(torch.equal(g, torch.tensor([[4.0]])) for g in good)
    assert isinstance(bad, ValueError) and "must be >= 0" in str(bad)


def test_cancelled_callers_are_skipped():
    codec = FakeCodec()

    async def run():
        batcher = PixelBatcher(_in_thread)
        gone = asyncio.ensure_future(batcher.decode(codec, torch.ones(5, 4)))
        kept = asyncio.ensure_future(batcher.decode(codec, torch.ones(1, 4)))
        await asyncio.sleep(0)  # both are queued for the next batch, which has not started
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(run()).shape == (1, 1)
    assert codec.calls == [1]
