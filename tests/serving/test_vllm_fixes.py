"""unitok.serving.vllm_fixes: the plain-torch expansion's contract, and that after install() the rejection sampler's
helpers answer correctly on this vLLM (whether it needed the fixes or not)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm", exc_type=ImportError)

from unitok.serving import vllm_fixes  # noqa: E402
from unitok.serving.vllm_fixes import expand_batch_to_tokens  # noqa: E402

pytestmark = pytest.mark.vllm


def test_expand_repeats_each_request_value_for_its_tokens():
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    out = expand_batch_to_tokens(torch.tensor([0.7, 1.3, 2.0]), cu, 6)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([0.7, 0.7, 1.3, 1.3, 1.3, 2.0]))
    top_k = expand_batch_to_tokens(torch.tensor([5, 0, 9], dtype=torch.int32), cu, 6)
    assert top_k.dtype == torch.int32 and top_k.tolist() == [5, 5, 0, 0, 0, 9]


def test_expand_replaces_greedy_temperature_and_skips_requests_without_drafts():
    cu = torch.tensor([0, 2, 2, 3], dtype=torch.int64)  # requests 0 and 2 verify no drafts this step
    out = expand_batch_to_tokens(torch.tensor([0.5, 0.0, 3.0, 0.0]), cu, 3, replace_from=0, replace_to=1)
    assert out.tolist() == [1.0, 1.0, 1.0]
    assert expand_batch_to_tokens(torch.tensor([0.5]), torch.tensor([0]), 0).shape == (0,)


def test_expand_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="batch"):
        expand_batch_to_tokens(torch.tensor([1.0, 2.0]), torch.tensor([1]), 1)
    with pytest.raises(RuntimeError):  # counts summing past num_tokens: torch refuses the output size
        expand_batch_to_tokens(torch.tensor([1.0]), torch.tensor([3]), 2)


def test_install_leaves_the_rejection_sampler_correct_and_is_idempotent():
    from vllm.v1.sample import rejection_sampler

    first = vllm_fixes.install()
    assert vllm_fixes.install() == first
    assert set(first) <= {"expand_batch_to_tokens", "apply_top_k_top_p"}
    cu = torch.tensor([2, 3], dtype=torch.int32)
    temperature = rejection_sampler.expand_batch_to_tokens(torch.tensor([0.5, 0.0]), cu, 3, 0, 1)
    assert temperature.tolist() == [0.5, 0.5, 1.0]
    empty = torch.zeros(0, 7)
    assert rejection_sampler.apply_top_k_top_p(empty, torch.zeros(0, dtype=torch.int32), None).shape == (0, 7)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    masked = rejection_sampler.apply_top_k_top_p(logits.clone(), torch.tensor([2], dtype=torch.int32), None)
    assert torch.isinf(masked).tolist() == [[True, False, True, False]]
