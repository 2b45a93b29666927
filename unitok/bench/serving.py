"""``unitok bench serving``: images per second of the real server under concurrent clients, against HF ``generate``.

The LlamaGen comparison, on the bundled next-token generator at its recommended guidance and sampling:

- ``hf_generate_images_per_s``: transformers' ``model.generate`` (unitok's ``hf`` decoder: CFG and the visual
  vocabulary as logits processors) on the same ``--n`` class-balanced prompts, in batches of ``--clients``, tokens
  decoded to pixels;
- ``vllm_images_per_s``: ``unitok serve gen-next-token --backend vllm`` started as a subprocess on 127.0.0.1 and
  called by ``--clients`` concurrent official ``openai`` clients (``images.generate``, n=1, one seed per image,
  PNG returned) until ``--n`` images are back; ``ratio`` = vLLM / HF;
- ``native_block_images_per_s``: the same load on ``unitok serve gen-next-block`` (the native batching engine);
  ``native_token_images_per_s``: on ``unitok serve gen-next-token --backend native`` (the native engine's plain AR
  loop, for comparison with vLLM on the same model);
- ``p50_latency_s`` / ``p99_latency_s``: per-request latency of the vLLM run (the native runs' in their entries);
- ``vllm_engine_images_per_s``: the same prompts and seeds straight into vLLM's engine from ``--clients``
  concurrent coroutines (no HTTP, no pixels, no PNG), and ``vllm_engine_ratio`` against HF: how much of vLLM's
  speed the server passes on; ``vllm_engine_per_request_guidance_images_per_s``: the same with an engine started
  with ``per_request_guidance=True`` (what serving every guidance scale through vLLM costs);
- ``vllm_step_loop_images_per_s`` and ``vllm_step_loop_ratio``: vLLM's engine stepped in one process with
  ``--clients`` requests always in flight (no HTTP, no asyncio, no pixels, no empty slot;
  :mod:`unitok.bench.vllm_loop`, in a child process), against HF ``generate`` rounds alternating in that child: the
  most of vLLM's speed a server on this machine can pass on, so the ceiling of ``ratio`` here;
- with ``--speculative``, ``vllm_speculative``: the engine alone speculating with ``gen-draft`` (4 drafts a step,
  argmax and probabilistic drafts) and without a draft, each at ``--clients`` concurrent requests and at 1.

HF and vLLM are measured in ``--rounds`` alternating rounds (default 3) while the vLLM server is up, and the median
round of each is reported (every round is in ``rounds_images_per_s``): on a 2-core machine any other process moves
either figure by 2-5x, and a baseline measured at a different moment than the server is not a comparison.

``cfg_pair_divergences`` counts samples where the conditional and unconditional halves of classifier-free guidance
may have come apart under load. Two checks, both through the vLLM server: (1) the ``--n`` prompts and seeds again as
``--clients`` concurrent ``/v1/completions`` requests with ``logprobs=0``: the log-prob vLLM reports for every
sampled token must equal the HF model's guided log-prob of that token (teacher forced on the same tokens, the
request's own condition) within ``LOGPROB_TOLERANCE`` (a split pair, or one stream reading another request's keys,
moves it by far more); (2) ``--clients`` concurrent greedy requests (temperature 0) must give the tokens of unitok's
reference block decoder at the same guidance, except where the two implementations' guided logits tie within
``TIE_TOLERANCE`` at the first differing token (float rounding; counted apart as ``greedy_ties``).

Reported beside them, not counted: ``batched_vs_solo_mismatches``, images of the concurrent run that differ when
requested again alone with the same seed. A sampled token flips when float rounding that depends on the batch's
shape (torch.compile and oneDNN pick kernels per shape) moves two candidates' Gumbel-perturbed scores past each
other; (1) tells such a flip, where the distribution is the same, from a divergence, where it is not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unitok.decoding.sampling import SamplingConfig
from unitok.eval.generation import balanced_labels
from unitok.model.pretrained import load_generator

CHECKPOINT_ROOT = Path(__file__).resolve().parents[2] / "checkpoints"
TIE_TOLERANCE = 1e-3  # guided-logit gap below which two implementations may legitimately pick different argmaxes
LOGPROB_TOLERANCE = 1e-2  # |vLLM - HF| guided log-prob of a sampled token (fp32 kernels: ~1e-4; a split pair: > 0.1)
START_TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``unitok serve PATH`` in its own process group on 127.0.0.1; stopped (with vLLM's children) on exit.

    A process group, not a new session (``start_new_session``): with the kernel's scheduler autogroups (Linux
    ``kernel.sched_autogroup_enabled``, on by default) a session is its own CPU scheduling group, and vLLM's engine
    core and worker busy-poll each other (shared-memory queues that spin with ``sched_yield``) at ~100% of both cores
    while decoding. On the 2-core machine that starved the other group, the benchmark's client threads, for seconds
    at a time: rounds at 6-8 images/s instead of 15-18, 5-9 s latencies, and ``Server disconnected without sending a
    response`` when a client sent its next request on a connection that uvicorn's 5 s keep-alive timer was closing
    meanwhile. In the caller's session the clients compete thread by thread, as they would with any server."""

    def __init__(self, path: Path, backend: str, max_n: int, max_queue: int, extra_args: Sequence[str] = ()):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="unitok-serve-", suffix=".log", delete=False)
        command = [sys.executable, "-m", "unitok.cli", "serve", str(path), "--backend", backend]
        command += ["--port", str(self.port), "--max-n", str(max_n), "--max-queue", str(max_queue)]
        command += ["--log-level", "warning", *extra_args]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, process_group=0)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        self.log.flush()
        return "\n".join(Path(self.log.name).read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def _concurrently(count: int, clients: int, call: Callable[[int], Any]) -> tuple[dict[int, Any], list[str], float]:
    """``call(i)`` for ``i`` in ``range(count)`` from ``clients`` threads taking the next ``i`` as they finish (like
    clients sending their next request); the results by ``i``, the failures' messages (counted and reported, the
    load goes on) and the wall time."""
    results: dict[int, Any] = {}
    errors: list[str] = []
    cursor = iter(range(count))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            try:
                result = call(i)
            except Exception as err:
                with lock:
                    errors.append(f"{type(err).__name__}: {err}")
            else:
                with lock:
                    results[i] = result

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors, time.perf_counter() - start


def _load(url: str, model: str, jobs: list[tuple[str, int]], clients: int) -> dict:
    """``jobs`` (prompt, seed) sent by ``clients`` threads, one image per request; wall time, latencies, images."""
    client = _client(url)

    def call(i: int) -> tuple[float, str]:
        prompt, seed = jobs[i]
        start = time.perf_counter()
        out = client.images.generate(
            model=model, prompt=prompt, n=1, response_format="b64_json", extra_body={"seed": seed}
        )
        return time.perf_counter() - start, out.data[0].b64_json

    done, errors, wall = _concurrently(len(jobs), clients, call)
    latencies = [latency for latency, _ in done.values()]
    return {"wall": wall, "latencies": latencies, "images": {i: b64 for i, (_, b64) in done.items()}, "errors": errors}


def _summary(run: dict) -> dict:
    lat = np.asarray(run["latencies"]) if run["latencies"] else np.asarray([float("nan")])
    return {
        "images_per_s": len(run["images"]) / run["wall"],
        "images": len(run["images"]),
        "seconds": run["wall"],
        "errors": len(run["errors"]),
        "p50_latency_s": float(np.percentile(lat, 50)),
        "p99_latency_s": float(np.percentile(lat, 99)),
    }


def hf_baseline(gen, labels: list[int], batch_size: int, guidance: float, sampling: SamplingConfig, seed: int) -> dict:
    """HF ``generate`` (unitok's ``hf`` decoder) on ``labels`` in batches of ``batch_size``, tokens decoded to pixels:
    images per second after a warm-up batch."""
    rng = torch.Generator().manual_seed(seed)
    gen.generate_tokens(labels[:2], guidance, sampling, rng, "hf")  # warm-up
    start = time.perf_counter()
    for i in range(0, len(labels), batch_size):
        result = gen.generate_tokens(labels[i : i + batch_size], guidance, sampling, rng, "hf")
        gen.codec.decode(result.tokens)
    wall = time.perf_counter() - start
    return {"images_per_s": len(labels) / wall, "seconds": wall, "batch_size": batch_size}


def _greedy_divergences(url: str, gen, names: list[str], clients: int, guidance: float) -> dict:
    """Concurrent greedy requests through the server vs the reference block decoder (see the module docstring)."""
    from unitok.decoding.block import decode_blocks
    from unitok.decoding.cfg import guide

    client = _client(url)
    prompts = [names[i % len(names)] for i in range(clients)]

    def call(i: int) -> list[int]:
        out = client.completions.create(model="gen-next-token", prompt=prompts[i], temperature=0, seed=0)
        return [int(t) for t in out.choices[0].text.split()]

    served, errors, _ = _concurrently(clients, clients, call)
    vocab, layout, visual, model = gen.vocab, gen.layout(), gen.visual, gen.model
    reference = decode_blocks(
        model, layout, vocab.prefix_ids(prompts), visual, guidance, vocab.prefix_ids([None]), SamplingConfig(0.0)
    ).tokens
    mismatches = ties = 0
    for i, tokens in served.items():
        ref = reference[i].tolist()
        if tokens == ref:
            continue
        at = next(j for j, (a, b) in enumerate(zip(tokens, ref, strict=True)) if a != b)
        # guided logits of the reference at the first differing slot, given the (shared) tokens before it
        prefix = torch.cat([vocab.prefix_ids([prompts[i], None]), torch.full((2, 1), visual.boi_id)], 1)
        seq = torch.cat([prefix, (torch.tensor(ref[:at]) + visual.offset).expand(2, -1)], 1)
        with torch.no_grad():
            positions = layout.positions[:, : seq.shape[1]]  # (3, L) MM-RoPE (t, h, w)
            logits = model(input_ids=seq, position_ids=positions[:, None].expand(-1, 2, -1)).logits[:, -1]
        guided = guide(logits[:, visual.offset : visual.offset + visual.size], guidance)[0]
        if abs(float(guided[ref[at]] - guided[tokens[at]])) < TIE_TOLERANCE:
            ties += 1
        else:
            mismatches += 1
    return {"greedy_requests": clients, "greedy_mismatches": mismatches, "greedy_ties": ties, "errors": errors}


def _logprob_divergences(url: str, gen, jobs: list[tuple[str, int]], clients: int, guidance: float) -> dict:
    """``jobs`` as ``clients`` concurrent ``/v1/completions`` requests with ``logprobs=0``: every sampled token's
    log-prob (vLLM's guided distribution) must equal the HF model's guided log-prob of that token given the same
    tokens before it, for the request's own condition, within ``LOGPROB_TOLERANCE``."""
    client = _client(url)

    def call(i: int) -> tuple[list[int], list[float]]:
        prompt, seed = jobs[i]
        choice = client.completions.create(model="gen-next-token", prompt=prompt, seed=seed, logprobs=0).choices[0]
        return [int(t) for t in choice.text.split()], list(choice.logprobs.token_logprobs)

    served, errors, _ = _concurrently(len(jobs), clients, call)
    return {**logprob_divergences(gen, jobs, served, guidance), "errors": errors}


def logprob_divergences(
    gen, jobs: list[tuple[str, int]], served: dict[int, tuple[list[int], list[float]]], guidance: float
) -> dict:
    """``served[i]`` = (visual indices, their log-probs) sampled for ``jobs[i]``'s prompt, against the HF model's
    guided log-prob of each token given the same tokens before it: how many samples differ by more than
    ``LOGPROB_TOLERANCE`` anywhere, and the largest difference."""
    from unitok.decoding.cfg import next_token_guided_logprobs

    divergences, worst = 0, 0.0
    order = sorted(served)
    for start in range(0, len(order), 16):
        chunk = order[start : start + 16]
        tokens = torch.tensor([served[i][0] for i in chunk])
        reference = next_token_guided_logprobs(gen, [jobs[i][0] for i in chunk], tokens, guidance)
        reference = reference.gather(-1, tokens[..., None])[..., 0]  # (B, N)
        error = (torch.tensor([served[i][1] for i in chunk]) - reference).abs().amax(dim=1)  # (B,)
        divergences += int((error > LOGPROB_TOLERANCE).sum())
        worst = max(worst, float(error.max()))
    return {"logprob_requests": len(served), "logprob_divergences": divergences, "max_logprob_error": worst}


def image_jobs(gen, n: int, seed: int) -> tuple[list[int], list[tuple[str, int]]]:
    """The benchmark's ``n`` class-balanced labels of ``gen`` and its jobs: (class name, seed) per image."""
    names = list(gen.vocab.class_names)
    labels = balanced_labels(n, len(names))
    return labels, [(names[c], seed * 1_000_003 + i) for i, c in enumerate(labels)]


def _engine_alone(
    path: Path,
    gen,
    jobs: list[tuple[str, int]],
    clients: int,
    sampling: SamplingConfig,
    rounds: int,
    per_request_guidance: bool = False,
    draft=None,
    one_client: bool = False,
) -> dict:
    """The same prompts and seeds straight into a :class:`VllmImageEngine` (torch.compile, like the server) from
    ``clients`` concurrent coroutines, no HTTP, no pixels: what the server's vLLM backend could reach. Median of
    ``rounds``. The engine core's niceness is the server's. ``per_request_guidance``: the engine that serves every
    scale (the requests still use the default). ``draft``: a :class:`SpeculativeDraft` vLLM speculates with;
    ``one_client``: also ``one_client_images_per_s``, the first ``clients`` jobs one at a time (latency-bound)."""
    from unitok.serving.server import VLLM_ENGINE_NICE
    from unitok.serving.vllm_engine import VllmImageEngine, close_loop

    prefixes = {name: gen.vocab.prefix_ids([name])[0].tolist() for name, _ in jobs}
    engine = VllmImageEngine.start(
        path, enforce_eager=False, per_request_guidance=per_request_guidance, nice=VLLM_ENGINE_NICE, draft=draft
    )
    loop = asyncio.new_event_loop()

    async def load(items: list[tuple[str, int]], workers: int) -> float:
        cursor = iter(items)

        async def worker():
            for name, seed in cursor:
                await engine.sample(prefixes[name], 1, seed, sampling)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return len(items) / (time.perf_counter() - start)

    try:
        loop.run_until_complete(load(jobs[:clients], clients))  # warm-up
        measured = [loop.run_until_complete(load(jobs, clients)) for _ in range(rounds)]
        alone = [loop.run_until_complete(load(jobs[:clients], 1)) for _ in range(rounds)] if one_client else None
    finally:
        engine.shutdown()
        close_loop(loop)
    result = {"images_per_s": sorted(measured)[rounds // 2], "rounds_images_per_s": measured, "clients": clients}
    if alone is not None:
        result["one_client_images_per_s"] = sorted(alone)[rounds // 2]
    return result


def step_loop(path: Path, n: int, clients: int, rounds: int, seed: int, enforce_eager: bool = False) -> dict:
    """:mod:`unitok.bench.vllm_loop` in a child process (vLLM's engine stepped in-process, no gaps, HF rounds
    alternating): its result, or a ``RuntimeError`` with the child's last output lines."""
    with tempfile.TemporaryDirectory(prefix="unitok-vllm-loop-") as folder:
        out = Path(folder) / "loop.json"
        command = [sys.executable, "-m", "unitok.bench.vllm_loop", str(path), "--n", str(n), "--clients", str(clients)]
        command += ["--rounds", str(rounds), "--seed", str(seed), "--json", str(out)]
        command += ["--enforce-eager"] if enforce_eager else []
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        # its own process group, not session: see ServerProcess
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, process_group=0, timeout=2 * START_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"the vLLM step loop did not finish within {err.timeout:.0f} s") from None
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise RuntimeError(f"the vLLM step loop exited with {done.returncode}:\n{tail}")
        return json.loads(out.read_text())


def _speculative(
    path: Path, draft_path: Path, gen, jobs, clients: int, sampling: SamplingConfig, rounds: int, no_draft: dict
) -> dict:
    """The engine alone with argmax and probabilistic drafts (4 a step), at ``clients`` and 1, beside ``no_draft``
    (the engine-alone run without a draft, measured with ``one_client``)."""
    from unitok.serving.vllm_engine import SpeculativeDraft

    keys = ("images_per_s", "one_client_images_per_s")
    out = {"no_draft": {key: no_draft[key] for key in keys}}
    for name, method in (("argmax_drafts", "greedy"), ("probabilistic_drafts", "probabilistic")):
        print(f"vLLM engine alone, {name.replace('_', ' ')}")
        draft = SpeculativeDraft(str(draft_path), 4, method)
        run = _engine_alone(path, gen, jobs, clients, sampling, rounds, draft=draft, one_client=True)
        out[name] = {key: run[key] for key in keys}
    return out


def _solo_divergences(url: str, model: str, jobs: list[tuple[str, int]], concurrent: dict[int, str]) -> dict:
    """Each image of the concurrent run requested again alone (same seed) must come back identical."""
    client = _client(url)
    differ, errors = 0, []
    for i, b64 in sorted(concurrent.items()):
        prompt, seed = jobs[i]
        try:
            alone = client.images.generate(model=model, prompt=prompt, n=1, extra_body={"seed": seed})
            differ += alone.data[0].b64_json != b64
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
    return {"batched_vs_solo_mismatches": differ, "solo_requests": len(concurrent), "errors": errors}


def _interleaved(server: ServerProcess, model: str, jobs, clients: int, hf_round, rounds: int) -> tuple[dict, list]:
    """``rounds`` x (HF generate, then the same load through the server), alternating so both see the same machine
    (other processes on a 2-core box move either figure by 2-5x); the median round of each."""
    warm = _load(server.url, model, jobs[:clients], clients)
    loads, hfs, messages = [], [], list(warm["errors"])
    for _ in range(rounds):
        hfs.append(hf_round())
        load = _load(server.url, model, jobs, clients)
        messages += load["errors"]
        loads.append(load)
    order = sorted(range(rounds), key=lambda i: len(loads[i]["images"]) / loads[i]["wall"])
    median = loads[order[rounds // 2]]
    hf = sorted(hfs, key=lambda h: h["images_per_s"])[rounds // 2]
    summary = _summary(median)
    summary["rounds_images_per_s"] = [len(x["images"]) / x["wall"] for x in loads]
    hf["rounds_images_per_s"] = [h["images_per_s"] for h in hfs]
    return {"summary": summary, "load": median, "hf": hf}, messages


def run(args: argparse.Namespace) -> dict:
    from unitok.serving.server import vllm_importable

    if args.n < 1 or args.clients < 1 or args.rounds < 1:
        raise ValueError("--n, --clients and --rounds must be >= 1 (the issue's figures: 64 images, 16 clients)")
    root = Path(args.checkpoints) if args.checkpoints else CHECKPOINT_ROOT
    token_dir, block_dir = root / "gen-next-token", root / "gen-next-block"
    gen = load_generator(token_dir)
    defaults = gen.sampling_defaults()
    guidance = defaults["guidance_scale"]
    sampling = SamplingConfig(defaults["temperature"], defaults["top_k"], defaults["top_p"])
    names = list(gen.vocab.class_names)
    labels, jobs = image_jobs(gen, args.n, args.seed)
    result: dict = {
        "checkpoint": str(token_dir),
        "requests": args.n,
        "clients": args.clients,
        "rounds": args.rounds,
        "guidance_scale": guidance,
        "threads": torch.get_num_threads(),
    }

    def hf_round() -> dict:
        return hf_baseline(gen, labels, args.clients, guidance, sampling, args.seed)

    errors = 0
    if vllm_importable():
        print(f"vLLM server vs HF generate: {args.rounds} rounds of {args.n} images, {args.clients} clients")
        with ServerProcess(token_dir, "vllm", max_n=16, max_queue=4 * args.clients) as server:
            measured, messages = _interleaved(server, "gen-next-token", jobs, args.clients, hf_round, args.rounds)
            summary, hf = measured["summary"], measured["hf"]
            solo = _solo_divergences(server.url, "gen-next-token", jobs, measured["load"]["images"])
            greedy = _greedy_divergences(server.url, gen, names, args.clients, guidance)
            paired = _logprob_divergences(server.url, gen, jobs, args.clients, guidance)
        messages += solo["errors"] + greedy["errors"] + paired["errors"]
        errors += len(messages)
        if messages:
            print(f"{len(messages)} failed request(s) on the vLLM server; first: {messages[0]}")
        result.update(
            hf_generate_images_per_s=hf["images_per_s"],
            vllm_images_per_s=summary["images_per_s"],
            ratio=summary["images_per_s"] / hf["images_per_s"],
            p50_latency_s=summary["p50_latency_s"],
            p99_latency_s=summary["p99_latency_s"],
            cfg_pair_divergences=paired["logprob_divergences"] + greedy["greedy_mismatches"],
        )
        for part in (solo, greedy, paired):
            part.pop("errors")
        result["hf"] = hf
        result["vllm"] = {
            **summary,
            **paired,
            **greedy,
            **solo,
            "errors": len(messages),
            "error_messages": messages[:5],
        }
        print(f"vLLM engine alone (no HTTP): {args.clients} concurrent requests, {args.n} images")
        speculative = getattr(args, "speculative", False)
        engine = _engine_alone(token_dir, gen, jobs, args.clients, sampling, args.rounds, one_client=speculative)
        result["vllm_engine_images_per_s"] = engine["images_per_s"]
        result["vllm_engine_ratio"] = engine["images_per_s"] / hf["images_per_s"]
        result["vllm_engine"] = engine
        print("vLLM engine stepped in one process, no gaps (the ceiling of the server's ratio), HF alternating")
        loop = step_loop(token_dir, args.n, args.clients, args.rounds, args.seed)
        result["vllm_step_loop_images_per_s"] = loop["images_per_s"]
        result["vllm_step_loop_ratio"] = loop["ratio"]
        result["vllm_step_loop"] = loop
        print("vLLM engine alone, started with per-request guidance")
        per_request = _engine_alone(token_dir, gen, jobs, args.clients, sampling, args.rounds, True)
        result["vllm_engine_per_request_guidance_images_per_s"] = per_request["images_per_s"]
        result["vllm_engine_per_request_guidance"] = per_request
        if speculative:
            draft_dir = root / "gen-draft"
            spec = _speculative(token_dir, draft_dir, gen, jobs, args.clients, sampling, args.rounds, engine)
            result["vllm_speculative"] = spec
    else:
        hf = hf_round()
        result.update(hf_generate_images_per_s=hf["images_per_s"], hf=hf)
        result.update(vllm_images_per_s=None, ratio=None, p50_latency_s=None, p99_latency_s=None)
        result["cfg_pair_divergences"] = None
        result["note"] = "vllm does not import here (pip install -e '.[serve]'); the vLLM figures are missing"

    natives = (("native_block", block_dir, "gen-next-block"), ("native_token", token_dir, "gen-next-token"))
    for key, folder, model in natives:
        print(f"native server ({model}): {args.clients} clients, {args.n} images")
        with ServerProcess(folder, "native", max_n=16, max_queue=4 * args.clients) as server:
            warm = _load(server.url, model, jobs[: args.clients], args.clients)
            load = _load(server.url, model, jobs, args.clients)
        messages = warm["errors"] + load["errors"]
        result[f"{key}_images_per_s"] = len(load["images"]) / load["wall"]
        result[key] = {**_summary(load), "errors": len(messages), "error_messages": messages[:5]}
        errors += len(messages)
    result["errors"] = errors
    return result
