"""unitok: autoregressive visual generation with discrete tokens.

``import unitok`` registers the tokenizers and the transformer with transformers' Auto classes
(``AutoConfig``, ``AutoModel``, ``AutoModelForCausalLM``), so ``AutoModelForCausalLM.from_pretrained(path)`` loads
a saved unitok model. ``UnitokPipeline`` (tokenizer + transformer + decoder) is imported on first use.
"""

__version__ = "0.1.0"

import unitok.model  # noqa: E402,F401  (registers the Auto classes)
import unitok.tokenizers  # noqa: E402,F401


def __getattr__(name: str):
    if name in ("UnitokPipeline", "PipelineOutput"):
        from unitok import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'unitok' has no attribute {name!r}")
