"""Classifier-free guidance with a scale per request inside vLLM: a v1 logits processor.

vLLM's model forward sees tokens, not requests, so a unitok model guides inside the forward with one scale per
engine. With ``generation.per_request_guidance`` the model instead hands vLLM both streams' logits side by side,
``(N, 2V)`` = ``[conditional | unconditional]`` (:mod:`unitok.serving.vllm_model`), and
:class:`GuidanceLogitsProcessor`, which vLLM keeps informed of which request sits in which row, returns the guided
``(N, V)`` logits ``u + s_r (c - u)`` over the visual vocabulary (every other id -inf) before anything else samples
or reads them. A request names its scale in ``SamplingParams.extra_args["guidance_scale"]``; without one it gets
the engine's scale.

Log-probs: vLLM computes its default ("raw") log-probs before logits processors, which here would be over the
``2V`` columns; an engine with this processor runs with ``logprobs_mode="processed_logprobs"``, the log-probs of the
distribution each token is sampled from (after temperature, top-k and top-p; equal to the guided model's with the
defaults, temperature 1 and no truncation).
"""

from __future__ import annotations

import torch
from vllm.config import VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from unitok.decoding.cfg import check_guidance_scale
from unitok.serving.vllm_spec import ImageSpec

SCALE_KEY = "guidance_scale"  # the key of SamplingParams.extra_args


def request_scale(params: SamplingParams) -> float | None:
    """The scale a request asks for (checked), or None for the engine's."""
    extra = params.extra_args or {}
    return None if extra.get(SCALE_KEY) is None else check_guidance_scale(extra[SCALE_KEY])


class GuidanceLogitsProcessor(LogitsProcessor):
    """``(N, 2V)`` paired logits -> ``(N, V)`` guided logits, each row with its request's scale (module docstring)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from unitok.serving.vllm_model import image_spec

        self._setup(image_spec(vllm_config))

    @classmethod
    def for_spec(cls, spec: ImageSpec) -> GuidanceLogitsProcessor:
        """The processor of the model ``spec`` describes, without a vLLM config."""
        processor = cls.__new__(cls)
        processor._setup(spec)
        return processor

    def _setup(self, spec: ImageSpec) -> None:
        if not spec.per_request_guidance:
            raise ValueError(
                "GuidanceLogitsProcessor needs a model started with generation.per_request_guidance = true "
                "(VllmImageEngine.start(per_request_guidance=True))"
            )
        self.vocab_size = spec.vocab_size
        self.visual = slice(spec.visual_offset, spec.visual_offset + spec.num_visual_tokens)
        self.default_scale = spec.guidance_scale
        self.scales: dict[int, float] = {}  # batch row -> scale, for requests that name one
        self._column: torch.Tensor | None = None  # (rows, 1) scales of the last apply, until the batch changes

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_scale(sampling_params)  # ValueError -> vLLM's 400

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.scales, batch_update, lambda params, _prompt, _out: request_scale(params)):
            self._column = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, width = logits.shape
        if width != 2 * self.vocab_size:
            raise RuntimeError(
                f"expected paired logits of width {2 * self.vocab_size} (the model's per-request guidance output), "
                f"got {width}: is the model started with generation.per_request_guidance = true?"
            )
        scales = self._column
        if scales is None or scales.shape[0] != rows or scales.dtype != logits.dtype:
            scales = torch.full((rows, 1), self.default_scale, dtype=logits.dtype, device=logits.device)
            for row, scale in self.scales.items():
                if row < rows:
                    scales[row, 0] = scale
            self._column = scales
        cond = logits[:, self.visual]
        uncond = logits[:, self.vocab_size + self.visual.start : self.vocab_size + self.visual.stop]
        guided = torch.full((rows, self.vocab_size), float("-inf"), dtype=logits.dtype, device=logits.device)
        guided[:, self.visual] = torch.lerp(uncond, cond, scales)  # u + s (c - u)
        return guided
