"""Speculative Jacobi Decoding (SJD, Teng et al. 2024) for next-token models: lossless, training-free, batched.

Every position past the committed prefix holds a *draft* token and the distribution ``q`` it was drawn from (at
first uniform random tokens). One iteration feeds a window of ``window`` slots after the committed prefix (slot j's
input is the token before it: committed, or a draft) and gets the model's distribution ``p`` at each slot. Drafts
are checked left to right: draft x at a slot is accepted with probability ``min(1, p(x) / q(x))``; at the first
rejection a token is drawn from ``norm(max(0, p - q))`` (speculative sampling's residual), which commits at least one
token per iteration and keeps every committed token an exact sample of the model. Slots after the rejection get new
drafts sampled from their ``p`` (the Jacobi update, which is why later drafts improve), and keep that ``p`` as their
``q``. Greedy decoding (temperature 0) accepts a draft exactly when it is the argmax, so it equals greedy AR.

Batching without rollback: rows accept different numbers of tokens, so the KV cache is never cropped. Each iteration
appends the window's keys for every row and a per-row validity mask records which cached slots were computed from
committed inputs; later queries attend only to those (positions are explicit MM-RoPE coordinates, so the holes left
by rejected drafts change nothing). Guidance runs the conditional and unconditional rows in the same forward; both
rows of a pair share drafts and acceptance, so they stay aligned.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from unitok.decoding.block import DecodeResult, guided_prefix
from unitok.decoding.cfg import guide
from unitok.decoding.sampling import SamplingConfig
from unitok.model.heads import VisualVocab
from unitok.model.modes import Layout


def check_window(window: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int (tokens verified per forward), got {window!r}")
    return window


class Acceptance:
    """The verification rule: the probability of accepting each draft. Exact speculative sampling by default."""

    lossless = True

    def __call__(self, p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor) -> torch.Tensor:
        """p, q: (B, W, V) target and draft distributions; draft: (B, W) -> (B, W) acceptance probabilities."""
        p_draft = p.gather(-1, draft[..., None])[..., 0]
        q_draft = q.gather(-1, draft[..., None])[..., 0]
        return torch.where(q_draft > 0, p_draft / q_draft.clamp_min(1e-30), torch.ones_like(p_draft)).clamp(max=1)


def _residual_sample(p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) samples of norm(max(0, p - q)) (p itself where p <= q everywhere, i.e. p == q)."""
    residual = (p - q).clamp_min(0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total.clamp_min(1e-30), p)
    return torch.multinomial(residual, 1, generator=generator)[:, 0]


