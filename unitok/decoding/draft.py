"""Classic speculative decoding with a small unitok draft model (Leviathan et al. / Chen et al.): lossless, batched.

Each iteration the draft model proposes ``gamma`` tokens one at a time (cheap forwards) from the committed prefix;
the target model scores all of them in one forward of ``gamma + 1`` slots; drafts are accepted left to right with
probability ``min(1, p(x) / q(x))``; the first rejected slot is resampled from ``norm(max(0, p - q))``, and when all
are accepted a bonus token comes from the last slot's ``p``. Both models apply the same guidance (their cond and
uncond rows ride in their own batches), so ``q`` is the guided draft distribution.

Both models keep their keys in a :class:`~unitok.decoding.engine.KVEngine` with per-row KV rollback, as in
:mod:`unitok.decoding.sjd`: slot s of a row lives at cache index ``prefix + s`` and every forward writes its slots
there, so rows that accepted different numbers of tokens stay in one batch and rejected slots are overwritten. The
first draft step of an iteration re-feeds the slot before the commit point: after a fully accepted iteration the
draft model never saw it (re-feeding a slot it did see rewrites the same keys). ``forward_passes`` counts target
forwards (the costly ones); ``draft_passes`` is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unitok.decoding.block import DecodeResult, Prune, cache_rows, guided_prefix, pruned_rows, surviving_rows
from unitok.decoding.cfg import Guidance, as_guidance, guide
from unitok.decoding.engine import KVEngine
from unitok.decoding.sampling import SamplingConfig, draw
from unitok.decoding.sjd import Acceptance, _residual_sample
from unitok.model.heads import VisualVocab
from unitok.model.modes import Layout


@dataclass
class DraftDecodeResult(DecodeResult):
    draft_passes: int = 0


class _Stream:
    """One model over a batch whose rows advance at different speeds (per-row KV rollback in a KVEngine)."""

    def __init__(self, model, layout: Layout, ids: torch.Tensor, visual: VisualVocab, batch: int, pair: int):
        self.model, self.layout, self.visual = model, layout, visual
        self.ids, self.batch, self.pair = ids, batch, pair
        rows, capacity = pair * batch, layout.prefix_len + layout.num_visual + 1  # + the scratch slot
        self.engine = KVEngine(model, rows=rows, capacity=capacity, positions=layout.positions)
        self.start = visual.start(model)
        self.started = False

    def select(self, kept: torch.Tensor) -> None:
        """Keep only batch rows ``kept`` (their null-condition rows too), after the first forward."""
        self.engine.select_rows(cache_rows(kept, self.batch, self.pair > 1))
        self.batch = kept.numel()

    def forward(self, pos: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Feed slots at visual positions ``pos`` (B, W) (``num_visual`` = scratch) whose inputs are tokens ``prev``
        (B, W) (BOI where pos == 0); slots are causal among themselves. Returns (B * pair, W, V) scores."""
        device, plen, n_vis = pos.device, self.layout.prefix_len, self.layout.num_visual
        inputs = torch.where((pos == 0)[..., None], self.start, self.visual.embed(self.model, prev))
        cache_slots = plen + pos
        positions = cache_slots.clamp(max=plen + n_vis - 1)
        keys = plen + int(pos.max()) + 1
        mask = torch.arange(keys, device=device) <= cache_slots[..., None]  # causal in cache order
        inputs = torch.cat([inputs] * self.pair)
        if not self.started:  # the prefix rides along with the first forward
            self.started = True
            inputs = torch.cat([self.model.get_input_embeddings()(self.ids), inputs], 1)
            text = torch.arange(plen, device=device).expand(self.batch, -1)
            positions, cache_slots = torch.cat([text, positions], 1), torch.cat([text, cache_slots], 1)
            prefix_mask = torch.arange(keys, device=device) <= torch.arange(plen, device=device)[:, None]
            mask = torch.cat([prefix_mask.expand(self.batch, -1, -1), mask], 1)
        rows = (lambda t: t.repeat(self.pair, *([1] * (t.dim() - 1)))) if self.pair > 1 else (lambda t: t)
        return self.engine.scores(self.visual, inputs, rows(positions), rows(cache_slots), rows(mask), pos.shape[1])


