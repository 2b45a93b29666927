"""Streaming partial images (``stream=true``, OpenAI's ``image_generation.partial_image`` events) from the native
engine: a preview after some blocks, then the final image.

What a preview is depends on the mode. Next-scale: the scales generated so far through the multi-scale tokenizer's
``decode_partial`` (VAR's coarse-to-fine preview). Raster modes (next-block rows, next-token): the complete token
rows so far, decoded with the missing rows filled by copies of the last one, and the pixel rows they cover kept
(the rest black). ``partial_images`` previews are spread evenly over the blocks (OpenAI allows 0-3; we allow up to
one per block).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator

import torch

from unitok.model.pretrained import Generator


def preview_blocks(num_blocks: int, partial_images: int) -> set[int]:
    """The block indices after which to send a preview (never the last: the final image follows it)."""
    if partial_images <= 0 or num_blocks < 2:
        return set()
    count = min(partial_images, num_blocks - 1)
    return {round((i + 1) * num_blocks / (count + 1)) - 1 for i in range(count)} - {num_blocks - 1}


@torch.no_grad()
def preview_pixels(gen: Generator, tokens: torch.Tensor) -> torch.Tensor | None:
    """(1, t) tokens generated so far -> (1, 1, H, W) preview pixels in [-1, 1], or None when there is nothing to
    show yet."""
    spec = gen.spec
    t = tokens.shape[1]
    if spec.scales is not None:
        ids, start = [], 0
        for h, w in spec.scales:
            if start + h * w > t:
                break
            ids.append(tokens[:, start : start + h * w].reshape(-1, h, w))
            start += h * w
        if not ids:
            return None
        return gen.codec.tokenizer.decode_partial(ids, size=tuple(spec.scales[-1])).clamp(-1, 1)
    if spec.is_video:
        return None
    rows = t // spec.width
    if rows == 0:
        return None
    grid = tokens[:, : rows * spec.width].reshape(-1, rows, spec.width)
    filled = torch.cat([grid, grid[:, -1:].expand(-1, spec.height - rows, -1)], dim=1)
    pixels = gen.codec.decode(filled.flatten(1))
    cut = round(rows * pixels.shape[-2] / spec.height)
    pixels[..., cut:, :] = -1
    return pixels


def sse(event: dict) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def image_event(kind: str, b64: str, size: str, **extra) -> dict:
    return {
        "type": f"image_generation.{kind}",
        "b64_json": b64,
        "background": "opaque",
        "created_at": int(time.time()),
        "output_format": "png",
        "quality": "auto",
        "size": size,
        **extra,
    }


async def drain(
    task: asyncio.Future, queue: asyncio.Queue, wanted: set[int]
) -> AsyncIterator[tuple[int, torch.Tensor]]:
    """The (block, tokens) the worker reported for ``wanted`` blocks, until ``task`` (the generation) is done."""
    while not (task.done() and queue.empty()):
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
        if getter not in done:
            getter.cancel()
            continue
        block, tokens = getter.result()
        if block in wanted:
            yield block, tokens


def b64_png(data: bytes) -> str:
    return base64.b64encode(data).decode()
