"""The unitok transformer: transformers' Llama decoder layers driven by MM-RoPE positions and custom masks.

The layers, norms and attention are transformers' own ``LlamaDecoderLayer`` / ``LlamaRMSNorm`` (so eager, sdpa and
flash-attention kernels come from ``ALL_ATTENTION_FUNCTIONS``), and every parameter has Llama's name
(``model.layers.N.self_attn.q_proj`` ...): a checkpoint loads into ``LlamaForCausalLM`` and into vLLM's Llama
layers without a converter. What is ours is the model-level forward:

- ``position_ids`` may be ``(B, L)`` (1-D RoPE) or ``(3, B, L)`` (t, h, w) MM-RoPE positions, possibly fractional
  (see :mod:`unitok.model.mm_rope`); text-only positions reproduce ``LlamaForCausalLM`` exactly.
- ``attention_mask`` may be a 2-D padding mask (-> the standard causal mask of ``masking_utils``) or a 4-D mask
  ``(B, 1, L_q, L_kv)``, boolean with True = may attend (or additive float), used as is: the next-scale and
  next-block prediction modes pass block-causal masks this way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaRMSNorm
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from unitok.model.configuration import UnitokConfig
from unitok.model.mm_rope import UnitokRotaryEmbedding

# Attention kernels that take a 4-D mask as is: sdpa a boolean or an additive one, eager (which adds the mask to the
# scores) only an additive one. Flash attention only understands 2-D padding masks, so it cannot run block masks.
_FLASH_PREFIX = "flash_attention"


class UnitokPreTrainedModel(PreTrainedModel):
    """Shared HF plumbing: config class, Llama's support flags, and the rotary buffers' initialisation."""

    config_class = UnitokConfig
    config: UnitokConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # Context parallelism drops per-layer masks and would silently train block-causal modes as plain causal.
    _supports_context_parallel = False
    _can_record_outputs = {"hidden_states": LlamaDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module: nn.Module) -> None:
        """Llama's init for linears, embeddings and norms; the rotary tables are rebuilt from the config because
        ``from_pretrained`` materialises non-persistent buffers as uninitialised memory."""
        super()._init_weights(module)
        if isinstance(module, UnitokRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
            init.copy_(module.axis, module.compute_axis())


class UnitokModel(UnitokPreTrainedModel):
    """Embedding, Llama decoder layers, final RMSNorm; returns ``BaseModelOutputWithPast``."""

    def __init__(self, config: UnitokConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = UnitokRotaryEmbedding(config)
        # Bitwise visual tokens (binary tokenizers, as Infinity): a token's d bits in {-1, +1} -> one embedding.
        self.bit_embed = nn.Linear(config.visual_bits, config.hidden_size, bias=False) if config.visual_bits else None
        # Which block (scale, for next-scale) a visual slot belongs to, as VAR's level embedding: slots of different
        # scales can share (t, h, w) coordinates, and this tells them apart.
        n_blocks = config.num_block_embeddings
        self.block_embed = nn.Embedding(n_blocks, config.hidden_size) if n_blocks else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """``position_ids``: None (positions continue the cache: ``cache_position`` if given, else
        ``past_len + arange(L)``), ``(B, L)`` or ``(3, B, L)``. ``attention_mask``: None, 2-D padding mask
        ``(B, past_len + L)``, or 4-D ``(B, 1, L, L_kv)`` (bool, True = attend; or additive float) used as is, where
        ``L_kv`` is ``past_len + L`` (a static cache's free slots are padded as masked)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        batch, length = inputs_embeds.shape[:2]
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        positions = self._positions(position_ids, cache_position, batch, length, past_length, inputs_embeds.device)
        # Masks and flash attention's packed-sequence detection read 1-D positions only: (t, h, w) positions are
        # not monotonic along the sequence and would look like packed sequences.
        flat_positions = position_ids if position_ids is not None and position_ids.dim() == 2 else None
        mask = self._attention_mask(attention_mask, inputs_embeds, past_key_values, past_length, flat_positions)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, positions)
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=flat_positions,
                past_key_values=past_key_values,
                use_cache=use_cache,
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values)

    @staticmethod
    def _positions(
        position_ids: torch.Tensor | None,
        cache_position: torch.Tensor | None,
        batch: int,
        length: int,
        past_length: int,
        device: torch.device,
    ) -> torch.Tensor:
        """Validate ``position_ids`` ((B, L) or (3, B, L), batch 1 broadcasts) or build 1-D ones ``(1, L)``."""
        if position_ids is None:
            if cache_position is None:
                return (torch.arange(length, device=device) + past_length)[None]  # (1, L)
            if tuple(cache_position.shape) != (length,):
                raise ValueError(f"cache_position must be ({length},), got shape {tuple(cache_position.shape)}")
            return cache_position[None]  # (1, L)
        shape = tuple(position_ids.shape)
        flat_ok = position_ids.dim() == 2 and shape[0] in (1, batch) and shape[1] == length
        mm_ok = position_ids.dim() == 3 and shape[0] == 3 and shape[1] in (1, batch) and shape[2] == length
        if not (flat_ok or mm_ok):
            raise ValueError(
                f"position_ids must be ({batch}, {length}) for 1-D RoPE or (3, {batch}, {length}) for (t, h, w) "
                f"MM-RoPE (batch 1 broadcasts), got shape {shape}"
            )
        if position_ids.dtype == torch.bool or position_ids.is_complex():
            raise ValueError(f"position_ids must be integer or float, got {position_ids.dtype}")
        return position_ids

    def _attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        past_key_values: Cache | None,
        past_length: int,
        flat_positions: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """2-D / None -> transformers' causal mask for the current kernel; 4-D -> checked, adapted to the kernel."""
        if attention_mask is None or attention_mask.dim() == 2:
            return create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=flat_positions,
            )
        if attention_mask.dim() != 4:
            raise ValueError(
                f"attention_mask must be a 2-D padding mask (B, L_kv) or a 4-D mask (B, 1, L_q, L_kv), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        return self._prepare_4d_mask(attention_mask, inputs_embeds, past_key_values, past_length)

    def _prepare_4d_mask(
        self,
        mask: torch.Tensor,
        inputs_embeds: torch.Tensor,
        past_key_values: Cache | None,
        past_length: int,
    ) -> torch.Tensor:
        """A caller's 4-D mask, as the attention kernel wants it.

        transformers' ``create_causal_mask`` returns any 4-D mask untouched, and the kernels differ: sdpa reads a
        boolean mask as True = attend, but eager *adds* the mask to the scores (a boolean would add 0/1), so
        booleans become 0 / finfo.min for eager. A static cache's keys span ``max_cache_len`` slots, so a mask over
        the ``past + L`` real tokens is padded with masked columns.
        """
        batch, length = inputs_embeds.shape[:2]
        implementation = self.config._attn_implementation or "eager"
        if implementation.startswith(_FLASH_PREFIX):
            raise ValueError(
                f"{implementation} only supports 2-D padding masks; use attn_implementation='sdpa' or 'eager' for "
                "4-D (block-causal) attention masks"
            )
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise ValueError(f"a 4-D attention_mask must be bool (True = attend) or additive float, got {mask.dtype}")
        kv_length = past_length + length
        if past_key_values is not None:
            kv_length = past_key_values.get_mask_sizes(length, 0)[0]
        if mask.shape[-1] == past_length + length < kv_length:
            pad = kv_length - mask.shape[-1]
            fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            mask = F.pad(mask, (0, pad), value=fill)  # (B, 1, L, kv_length)
        if mask.shape[0] not in (1, batch) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (length, kv_length):
            raise ValueError(
                f"a 4-D attention_mask must be ({batch}, 1, {length}, {kv_length}) (queries x cached + new keys), "
                f"got shape {tuple(mask.shape)}"
            )
        mask = mask.to(inputs_embeds.device)
        if mask.dtype == torch.bool and implementation == "eager":
            zero = torch.zeros((), dtype=inputs_embeds.dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(inputs_embeds.dtype).min)
        return mask


class UnitokForCausalLM(UnitokPreTrainedModel, GenerationMixin):
    """``UnitokModel`` + ``lm_head``; the shifted next-token cross-entropy when ``labels`` are given.

    ``generate`` works as for Llama (dynamic or ``cache_implementation="static"``) with 1-D positions. Passing
    ``(3, B, L)`` positions to ``generate`` is not supported: its bookkeeping would advance every axis by 1 per
    new token (text semantics); visual decoding loops pass their positions to ``forward`` themselves.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: UnitokConfig):
        super().__init__(config)
        self.model = UnitokModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Bitwise head: one logit per bit of a visual token instead of a 2^d-way softmax (Infinity).
        self.bit_head = nn.Linear(config.hidden_size, config.visual_bits, bias=False) if config.visual_bits else None
        self.post_init()

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args, visual_positions: torch.Tensor | None = None, **kwargs
    ) -> dict:
        """transformers' step inputs, plus MM-RoPE: with ``visual_positions`` (3, L), the positions of the whole
        sequence (a generator's ``layout.positions``), each step's ``position_ids`` are read from it at the cache's
        length, so ``generate`` decodes a next-token image (see :mod:`unitok.decoding.hf`)."""
        inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        if visual_positions is None:
            return inputs
        fed = inputs.get("input_ids")
        fed = fed if fed is not None else inputs["inputs_embeds"]
        batch, length = fed.shape[:2]
        cache = inputs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        if visual_positions.dim() != 2 or visual_positions.shape[0] != 3 or past + length > visual_positions.shape[1]:
            raise ValueError(
                f"visual_positions must be (3, L) covering the {past + length} tokens generated so far, got shape "
                f"{tuple(visual_positions.shape)}"
            )
        step = visual_positions[:, past : past + length].to(fed.device)
        inputs["position_ids"] = step[:, None].expand(-1, batch, -1)
        return inputs

    def embed_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """(..., visual_bits) in {0, 1} -> (..., hidden) input embeddings (bitwise models only)."""
        if self.model.bit_embed is None:
            raise ValueError("this model has no bitwise head (config.visual_bits = 0)")
        return self.model.bit_embed(bits.to(self.model.bit_embed.weight.dtype) * 2 - 1)

    def bit_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) final hidden states -> (..., visual_bits) logits of each bit being 1."""
        if self.bit_head is None:
            raise ValueError("this model has no bitwise head (config.visual_bits = 0)")
        return self.bit_head(hidden_states)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """As :meth:`UnitokModel.forward`; ``labels`` (B, L) with -100 = ignored are shifted inside the loss;
        ``logits_to_keep`` > 0 keeps only the last positions' logits (an index tensor keeps those positions)."""
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache_position=cache_position,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
