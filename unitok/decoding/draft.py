"""Classic speculative decoding with a small unitok draft model (Leviathan et al. / Chen et al.): lossless, batched.

Each iteration the draft model proposes ``gamma`` tokens one at a time (cheap forwards) from the committed prefix;
the target model scores all of them in one forward of ``gamma + 1`` slots; drafts are accepted left to right with
probability ``min(1, p(x) / q(x))``; the first rejected slot is resampled from ``norm(max(0, p - q))``, and when all
are accepted a bonus token comes from the last slot's ``p``. Both models apply the same guidance (their cond and
uncond rows ride in their own batches), so ``q`` is the guided draft distribution.

As in :mod:`unitok.decoding.sjd`, neither KV cache is ever cropped: every forward appends keys for every row and a
per-row validity mask marks the slots whose inputs were committed tokens; rows that accepted different numbers of
tokens stay in one batch. ``forward_passes`` counts target forwards (the costly ones); ``draft_passes`` is reported
beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from unitok.decoding.block import DecodeResult, guided_prefix
from unitok.decoding.cfg import Guidance, as_guidance, guide
from unitok.decoding.sampling import SamplingConfig, draw
from unitok.decoding.sjd import Acceptance, _residual_sample
from unitok.model.heads import VisualVocab
from unitok.model.modes import Layout


@dataclass
class DraftDecodeResult(DecodeResult):
    draft_passes: int = 0


class _Stream:
    """One model's KV cache over a batch whose rows advance at different speeds (validity mask, no rollback)."""

    def __init__(self, model, layout: Layout, ids: torch.Tensor, visual: VisualVocab, batch: int, pair: int):
        self.model, self.layout, self.visual = model, layout, visual
        self.ids, self.batch, self.pair = ids, batch, pair
        self.cache = DynamicCache(config=model.config)
        self.valid: torch.Tensor | None = None  # (B, cached slots)
        self.start = visual.start(model)
        self.positions = layout.positions.to(ids.device)

    def forward(self, pos: torch.Tensor, prev: torch.Tensor, slot_valid_hint: torch.Tensor | None = None):
        """Feed slots at visual positions ``pos`` (B, W) whose inputs are tokens ``prev`` (B, W) (ignored where
        pos == 0: BOI); slots are causal among themselves. Returns (B*pair, W, V) scores."""
        batch, width = pos.shape
        device, plen = pos.device, self.layout.prefix_len
        n_vis = self.layout.num_visual
        inputs = torch.where((pos == 0)[..., None], self.start, self.visual.embed(self.model, prev))
        slot_positions = self.positions[:, plen + pos.clamp(max=n_vis - 1)]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        if self.valid is None:
            keys = causal[None].expand(batch, -1, -1)
            prefix = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()
            top = torch.cat([prefix, torch.zeros(plen, width, dtype=torch.bool, device=device)], 1)
            bottom = torch.cat([torch.ones(batch, width, plen, dtype=torch.bool, device=device), keys], 2)
            keys = torch.cat([top[None].expand(batch, -1, -1), bottom], 1)
            embeds = self.model.get_input_embeddings()(self.ids)
            inputs = torch.cat([embeds, inputs.repeat(self.pair, 1, 1)], 1)
            text = torch.arange(plen, dtype=slot_positions.dtype, device=device)[None, None].expand(3, batch, -1)
            slot_positions = torch.cat([text, slot_positions], 2)
            self.valid = torch.ones(batch, plen, dtype=torch.bool, device=device)
        else:
            keys = torch.cat([self.valid[:, None, :].expand(-1, width, -1), causal[None].expand(batch, -1, -1)], 2)
            inputs = inputs.repeat(self.pair, 1, 1)
        scores = self.visual.scores(
            self.model,
            width,
            inputs_embeds=inputs,
            position_ids=slot_positions.repeat(1, self.pair, 1),
            attention_mask=keys[:, None].repeat(self.pair, 1, 1, 1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.pending = width
        return scores

    def commit(self, slot_valid: torch.Tensor) -> None:
        """Mark which of the last forward's slots (B, W) may serve as keys from now on."""
        self.valid = torch.cat([self.valid, slot_valid], 1)


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
) -> DraftDecodeResult:
    """Speculative decoding of a next-token ``model`` with ``draft_model`` (same vocabulary and layout)."""
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
    draft_missing = torch.zeros(batch, dtype=torch.bool, device=device)  # draft KV of position committed-1 absent
    passes = draft_passes = 0
    while bool((committed < n_tokens).any()):
        width = int(min(gamma, int((n_tokens - committed).max())))
        slot = torch.arange(width + 1, device=device)
        pos = (committed[:, None] + slot).clamp(max=n_tokens)  # (B, W + 1): drafts at [:W], bonus slot at W
        live = committed[:, None] + slot < n_tokens
        # --- draft: width tokens, one forward each (the first also fills a missing key from the last iteration)
        q = torch.zeros(batch, width, size, device=device)
        for j in range(width):
            here = pos[:, j : j + 1]
            prev = tokens.gather(1, (here - 1).clamp(min=0))
            if j == 0 and drafter.valid is not None and bool(draft_missing.any()):
                back = (here - 1).clamp(min=0)
                feed_pos = torch.cat([back, here], 1)
                feed_prev = torch.cat([tokens.gather(1, (back - 1).clamp(min=0)), prev], 1)
                scores = drafter.forward(feed_pos, feed_prev)[:, -1:]
                drafter.commit(torch.stack([draft_missing, torch.ones_like(draft_missing)], 1))
            else:
                scores = drafter.forward(here, prev)
                drafter.commit(torch.ones(batch, 1, dtype=torch.bool, device=device))  # seen by later drafts
            draft_passes += 1
            q[:, j] = dist(scores, here)[:, 0]
            if sampling.greedy:
                drawn = q[:, j].argmax(-1)
            else:
                drawn = draw(q[:, j], generator)
            old = tokens.gather(1, here)
            tokens.scatter_(1, here, torch.where(live[:, j : j + 1], drawn[:, None], old))
        # --- verify: one target forward over width + 1 slots
        prev = tokens.gather(1, (pos - 1).clamp(min=0))
        p = dist(target.forward(pos, prev), pos)  # (B, W + 1, V)
        passes += 1
        draft = tokens.gather(1, pos[:, :width])
        r = torch.rand(batch, width, generator=generator).to(device)
        if sampling.greedy:
            accept = (p[:, :width].gather(-1, draft[..., None])[..., 0] > 0) & live[:, :width]
        else:
            accept = (r < acceptance(p[:, :width], q, draft)) & live[:, :width]
        run = accept.long().cumprod(1).sum(1)  # accepted drafts per row
        at = run  # the slot that gets a fresh token: the first rejection, or the bonus slot W
        q_at = torch.cat([q, torch.zeros(batch, 1, size, device=device)], 1)[rows, at]
        fresh = _residual_sample(p[rows, at], q_at, generator)  # q = 0 at the bonus slot: a plain sample of p
        if sampling.greedy:
            fresh = p[rows, at].argmax(-1)
        fresh_live = live[rows, at]
        keep = tokens.gather(1, pos[rows, at][:, None])[:, 0]
        tokens.scatter_(1, pos[rows, at][:, None], torch.where(fresh_live, fresh, keep)[:, None])
        newly = torch.where(committed < n_tokens, run + fresh_live.long(), torch.zeros_like(run))
        target.commit(slot[None] < newly[:, None])
        # draft keys: this iteration's draft slots [0, W) are valid where their inputs were committed
        drafter.valid[:, -width:] = slot[None, :width] < newly[:, None]
        draft_missing = newly > width  # all accepted + bonus: the draft never saw the slot of the last draft
        committed = committed + newly
    return DraftDecodeResult(tokens=tokens[:, :n_tokens], forward_passes=passes, draft_passes=draft_passes)
