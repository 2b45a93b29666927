"""vLLM plugin: lets a plain vLLM server load unitok generator folders.

vLLM calls :func:`register` in every process it starts (front end, engine core, workers) through the
``vllm.general_plugins`` entry point in ``pyproject.toml``. It does two things, both idempotent:

- ``import unitok.model`` registers ``UnitokConfig`` with transformers' ``AutoConfig``, so vLLM reads
  ``model_type: "unitok"`` without ``trust_remote_code``;
- registers the ``UnitokForCausalLM`` architecture with vLLM's ``ModelRegistry`` as a lazy ``"module:Class"``
  string, so vLLM (and torch) are imported by the model file only when a unitok model is actually built.

``unitok`` itself never imports vLLM; only this package's ``vllm_*`` modules do.
"""

from __future__ import annotations

ARCHITECTURE = "UnitokForCausalLM"
MODEL_CLASS = "unitok.serving.vllm_model:UnitokVllmForCausalLM"


def register() -> None:
    from vllm import ModelRegistry

    import unitok.model  # noqa: F401  (AutoConfig.register("unitok", UnitokConfig))

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
