"""Next-token images through transformers' ``model.generate``, with CFG and the visual vocabulary as logits
processors.

``generate`` owns the loop (sampling, warpers, stopping); what unitok adds is small:

- MM-RoPE positions: ``UnitokForCausalLM.prepare_inputs_for_generation`` reads each step's (t, h, w) positions
  from ``visual_positions`` (the layout's), so the model sees the same positions as in training;
- :class:`VisualLogitsProcessor`: restricts sampling to the visual vocabulary and applies classifier-free guidance
  (a float or a :class:`~unitok.decoding.cfg.Guidance` schedule). The unconditional rows run inside the processor,
  in their own :class:`~unitok.decoding.engine.KVEngine`, fed the tokens ``generate`` sampled, so the conditional
  and unconditional sequences can never diverge;
- :func:`decode_hf`: a decoder with the common signature (registered as ``"hf"``), so the pipeline and the CLI can
  use ``generate`` and compare it with the native decoders. It is the reference path for users who already drive
  ``generate`` (beam search and streamers are theirs to add), not the fast one.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from unitok.decoding.block import DecodeResult, Prune, guided_prefix, pruned_rows
from unitok.decoding.cfg import Guidance, as_guidance
from unitok.decoding.engine import KVEngine
from unitok.decoding.sampling import SamplingConfig
from unitok.model.heads import VisualVocab
from unitok.model.modes import Layout


class VisualLogitsProcessor(LogitsProcessor):
    """Visual-vocabulary restriction + CFG for ``generate`` over ``layout``'s next-token sequence.

    ``null_prefix_ids`` (1, prefix_len) is the null condition; the processor's own rows replay it and every token
    ``generate`` appends. Scores outside the visual slice become -inf.
    """

    def __init__(
        self,
        model,
        layout: Layout,
        visual: VisualVocab,
        guidance: float | Guidance = 1.0,
        null_prefix_ids: torch.Tensor | None = None,
    ):
        self.model, self.layout, self.visual = model, layout, visual
        self.guidance = as_guidance(guidance)
        if self.guidance.active and null_prefix_ids is None:
            raise ValueError("guidance needs null_prefix_ids (the unconditional prefix)")
        self.null_prefix_ids = null_prefix_ids
        self.engine: KVEngine | None = None
        self.fed = 0  # sequence slots the unconditional rows have seen

    def _uncond_scores(self, input_ids: torch.LongTensor) -> torch.Tensor:
        layout, batch = self.layout, input_ids.shape[0]
        plen, length = layout.prefix_len, input_ids.shape[1]
        embed = self.model.get_input_embeddings()
        if self.engine is None:
            if length != plen + 1:
                raise ValueError(f"generate must start from prefix + BOI ({plen + 1} tokens), got {length}")
            self.engine = KVEngine(self.model, rows=batch, capacity=layout.length, positions=layout.positions)
            null = self.null_prefix_ids.to(input_ids.device).expand(batch, -1)
            inputs = torch.cat([embed(null), embed(input_ids[:, plen:])], 1)  # the null prefix, then BOI
        else:
            if length != self.fed + 1:
                raise ValueError("the processor must see every generation step (one new token per call)")
            inputs = embed(input_ids[:, -1:])
        begin, end = self.fed, length
        mask = self.layout.mask[begin:end, :end].to(input_ids.device)[None]
        self.fed = end
        return self.engine.scores(self.visual, inputs, slice(begin, end), (begin, end), mask, 1)[:, -1]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        visual = self.visual
        cond = scores[:, visual.offset : visual.offset + visual.size].float()
        if self.guidance.active:
            progress = torch.tensor((input_ids.shape[1] - self.layout.prefix_len - 1) / self.layout.num_visual)
            cond = torch.lerp(self._uncond_scores(input_ids), cond, self.guidance.at(progress))
        out = torch.full_like(scores, float("-inf"))
        out[:, visual.offset : visual.offset + visual.size] = cond.to(out.dtype)
        return out


class PruneCriteria(StoppingCriteria):
    """A decoder's ``prune`` as a stopping criterion: after token ``k`` of ``num_visual`` it asks ``prune(k)`` (as
    the native decoders do before pass ``k``) and marks the rows it drops finished. ``generate`` owns its loop and
    keeps a finished row in its batch (fed padding), so dropping saves no arithmetic until every row is dropped;
    then ``generate`` stops. ``alive`` holds the surviving input rows."""

    def __init__(self, prune: Prune, batch: int, num_visual: int, device: torch.device):
        self.prune, self.num_visual = prune, num_visual
        self.alive = torch.arange(batch, device=device)
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        if self.steps < self.num_visual:
            kept = pruned_rows(self.prune, self.steps, self.alive.numel(), self.alive.device)
            if kept is not None:
                self.alive = self.alive[kept]
        done = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done[self.alive] = False
        return done


@torch.no_grad()
def decode_hf(
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
    """Generate ``layout.num_visual`` tokens per row with ``model.generate`` (next-token models). ``generate``
    samples from the global RNG: a ``generator`` seeds it inside ``torch.random.fork_rng``, so the caller's global
    RNG state is left alone and a seeded generator gives reproducible images. ``prune(k)``, asked after token ``k``
    (before the pass that samples token ``k``), may drop rows as in :func:`~unitok.decoding.block.decode_blocks`:
    they are not returned (``rows`` names the survivors), though ``generate`` computes them until every row left
    (:class:`PruneCriteria`)."""
    sampling = sampling or SamplingConfig()
    if layout.mode.name != "next-token":
        raise ValueError(f"model.generate decodes next-token models, not {layout.mode.name} (use the block decoder)")
    if visual.bits or getattr(model.model, "block_embed", None) is not None:
        raise ValueError("model.generate needs a vocabulary head and no block embeddings; use the block decoder")
    device = next(model.parameters()).device
    ids, cfg = guided_prefix(prefix_ids, null_prefix_ids, layout, guidance_scale, device)
    batch = prefix_ids.shape[0]
    inputs = torch.cat([ids[:batch], torch.full((batch, 1), visual.boi_id, device=device)], 1)
    processor = VisualLogitsProcessor(model, layout, visual, guidance_scale, null_prefix_ids if cfg else None)
    options: dict = {"do_sample": False}
    if not sampling.greedy:
        options = {"do_sample": True, "temperature": float(sampling.temperature), "top_p": float(sampling.top_p)}
        options["top_k"] = int(sampling.top_k) or None
    criteria = PruneCriteria(prune, batch, layout.num_visual, device) if prune is not None else None
    seed = int(torch.randint(2**62, (1,), generator=generator)) if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=layout.num_visual,
            min_new_tokens=layout.num_visual,
            logits_processor=LogitsProcessorList([processor]),
            stopping_criteria=StoppingCriteriaList([criteria] if criteria is not None else []),
            visual_positions=layout.positions,
            pad_token_id=model.config.pad_token_id,
            eos_token_id=None,
            use_cache=True,
            **options,
        )
    tokens = out[:, inputs.shape[1] :] - visual.offset
    if criteria is not None and criteria.alive.numel() < batch:
        return DecodeResult(tokens=tokens[criteria.alive], forward_passes=layout.num_visual, rows=criteria.alive)
    return DecodeResult(tokens=tokens, forward_passes=layout.num_visual)
