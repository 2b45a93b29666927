"""The decode-time forward: the same transformer as ``UnitokForCausalLM.forward``, over a preallocated KV cache.

Decoders call the model dozens of times per image with a handful of new tokens each time, so what a pass costs is
mostly framework overhead, not arithmetic: transformers' forward validates arguments, builds masks, grows a
``DynamicCache`` with ``torch.cat`` and wraps outputs in dataclasses on every call. :class:`KVEngine` runs the
model's own modules (its norms, projections, MLPs and rotary table, so the weights and numerics are the model's)
with none of that:

- keys and values live in one preallocated buffer per layer, ``(rows, kv_heads, capacity, head_dim)``; a pass
  writes its slots where the caller says (a range shared by all rows, or per-row indices) and attends over
  ``[0, keys)`` with the caller's boolean mask. Writing a row's window at its own commit point is SJD's KV rollback:
  rejected slots are simply overwritten next pass.
- q/k/v and gate/up projections are fused into one matmul each, on transposed copies of the weights made once
  per model (and redone when a parameter changes); RMSNorm is ``F.rms_norm``; q and k are rotated together;
- attention is one ``scaled_dot_product_attention`` call with grouped-query heads;
- the head computes only the visual rows of ``lm_head``.

Tested to match the model's forward (``tests/decoding/test_engine.py``). The engine is for inference only: it never
builds autograd graphs and holds its buffers for one decode call.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from unitok.decoding.cfg import guide
from unitok.model.heads import VisualVocab

_PREPARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PREPARED_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _prepared_layers(model) -> list[tuple]:
    """Each layer's weights in the engine's layout, cached per model until any parameter changes (its storage or
    its version counter: an optimizer step or ``load_state_dict`` invalidates the copies)."""
    signature = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = _PREPARED.get(model)
    if cached is not None and cached[0] == signature:
        return cached[1]
    layers = []
    # Weights are stored transposed and contiguous, (in, out): for the few rows a decoding pass has, ``x @ w`` on
    # that layout runs ~1.5x faster on CPU than ``F.linear`` on the (out, in) parameter.
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(m.bias is not None for m in projections):
            raise ValueError("KVEngine supports bias-free projections (Llama's default)")
        qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        layers.append(
            (
                layer.input_layernorm.weight,
                layer.input_layernorm.variance_epsilon,
                qkv.t().contiguous(),
                attn.o_proj.weight.t().contiguous(),
                layer.post_attention_layernorm.weight,
                layer.post_attention_layernorm.variance_epsilon,
                torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous(),
                mlp.down_proj.weight.t().contiguous(),
                mlp.act_fn,
                attn.scaling,
            )
        )
    _PREPARED[model] = (signature, layers)
    return layers


class KVEngine:
    """A ``rows``-row, ``capacity``-slot KV cache and a lean forward of ``model`` over it."""

    @torch.no_grad()
    def __init__(self, model, rows: int, capacity: int, positions: torch.Tensor):
        """``positions``: the (3, L) MM-RoPE (or (L,) 1-D) positions of the sequence being decoded; passes name
        their inputs' positions by index into it, and the rotary tables are computed once here."""
        config = model.config
        if rows < 1 or capacity < 1:
            raise ValueError(f"rows and capacity must be >= 1, got {rows} and {capacity}")
        self.model = model
        self.rows, self.capacity = rows, capacity
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.layers = _prepared_layers(model)
        norm = model.model.norm
        self.final_norm = (norm.weight, norm.variance_epsilon)
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self._row_index = torch.arange(rows, device=self.device)[:, None]
        self._head: tuple | None = None  # (key, the visual head's (hidden, size) weight)
        table = positions.to(self.device)
        table = table[:, None] if table.dim() == 2 else table[None]  # (3, 1, L) or (1, L)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = model.model.rotary_emb(probe, table)  # (1, L, head_dim)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_1, sin_2]: one roll instead of slicing, negating and joining.
        self._cos = cos[0, :, None]  # (L, 1, head_dim): broadcasts over heads
        self._sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], -1)[:, None]

    @torch.no_grad()
    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: slice | torch.Tensor,
        slots: tuple[int, int] | torch.Tensor,
        attention_mask: torch.Tensor,
        keep: int,
    ) -> torch.Tensor:
        """One pass; returns the final (normed) hidden states of the last ``keep`` inputs, (rows, keep, hidden).

        ``inputs_embeds`` (rows, W, hidden); ``positions`` the inputs' indices into the engine's position table (a
        slice for all rows, or a (rows, W) long tensor); ``slots`` where the W new keys go: ``(start, end)`` for all
        rows, or a (rows, W) long tensor of per-row cache indices; ``attention_mask`` (rows or 1, W, K) bool, True =
        may attend, over cache slots ``[0, K)`` (which must include the slots written now).
        """
        rows, width, hidden_size = inputs_embeds.shape
        keys_len = attention_mask.shape[-1]
        if rows != self.rows or keys_len > self.capacity:
            raise ValueError(
                f"this engine holds {self.rows} rows x {self.capacity} slots; got {rows} rows attending {keys_len}"
            )
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        half = head_dim // 2
        cos, sin = self._cos[positions], self._sin[positions]  # (W, 1, head_dim) or (rows, W, 1, head_dim)
        mask = attention_mask[:, None]  # (rows or 1, 1, W, K)
        rotated = heads + kv_heads  # q and k heads, rotated together
        hidden = inputs_embeds
        for layer, (norm1, eps1, w_qkv, w_o, norm2, eps2, w_gate_up, w_down, act, scaling) in enumerate(self.layers):
            x = F.rms_norm(hidden, (hidden_size,), norm1, eps1)
            qkv = (x @ w_qkv).view(rows, width, rotated + kv_heads, head_dim)
            qk = qkv[:, :, :rotated]
            qk = qk * cos + qk.roll(half, -1) * sin
            q, k, v = qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, rotated:]
            k_cache, v_cache = self.keys[layer], self.values[layer]
            if isinstance(slots, tuple):
                k_cache[:, :, slots[0] : slots[1]] = k.transpose(1, 2)
                v_cache[:, :, slots[0] : slots[1]] = v.transpose(1, 2)
            else:
                k_cache[self._row_index, :, slots] = k
                v_cache[self._row_index, :, slots] = v
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k_cache[:, :, :keys_len],
                v_cache[:, :, :keys_len],
                attn_mask=mask,
                scale=scaling,
                enable_gqa=kv_heads != heads,
            )
            hidden = hidden + out.transpose(1, 2).reshape(rows, width, heads * head_dim) @ w_o
            gate, up = (F.rms_norm(hidden, (hidden_size,), norm2, eps2) @ w_gate_up).chunk(2, dim=-1)
            hidden = hidden + (act(gate) * up) @ w_down
        return F.rms_norm(hidden[:, -keep:], (hidden_size,), *self.final_norm)

    @torch.no_grad()
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the cache rows ``index`` (1-D, in that order), e.g. to stop decoding rows nobody waits for;
        later passes take ``len(index)`` rows."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"index must be a non-empty 1-D tensor of rows, got shape {tuple(index.shape)}")
        if int(index.min()) < 0 or int(index.max()) >= self.rows:
            raise ValueError(f"row index out of range for {self.rows} rows: {index.tolist()}")
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.rows = index.numel()
        self._row_index = torch.arange(self.rows, device=self.device)[:, None]

    def scores(
        self, visual: VisualVocab, *args, guidance: float | torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        """:meth:`forward`, then the visual head: (rows, keep, size) or bitwise (rows, keep, bits, 2) scores.

        With ``guidance`` (a CFG scale, see :func:`unitok.decoding.cfg.guide`), the rows are cond then uncond
        halves and the guided (rows / 2, ...) scores come back. A vocabulary head is linear, so guiding the hidden
        states before it equals guiding its logits, at half the head's rows: for a window of drafts the head is
        as large a matmul as all of a small model's layers together."""
        hidden = self.forward(*args, **kwargs)
        if visual.bits:
            scores = visual.head_scores(self.model, hidden)
            return scores if guidance is None else guide(scores, guidance)
        if guidance is not None:
            hidden = guide(hidden, guidance)
        return hidden @ self._visual_head(visual)

    def _visual_head(self, visual: VisualVocab) -> torch.Tensor:
        weight = self.model.lm_head.weight
        key = (visual.offset, visual.size, weight.data_ptr(), weight._version)
        if self._head is None or self._head[0] != key:
            cached = _PREPARED_HEADS.get(self.model)
            if cached is None or cached[0] != key:
                cached = (key, weight[visual.offset : visual.offset + visual.size].t().contiguous())
                _PREPARED_HEADS[self.model] = cached
            self._head = cached
        return self._head[1]
