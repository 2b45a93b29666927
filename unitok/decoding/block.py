"""The reference visual decoder: one forward per block of the prediction mode, KV-cached, with batched CFG.

It serves every mode because a mode is a partition into blocks (see :mod:`unitok.model.modes`): next-token is
blocks of one token (the plain AR loop), next-block one row or frame per forward, next-scale one scale per forward.
Step ``b`` feeds block ``b``'s inputs (built from the tokens sampled so far) against the cache of earlier steps,
reads the logits of block ``b``'s slots restricted to the visual vocabulary, applies guidance and samples. The
faster decoders of this package are tested against this one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from unitok.decoding.cfg import Guidance, as_guidance
from unitok.decoding.engine import KVEngine
from unitok.decoding.sampling import SamplingConfig
from unitok.model.heads import VisualVocab
from unitok.model.modes import Layout


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (B, N) visual token ids (0-based, canonical order)
    forward_passes: int  # model calls for the whole batch (CFG rows ride in the same call)
    rows: torch.Tensor | None = None  # with rows dropped (a decoder's ``prune``): the input rows of ``tokens``


Prune = Callable[[int], "torch.Tensor | None"]  # before pass k >= 1: None, or a bool mask of the rows to go on with


def pruned_rows(prune: Prune | None, step: int, batch: int, device: torch.device) -> torch.Tensor | None:
    """The indices of the rows ``prune(step)`` keeps among the ``batch`` rows still decoded, or None when it keeps
    them all (or there is no ``prune``). Every decoder that takes ``prune`` asks it here, before each pass after the
    first; a mask that is not (batch,) bool keeping at least one row is a ValueError."""
    keep = prune(step) if prune is not None else None
    if keep is None:
        return None
    if not isinstance(keep, torch.Tensor) or keep.shape != (batch,) or keep.dtype != torch.bool or not keep.any():
        raise ValueError(f"prune must return None or a bool mask of {batch} rows keeping one, got {keep!r}")
    return None if bool(keep.all()) else keep.nonzero()[:, 0].to(device)


def surviving_rows(alive: torch.Tensor | None, kept: torch.Tensor, batch: int) -> torch.Tensor:
    """The input rows still decoded once rows ``kept`` of the ``batch`` current ones go on (``alive``: the current
    rows' input rows, None while no row has been dropped)."""
    return (alive if alive is not None else torch.arange(batch, device=kept.device))[kept]


def cache_rows(kept: torch.Tensor, batch: int, cfg: bool) -> torch.Tensor:
    """Rows ``kept`` of a batch of ``batch`` as KV-cache rows: with guidance, their null-condition rows too (a
    decoder's cache holds the B conditional rows, then the B unconditional ones)."""
    return torch.cat([kept, kept + batch]) if cfg else kept


def _check_prefix(prefix_ids: torch.Tensor, layout: Layout, name: str) -> None:
    if prefix_ids.dim() != 2 or prefix_ids.shape[1] != layout.prefix_len:
        raise ValueError(f"{name} must be (B, {layout.prefix_len}), got shape {tuple(prefix_ids.shape)}")


def guided_prefix(
    prefix_ids: torch.Tensor,
    null_prefix_ids: torch.Tensor | None,
    layout: Layout,
    guidance_scale: float | Guidance,
    device: torch.device,
) -> tuple[torch.Tensor, bool]:
    """The prefix rows a decoder feeds: the B conditions, then (when guiding) B copies of the null condition; and
    whether guidance is on. Every decoder checks its prefixes here."""
    _check_prefix(prefix_ids, layout, "prefix_ids")
    cfg = as_guidance(guidance_scale).active
    ids = prefix_ids.to(device)
    if cfg:
        if null_prefix_ids is None:
            raise ValueError("guidance_scale != 1 needs null_prefix_ids (the unconditional prefix)")
        _check_prefix(null_prefix_ids, layout, "null_prefix_ids")
        ids = torch.cat([ids, null_prefix_ids.to(device).expand(prefix_ids.shape[0], -1)])
    return ids, cfg


@torch.no_grad()
def decode_blocks(
    model,
    layout: Layout,
    prefix_ids: torch.Tensor,
    visual: VisualVocab,
    guidance_scale: float | Guidance = 1.0,
    null_prefix_ids: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    prune: Prune | None = None,
) -> DecodeResult:
    """Generate ``layout.num_visual`` tokens for each row of ``prefix_ids`` (B, prefix_len).

    ``guidance_scale`` is a float or a :class:`~unitok.decoding.cfg.Guidance` schedule (read at each block's
    first token). With guidance the null condition ``null_prefix_ids`` ((1 or B, prefix_len)) runs in the same
    batch. ``sampling`` defaults to plain sampling at temperature 1.

    ``prune(block)``, called before every block after the first, may return a bool mask over the rows still
    decoded (True = go on); the others are dropped from the cache and every later pass (a server's requests whose
    clients left). The result then holds the surviving rows, and ``rows`` their indices in ``prefix_ids``. Where
    each row draws from its own random stream (greedy, or the server's per-request generators), a kept row gets
    the tokens it would have got in the full batch (up to float rounding of the smaller batch's matmuls).
    """
    sampling = sampling or SamplingConfig()
    guidance = as_guidance(guidance_scale)
    batch = prefix_ids.shape[0]
    device = next(model.parameters()).device
    ids, cfg = guided_prefix(prefix_ids, null_prefix_ids, layout, guidance_scale, device)
    rows = ids.shape[0]
    embed = model.get_input_embeddings()
    start = visual.start(model)
    mask = layout.mask.to(device)[None]  # (1, L, L)
    engine = KVEngine(model, rows=rows, capacity=layout.length, positions=layout.positions)
    tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    visual_embeds = torch.empty(rows, 0, start.shape[-1], dtype=start.dtype, device=device)
    alive = None  # input rows still decoded, once some were dropped
    for block in range(layout.num_blocks):
        kept = pruned_rows(prune, block, batch, device) if block else None
        if kept is not None:
            kept_rows = cache_rows(kept, batch, cfg)
            engine.select_rows(kept_rows)
            tokens, visual_embeds = tokens[kept], visual_embeds[kept_rows]
            alive = surviving_rows(alive, kept, batch)
            batch = kept.numel()
        begin, end = layout.step_range(block)
        inputs = layout.step_inputs(block, visual_embeds, start)
        inputs = visual.add_block_embedding(model, inputs, torch.full((inputs.shape[1],), block, dtype=torch.long))
        if block == 0:
            inputs = torch.cat([embed(ids), inputs], dim=1)
        size = layout.block_starts[block + 1] - layout.block_starts[block]
        scale = guidance.at(torch.tensor(layout.block_starts[block] / layout.num_visual)) if cfg else None
        scores = engine.scores(
            visual, inputs, slice(begin, end), (begin, end), mask[:, begin:end, :end], size, guidance=scale
        )  # guided (B, size, V) or bitwise (B, size, bits, 2)
        new = visual.sample(scores, sampling, generator)  # (B, size)
        tokens = torch.cat([tokens, new], dim=1)
        new_embeds = visual.embed(model, new)
        visual_embeds = torch.cat([visual_embeds, torch.cat([new_embeds] * (2 if cfg else 1))], dim=1)
    return DecodeResult(tokens=tokens, forward_passes=layout.num_blocks, rows=alive)
