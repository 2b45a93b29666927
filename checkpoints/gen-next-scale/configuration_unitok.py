"""Configuration of the unitok transformer: a Llama decoder whose rotary embedding is Lumos-1's MM-RoPE.

Every architecture field has Llama's name and meaning, so the same ``config.json`` + safetensors describe a model
that ``LlamaForCausalLM`` (with ``mm_rope=False``) and vLLM's Llama layers can also build. Ours are ``mm_rope``
(3-D (t, h, w) rotary positions instead of 1-D ones), ``mm_rope_pattern`` (which axis each rotary frequency
follows; see :mod:`unitok.model.mm_rope`) and ``visual_bits`` (Infinity's bitwise head: d binary logits and a
linear bit embedding in place of 2^d vocabulary rows, for binary tokenizers).

Written as a transformers-5 dataclass config (annotated fields, ``__post_init__``) like ``LlamaConfig``: fields are
compared by ``==`` and serialised by ``to_dict``, and unknown keyword arguments are kept as attributes, so callers
can add vocabulary / layout fields that survive ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

# Lumos-1's "distributed" 2:3:3 allocation of 16 consecutive rotary frequencies to the (t, h, w) axes: t takes the
# first 4, h and w alternate in pairs over the other 12, so every axis sees high, middle and low frequencies.
LUMOS_MM_ROPE_PATTERN: tuple[int, ...] = (0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 2, 2)


class UnitokConfig(PretrainedConfig):
    """Llama-architecture config plus MM-RoPE. Small defaults (hidden 256, 8 layers, 4 heads, 2 kv heads).

    ``num_key_value_heads=None`` means multi-head attention (as many kv heads as heads); ``head_dim=None`` means
    ``hidden_size // num_attention_heads``. ``mm_rope_pattern=None`` means :data:`LUMOS_MM_ROPE_PATTERN`; a custom
    pattern is any non-empty list of axis ids (0 = t, 1 = h, 2 = w) repeated over the ``head_dim // 2`` frequencies.
    """

    model_type = "unitok"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Llama's plans: the parameter names are Llama's, so tensor / pipeline parallelism shard them the same way.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int | None = 2
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    mm_rope: bool = True
    mm_rope_pattern: list[int] | None = None
    visual_bits: int = 0  # > 0: Infinity-style bitwise visual head/input of this many bits (binary tokenizers)
    num_block_embeddings: int = 0  # > 0: a learned embedding per generation block (VAR's level embedding)

    def __post_init__(self, **kwargs) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.mm_rope_pattern is None:
            self.mm_rope_pattern = list(LUMOS_MM_ROPE_PATTERN)
        self.mm_rope_pattern = [int(axis) for axis in self.mm_rope_pattern]
        self._check_sizes()
        if (
            isinstance(self.visual_bits, bool)
            or not isinstance(self.visual_bits, int)
            or not 0 <= self.visual_bits <= 62
        ):
            raise ValueError(f"visual_bits must be an int in 0..62 (0 = no bitwise head), got {self.visual_bits!r}")
        if (
            isinstance(self.num_block_embeddings, bool)
            or not isinstance(self.num_block_embeddings, int)
            or self.num_block_embeddings < 0
        ):
            raise ValueError(f"num_block_embeddings must be an int >= 0, got {self.num_block_embeddings!r}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._check_rope()
        super().__post_init__(**kwargs)

    def _check_sizes(self) -> None:
        """Raise ``ValueError`` for sizes Llama's layers would silently mis-build (or fail on deep inside)."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.num_key_value_heads, int) or self.num_key_value_heads < 1:
            raise ValueError(f"num_key_value_heads must be a positive int or None, got {self.num_key_value_heads!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        if not 0.0 <= float(self.attention_dropout) < 1.0:
            raise ValueError(f"attention_dropout must lie in [0, 1), got {self.attention_dropout}")

    def _check_rope(self) -> None:
        """RoPE rotates channel pairs, so head_dim must be even; MM-RoPE axes must be 0 (t), 1 (h) or 2 (w)."""
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be a positive even int (RoPE rotates channel pairs), got {self.head_dim}")
        if not float(self.rope_theta) > 1.0:
            raise ValueError(f"rope_theta must be > 1, got {self.rope_theta}")
        if not self.mm_rope_pattern or any(axis not in (0, 1, 2) for axis in self.mm_rope_pattern):
            raise ValueError(
                f"mm_rope_pattern must be a non-empty list of axis ids 0 (t), 1 (h), 2 (w), got {self.mm_rope_pattern}"
            )
