"""The unified Llama-style transformer with MM-RoPE and the next-token / next-scale / next-block modes.

``UnitokConfig`` / ``UnitokModel`` / ``UnitokForCausalLM`` are registered with ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM`` on import, so ``AutoModelForCausalLM.from_pretrained(path)`` loads a saved model after
``import unitok.model``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from unitok.model.configuration import LUMOS_MM_ROPE_PATTERN, UnitokConfig
from unitok.model.mm_rope import UnitokRotaryEmbedding, axis_of_frequency, default_inv_freq
from unitok.model.modeling import UnitokForCausalLM, UnitokModel, UnitokPreTrainedModel

AutoConfig.register(UnitokConfig.model_type, UnitokConfig, exist_ok=True)
AutoModel.register(UnitokConfig, UnitokModel, exist_ok=True)
AutoModelForCausalLM.register(UnitokConfig, UnitokForCausalLM, exist_ok=True)

__all__ = [
    "LUMOS_MM_ROPE_PATTERN",
    "UnitokConfig",
    "UnitokForCausalLM",
    "UnitokModel",
    "UnitokPreTrainedModel",
    "UnitokRotaryEmbedding",
    "axis_of_frequency",
    "default_inv_freq",
]
