"""How visual tokens enter and leave the transformer.

Two heads share one interface, so training (:func:`unitok.training.ar.ar_loss`) and every decoder are written once:

- **vocabulary** (default): visual token v is vocabulary id ``offset + v``; its input is that embedding row and its
  scores are the ``lm_head`` logits of the visual slice (a ``size``-way softmax).
- **bitwise** (``bits > 0``, binary tokenizers, as Infinity): token v is its d bits (v = sum_i bit_i 2^i); its input
  is ``bit_embed`` of the bits in {-1, +1} and its scores are d independent binary logits from ``bit_head``,
  written as (..., d, 2) two-way logits ``[0, l_i]`` so guidance, temperature, top-k/top-p and cross-entropy apply
  unchanged. A 2^d-way softmax (2^18 = 262k rows here) never exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from unitok.decoding.sampling import SamplingConfig, sample


@dataclass
class VisualVocab:
    """Where visual ids live in the model's vocabulary, which special starts an image, and the head kind."""

    offset: int
    size: int
    boi_id: int
    bits: int = 0  # > 0: bitwise head over this many bits

    def __post_init__(self):
        if self.bits and self.size != 1 << self.bits:
            raise ValueError(f"a bitwise head over {self.bits} bits has {1 << self.bits} codes, got size {self.size}")

    def start(self, model) -> torch.Tensor:
        """(hidden,) the BOI embedding that fills the first block's slots."""
        return model.get_input_embeddings().weight[self.boi_id]

    def to_bits(self, tokens: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(self.bits, device=tokens.device)
        return (tokens[..., None] >> shifts) & 1

    def from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(self.bits, device=bits.device)
        return (bits.long() << shifts).sum(-1)

    def add_block_embedding(self, model, inputs: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``inputs`` (B, n, d) of visual slots + the embedding of each slot's block id ``blocks`` (n,), for models
        with ``num_block_embeddings`` (else unchanged)."""
        table = model.model.block_embed
        if table is None:
            return inputs
        if int(blocks.max()) >= table.num_embeddings:
            raise ValueError(
                f"the model has {table.num_embeddings} block embeddings; this layout has {int(blocks.max()) + 1} blocks"
            )
        return inputs + table(blocks.to(inputs.device))

    def embed(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N) visual token ids -> (B, N, hidden) input embeddings."""
        if self.bits:
            return model.embed_bits(self.to_bits(tokens))
        return model.get_input_embeddings()(tokens + self.offset)

    def scores(self, model, keep: int, **forward_kwargs) -> torch.Tensor:
        """One forward; the scores of the last ``keep`` positions: (B, keep, size) or bitwise (B, keep, bits, 2)."""
        hidden = model.model(**forward_kwargs).last_hidden_state[:, -keep:]
        return self.head_scores(model, hidden)

    def head_scores(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """(B, n, hidden) final hidden states -> (B, n, size) visual logits (only the visual rows of ``lm_head``
        are computed) or bitwise (B, n, bits, 2)."""
        if self.bits:
            logits = model.bit_logits(hidden).float()  # (B, n, bits)
            return torch.stack([torch.zeros_like(logits), logits], dim=-1)
        return F.linear(hidden, model.lm_head.weight[self.offset : self.offset + self.size])

    def sample(
        self, scores: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scores (guided already) -> (B, keep) visual token ids."""
        drawn = sample(scores, sampling, generator)
        return self.from_bits(drawn) if self.bits else drawn

    def loss(self, scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of ``tokens`` (B, N) under ``scores`` (bitwise: mean over bits)."""
        target = self.to_bits(tokens) if self.bits else tokens
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]).float(), target.reshape(-1))
