"""``unitok.bench.vllm_loop``, the step-loop ceiling of ``unitok bench serving``, run the way the benchmark runs it
(a child process), small and eager: it keeps the requested number of requests in flight and its tokens are the
guided model's (every sampled token's log-prob equals HF's teacher-forced guided log-prob)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unitok.bench.serving import step_loop
from unitok.bench.vllm_loop import run_loop
from unitok.serving.server import vllm_importable

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_importable(), reason="vllm does not import here")
def test_step_loop_child_keeps_clients_in_flight_and_samples_the_guided_model():
    result = step_loop(CHECKPOINTS / "gen-next-token", n=6, clients=3, rounds=1, seed=0, enforce_eager=True)
    assert result["images"] == 6 and result["clients"] == 3
    assert result["max_in_flight"] == 3  # never more than asked
    assert result["logprob_requests"] == 6  # all 6 done with 3 in flight: finished requests were replaced
    assert result["logprob_divergences"] == 0, result["max_logprob_error"]
    assert result["images_per_s"] > 0 and result["hf_generate_images_per_s"] > 0
    assert result["ratio"] == pytest.approx(result["images_per_s"] / result["hf_generate_images_per_s"])
    assert result["threads"] == torch.get_num_threads()  # the child runs with the benchmark's torch threads


def test_step_loop_child_failure_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="no generator at"):
        step_loop(tmp_path, n=2, clients=1, rounds=1, seed=0)
    with pytest.raises(RuntimeError, match="must be >= 1"):
        step_loop(CHECKPOINTS / "gen-next-token", n=2, clients=0, rounds=1, seed=0)


def test_run_loop_refuses_no_clients():
    with pytest.raises(ValueError, match="clients must be >= 1"):
        run_loop(None, None, [], 0, None)