@torch.no_grad()
def decode_draft(
    model,
    layout: Layout,
    prefix_ids: torch.Tensor,
    visual: VisualVocab,
    guidance_scale: float | Guidance = 1.0,
    null_prefix_ids: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    draft_model=None,
    gamma: int = 4,
    prune: Prune | None = None,
) -> DraftDecodeResult:
    """Speculative decoding of a next-token ``model`` with ``draft_model`` (same vocabulary and layout).
    ``prune(k)``, asked before target pass ``k`` >= 1, may drop rows as in
    :func:`~unitok.decoding.block.decode_blocks`."""
    sampling = sampling or SamplingConfig()
    if draft_model is None:
        raise ValueError("the draft decoder needs draft_model (a small unitok generator over the same tokenizer)")
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive int (draft tokens per target forward), got {gamma!r}")
    if layout.mode.name != "next-token":
        raise ValueError(f"the draft decoder speeds up next-token models, not {layout.mode.name}")
    if getattr(model.model, "block_embed", None) is not None:
        raise ValueError("this model uses block embeddings (next-scale style); decode it with the block decoder")
    if visual.bits:
        raise ValueError("the draft decoder needs a vocabulary head; this model has a bitwise head")
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary ({draft_model.config.vocab_size}) differs from the target's "
            f"({model.config.vocab_size}); train the draft on the same tokenizer and classes"
        )
    device = next(model.parameters()).device
    batch, n_tokens, size = prefix_ids.shape[0], layout.num_visual, visual.size
    ids, cfg = guided_prefix(prefix_ids, null_prefix_ids, layout, guidance_scale, device)
    pair = 2 if cfg else 1
    target = _Stream(model, layout, ids, visual, batch, pair)
    drafter = _Stream(draft_model, layout, ids, visual, batch, pair)
    acceptance = Acceptance()
    rows = torch.arange(batch, device=device)
    guidance = as_guidance(guidance_scale)

    def dist(scores, pos):  # pos: (B, W) visual positions of the scored slots (for guidance schedules)
        return sampling.probs(guide(scores, guidance.at(pos[..., None] / n_tokens)) if cfg else scores)

    tokens = torch.zeros(batch, n_tokens + 1, dtype=torch.long, device=device)  # + a scratch column
    committed = torch.zeros(batch, dtype=torch.long, device=device)
    passes = draft_passes = 0
    alive = None  # input rows still decoded, once some were dropped
    while bool((committed < n_tokens).any()):
        kept = pruned_rows(prune, passes, batch, device) if passes else None
        if kept is not None:  # rows nobody waits for leave both models' caches and every later pass
            target.select(kept)
            drafter.select(kept)
            tokens, committed = tokens[kept], committed[kept]
            alive = surviving_rows(alive, kept, batch)
            batch = kept.numel()
            rows = torch.arange(batch, device=device)
            if not bool((committed < n_tokens).any()):
                break
        width = int(min(gamma, int((n_tokens - committed).max())))
        slot = torch.arange(width + 1, device=device)
        pos = (committed[:, None] + slot).clamp(max=n_tokens)  # (B, W + 1): drafts at [:W], bonus slot at W
        live = committed[:, None] + slot < n_tokens
        # --- draft: width tokens, one forward each (the first also re-feeds the slot before the commit point)
        q = torch.zeros(batch, width, size, device=device)
        for j in range(width):
            here = pos[:, j : j + 1]
            feed = torch.cat([(here - 1).clamp(min=0), here], 1) if j == 0 and passes else here
            scores = drafter.forward(feed, tokens.gather(1, (feed - 1).clamp(min=0)))[:, -1:]
            draft_passes += 1
            q[:, j] = dist(scores, here)[:, 0]
            drawn = q[:, j].argmax(-1) if sampling.greedy else draw(q[:, j], generator)
            tokens.scatter_(1, here, drawn[:, None])  # finished rows write the scratch column
        # --- verify: one target forward over width + 1 slots
        p = dist(target.forward(pos, tokens.gather(1, (pos - 1).clamp(min=0))), pos)  # (B, W + 1, V)
        passes += 1
        draft = tokens.gather(1, pos[:, :width])
        if sampling.greedy:
            accept = (p[:, :width].gather(-1, draft[..., None])[..., 0] > 0) & live[:, :width]
        else:
            r = torch.rand(batch, width, generator=generator).to(device)
            accept = (r < acceptance(p[:, :width], q, draft)) & live[:, :width]
        run = accept.long().cumprod(1).sum(1)  # accepted drafts per row
        at = run  # the slot that gets a fresh token: the first rejection, or the bonus slot W
        q_at = torch.cat([q, torch.zeros(batch, 1, size, device=device)], 1)[rows, at]
        if sampling.greedy:
            fresh = p[rows, at].argmax(-1)
        else:
            fresh = _residual_sample(p[rows, at], q_at, generator)  # q = 0 at the bonus slot: a plain sample of p
        fresh_live = live[rows, at]
        tokens.scatter_(1, pos[rows, at][:, None], fresh[:, None])
        committed = committed + torch.where(fresh_live, run + 1, run)
    return DraftDecodeResult(tokens=tokens[:, :n_tokens], forward_passes=passes, draft_passes=draft_passes, rows=alive)
