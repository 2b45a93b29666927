"""vLLM's engine stepped in one process with no gaps: the most of vLLM's speed any server on this machine can pass on.

``unitok bench serving`` runs this module in a child process (``python -m unitok.bench.vllm_loop``) for its
``vllm_step_loop`` entry. The child starts vLLM's synchronous ``LLM`` on the generator with the server's settings
(the compiled model, the same torch threads, its engine core in the same process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
and the ``uni`` executor) and keeps ``clients`` requests in flight by adding the next one in the step that finished
the last. No HTTP, no asyncio, no queues between processes, no pixel decoding, no slot ever empty: a server does
all of that on the same cores, so on a machine where the engine needs every core (2 here) its images per second stay
below this loop's. HF ``generate`` rounds (the benchmark's baseline) alternate with the loop's rounds in the same
child, so ``ratio`` is the ceiling of the server's ratio at that moment.

The loop's tokens are checked, not only timed: one more pass of the same jobs with ``logprobs=0`` compares every
sampled token's log-prob with the HF model's guided log-prob (``logprob_divergences``, as the server's check does).

A child process because vLLM reads ``VLLM_ENABLE_V1_MULTIPROCESSING`` when it starts and its CPU worker replaces
``torch.set_num_threads`` for the whole process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoopRun:
    """``tokens[i]``: the visual indices sampled for request ``i``; ``logprobs[i]`` their log-probs (when asked);
    ``wall``: seconds from the first request added to the last finished; ``max_in_flight``: the most requests vLLM
    held at once."""

    tokens: dict[int, list[int]]
    logprobs: dict[int, list[float]] | None
    wall: float
    max_in_flight: int


def start_llm(path: str, enforce_eager: bool = False):
    """vLLM's ``LLM`` on the next-token generator at ``path`` with the server's engine arguments, its engine core in
    this process (for a process of its own: see the module docstring); returns it and the generator's
    :class:`~unitok.serving.vllm_spec.ImageSpec`."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read when the engine starts
    from vllm import LLM

    from unitok.serving.vllm_engine import engine_arguments
    from unitok.serving.vllm_spec import ImageSpec

    spec = ImageSpec.from_pretrained(path)
    llm = LLM(**engine_arguments(path, spec, enforce_eager=enforce_eager), distributed_executor_backend="uni")
    return llm, spec


def run_loop(llm, spec, requests: list[tuple[list[int], int]], clients: int, sampling, logprobs: int | None = None):
    """``requests`` (prompt token ids, seed), ``clients`` of them in flight: the next one is added as soon as a step
    finishes one. Returns a :class:`LoopRun`."""
    from unitok.serving.vllm_engine import image_sampling_params

    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    engine = llm.llm_engine
    ids: dict[str, int] = {}
    cursor = iter(range(len(requests)))

    def add() -> bool:
        i = next(cursor, None)
        if i is None:
            return False
        prompt, seed = requests[i]
        request_id = uuid.uuid4().hex
        ids[request_id] = i
        params = image_sampling_params(spec, sampling, seed=seed, logprobs=logprobs)
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        return True

    tokens: dict[int, list[int]] = {}
    scores: dict[int, list[float]] = {}
    start = time.perf_counter()
    in_flight = sum(add() for _ in range(clients))
    most = in_flight
    while in_flight:
        for output in engine.step():
            if not output.finished:
                continue
            i = ids.pop(output.request_id)
            sample = output.outputs[0]
            tokens[i] = [t - spec.visual_offset for t in sample.token_ids]
            if logprobs is not None:
                scores[i] = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids, strict=True)]
            in_flight -= 1
            in_flight += add()
        most = max(most, in_flight)
    wall = time.perf_counter() - start
    for i, row in tokens.items():
        if len(row) != spec.num_visual or not all(0 <= t < spec.num_visual_tokens for t in row):
            raise RuntimeError(f"request {i}: vLLM returned {row} for {spec.num_visual} visual indices")
    return LoopRun(tokens, scores if logprobs is not None else None, wall, most)


def measure(path: str, n: int, clients: int, rounds: int, seed: int, enforce_eager: bool = False) -> dict:
    """``rounds`` x (HF generate on the benchmark's ``n`` images in batches of ``clients``, then the loop on the same
    jobs), medians, and the log-prob check of the loop's tokens (module docstring)."""
    import torch

    from unitok.bench.serving import hf_baseline, image_jobs, logprob_divergences
    from unitok.decoding.sampling import SamplingConfig
    from unitok.model.pretrained import load_generator

    if n < 1 or clients < 1 or rounds < 1:
        raise ValueError("n, clients and rounds must be >= 1")
    gen = load_generator(path)
    defaults = gen.sampling_defaults()
    guidance = defaults["guidance_scale"]
    sampling = SamplingConfig(defaults["temperature"], defaults["top_k"], defaults["top_p"])
    labels, jobs = image_jobs(gen, n, seed)
    threads = torch.get_num_threads()  # vLLM's CPU worker pins the count once it starts
    llm, spec = start_llm(path, enforce_eager)
    if spec.guidance_scale != guidance:
        raise ValueError(f"vLLM guides with {spec.guidance_scale}, the generator recommends {guidance}")
    requests = [(spec.prompt(gen.vocab.prefix_ids([name])[0].tolist()), s) for name, s in jobs]
    run_loop(llm, spec, requests[:clients], clients, sampling)  # warm-up
    loops, hfs, most = [], [], 0
    for _ in range(rounds):
        hfs.append(hf_baseline(gen, labels, clients, guidance, sampling, seed)["images_per_s"])
        run = run_loop(llm, spec, requests, clients, sampling)
        loops.append(n / run.wall)
        most = max(most, run.max_in_flight)
    checked = run_loop(llm, spec, requests, clients, sampling, logprobs=0)
    served = {i: (checked.tokens[i], checked.logprobs[i]) for i in checked.tokens}
    loop, hf = sorted(loops)[rounds // 2], sorted(hfs)[rounds // 2]
    return {
        "images_per_s": loop,
        "rounds_images_per_s": loops,
        "hf_generate_images_per_s": hf,
        "hf_rounds_images_per_s": hfs,
        "ratio": loop / hf,
        "images": n,
        "clients": clients,
        "max_in_flight": most,
        "threads": threads,
        **logprob_divergences(gen, jobs, served, guidance),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m unitok.bench.vllm_loop", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a next-token generator folder")
    parser.add_argument("--n", type=int, default=64, help="images per round")
    parser.add_argument("--clients", type=int, default=16, help="requests in flight (and HF's batch size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--json", required=True, help="where to write the result")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint, "config.json").is_file():
        parser.error(f"no generator at {args.checkpoint}")
    if min(args.n, args.clients, args.rounds) < 1:
        parser.error("--n, --clients and --rounds must be >= 1")
    try:
        result = measure(args.checkpoint, args.n, args.clients, args.rounds, args.seed, args.enforce_eager)
    except ValueError as err:  # e.g. a generator that is not next-token
        parser.error(str(err))
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("rounds_images_per_s")}), file=sys.stderr)


if __name__ == "__main__":
    main()