@torch.no_grad()
def decode_sjd(
    model,
    layout: Layout,
    prefix_ids: torch.Tensor,
    visual: VisualVocab,
    guidance_scale: float = 1.0,
    null_prefix_ids: torch.Tensor | None = None,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    window: int = 16,
    acceptance: Acceptance | None = None,
) -> DecodeResult:
    """Generate ``layout.num_visual`` tokens per row of ``prefix_ids`` with SJD; same arguments as
    :func:`unitok.decoding.block.decode_blocks` plus ``window`` (draft slots verified per forward) and
    ``acceptance`` (the verification rule; the lossy relatives in :mod:`unitok.decoding.relaxed` swap it)."""
    sampling = sampling or SamplingConfig()
    acceptance = acceptance or Acceptance()
    window = check_window(window)
    if layout.mode.name != "next-token":
        raise ValueError(
            f"sjd decodes next-token models; a {layout.mode.name} model already generates a block per forward "
            "(use the block decoder)"
        )
    if getattr(model.model, "block_embed", None) is not None:
        raise ValueError("this model uses block embeddings (next-scale style); decode it with the block decoder")
    if visual.bits:
        raise ValueError("sjd needs a vocabulary head; this model has a bitwise head")
    device = next(model.parameters()).device
    batch, n_tokens, size, plen = prefix_ids.shape[0], layout.num_visual, visual.size, layout.prefix_len
    ids, cfg = guided_prefix(prefix_ids, null_prefix_ids, layout, guidance_scale, device)
    pair = 2 if cfg else 1
    start = visual.start(model)
    positions = layout.positions.to(device)  # (3, L)
    rows = torch.arange(batch, device=device)

    # One scratch column past the end: window slots beyond the last token read and write there, never on real ones.
    drafts = torch.randint(0, size, (batch, n_tokens + 1), generator=generator).to(device)
    q = torch.full((batch, n_tokens + 1, size), 1.0 / size, device=device)  # what each draft was drawn from
    committed = torch.zeros(batch, dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    valid = torch.zeros(batch, 0, dtype=torch.bool, device=device)  # per row: cached slots usable as keys
    passes = 0
    while bool((committed < n_tokens).any()):
        width = int(min(window, int((n_tokens - committed).max())))
        slot = torch.arange(width, device=device)
        pos = committed[:, None] + slot  # (B, W) visual positions of the window's slots
        live = pos < n_tokens
        pos = pos.clamp(max=n_tokens)  # finished rows' slots land on the scratch column
        prev = drafts.gather(1, (pos - 1).clamp(min=0))  # committed tokens are stored in ``drafts`` too
        inputs = torch.where((pos == 0)[..., None], start, visual.embed(model, prev))  # (B, W, d)
        slot_positions = positions[:, plen + pos.clamp(max=n_tokens - 1)]  # (3, B, W)
        causal = slot[None, :] <= slot[:, None]  # (W, W)
        keys = torch.cat([valid[:, None, :].expand(-1, width, -1), causal[None].expand(batch, -1, -1)], dim=2)
        if passes == 0:
            prefix_mask = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()
            top = torch.cat([prefix_mask, torch.zeros(plen, width, dtype=torch.bool, device=device)], 1)
            bottom = torch.cat([torch.ones(batch, width, plen, dtype=torch.bool, device=device), keys], 2)
            keys = torch.cat([top[None].expand(batch, -1, -1), bottom], 1)
            embed_ids = model.get_input_embeddings()(ids)
            inputs = torch.cat([embed_ids, inputs.repeat(pair, 1, 1)], 1)
            text = torch.arange(plen, dtype=positions.dtype, device=device)[None, None].expand(3, batch, -1)
            slot_positions = torch.cat([text, slot_positions], 2)
        else:
            inputs = inputs.repeat(pair, 1, 1)
        scores = visual.scores(
            model,
            width,
            inputs_embeds=inputs,
            position_ids=slot_positions.repeat(1, pair, 1),
            attention_mask=keys[:, None].repeat(pair, 1, 1, 1),
            past_key_values=cache,
            use_cache=True,
        )
        passes += 1
        if cfg:
            scores = guide(scores, guidance_scale)
        p = sampling.probs(scores)  # (B, W, V)
        draft = drafts.gather(1, pos)
        q_window = q[rows[:, None], pos]  # (B, W, V)
        r = torch.rand(batch, width, generator=generator).to(device)
        if sampling.greedy and acceptance.lossless:  # exact ties: accept iff the draft is the argmax
            accept = (p.gather(-1, draft[..., None])[..., 0] > 0) & live
        else:
            accept = (r < acceptance(p, q_window, draft)) & live
        run = accept.long().cumprod(1).sum(1)  # leading accepted drafts per row
        rejected = run < live.sum(1)  # a live slot was rejected at index ``run``
        at = run.clamp(max=width - 1)
        fix = _residual_sample(p[rows, at], q_window[rows, at], generator)
        new_tokens = torch.where(rejected[:, None] & (slot[None] == run[:, None]), fix[:, None], draft)
        newly = run + rejected.long()  # tokens committed this iteration (>= 1 for every unfinished row)
        # Jacobi update: slots after the commit point get fresh drafts from this pass's p (their new q).
        refresh = (slot[None] >= newly[:, None]) & live
        jacobi = torch.multinomial(p.reshape(-1, size), 1, generator=generator).reshape(batch, width)
        if sampling.greedy:
            jacobi = p.argmax(-1)
        new_tokens = torch.where(refresh, jacobi, new_tokens)
        drafts.scatter_(1, pos, torch.where(live, new_tokens, draft))
        q_new = torch.where(refresh[..., None], p, q_window)
        q[rows[:, None], pos] = torch.where(live[..., None], q_new, q_window)
        slot_valid = slot[None] < newly[:, None]  # their inputs were all committed tokens
        if passes == 1:
            valid = torch.cat([torch.ones(batch, plen, dtype=torch.bool, device=device), slot_valid], 1)
        else:
            valid = torch.cat([valid, slot_valid], 1)
        committed = committed + torch.where(committed < n_tokens, newly, torch.zeros_like(newly))
    return DecodeResult(tokens=drafts[:, :n_tokens], forward_passes=passes)
