"""A small image API over vLLM's ``AsyncLLM`` for unitok next-token generators (what the server calls).

:class:`VllmImageEngine` starts vLLM on a generator folder with settings that suit a CPU (fp32, a small KV cache,
a per-user compile cache (:func:`compile_cache_dir`), a loopback host address), turns a condition prefix into the
prompt ``prefix + [BOI]`` and returns visual token indices (``0 .. codebook - 1``, what ``codec.decode`` takes).
Classifier-free guidance runs inside the model (see :mod:`unitok.serving.vllm_model`), so a request is one vLLM
sequence whatever its guidance, and ``n`` images are ``n`` sequences vLLM schedules like any others.

On vLLM's CPU platform the engine core runs the model itself (``distributed_executor_backend="uni"``) with the
caller's torch thread count, unless ``engine_args`` say otherwise. vLLM's CPU defaults put the model in a third
process with one thread bound to one core, busy-polling the engine core through shared memory; on the 2-core
machine that decoded 27 images/s of the bundled model (16 concurrent requests, eager) where the engine core running
the model decodes 35 with one thread, ~58 compiled with two (``unitok bench serving``: vllm_engine_images_per_s).

The guidance scale is the engine's (``guidance_scale`` at :meth:`VllmImageEngine.start`, default the checkpoint's
``generation.guidance_scale``); a request asking for another scale gets a ``ValueError``, unless the engine was
started with ``per_request_guidance=True``: then every request may bring its own scale
(:mod:`unitok.serving.vllm_guidance`; the head computes both streams' logits, 2-17% slower on the bundled
model across our runs).
Seeds follow vLLM's parallel sampling: image ``i`` of a request with ``seed`` is image 0 of a request with
``seed + i``.

vLLM runs its engine core in a child process, so a script that starts an engine needs an
``if __name__ == "__main__":`` guard. Use one event loop for the engine's whole life (FastAPI's, or one loop that
runs every call): vLLM's output handler is bound to the loop of the first request.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from unitok.decoding.cfg import check_guidance_scale
from unitok.decoding.sampling import SamplingConfig
from unitok.serving.vllm_spec import ImageSpec

logger = logging.getLogger(__name__)

# vLLM reads these when it starts; setdefault keeps what the caller exported.
CPU_ENVIRONMENT = {
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; a 56-token image of the bundled model needs ~0.7 MB of KV (both streams)
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
}


DRAFT_SAMPLE_METHODS = ("greedy", "probabilistic")


class EngineDeadError(RuntimeError):
    """vLLM's engine core stopped (it crashed or was killed): the engine serves nothing more."""


@dataclass
class VllmSamples:
    """``tokens`` (n, num_visual) visual indices; with ``logprobs`` requested, per image and step the
    log-probabilities (of the guided, visual-only distribution) vLLM returned, keyed by visual index."""

    tokens: torch.LongTensor
    logprobs: list[list[dict[int, float]]] | None = None


@dataclass(frozen=True)
class SpeculativeDraft:
    """A unitok draft model for vLLM's ``draft_model`` speculative decoding: ``num_speculative_tokens`` drafts per
    step, proposed by ``sample_method`` (vLLM's ``draft_sample_method``). ``"greedy"`` (the default, vLLM's too)
    drafts the draft model's argmax and verifies it as a point mass; ``"probabilistic"`` samples the draft and
    verifies with its probabilities (``min(1, p/q)``). Both leave the target's distribution exact. Greedy drafts keep
    seeds reproducible (a seed gives the same image again); probabilistic ones do not (vLLM samples drafts without
    the request's generator) but are accepted more often: sampling the bundled gen-next-token with gen-draft, 4.8
    images/s for one client against 3.3 (``unitok bench serving --speculative``).

    On CPU speculation through vLLM loses (same bench, engine alone, 2 cores, 4 drafts): 16 concurrent clients
    16.3-17.7 images/s against 56.4 without a draft, one client 3.3-4.8 against 7.5 (each draft token is a full
    vLLM model step, mostly fixed overhead at these sizes). It is for GPUs, where a step's cost barely depends on
    the tokens it verifies."""

    path: str
    num_speculative_tokens: int = 4
    sample_method: str = "greedy"

    def __post_init__(self):
        if not Path(self.path, "config.json").is_file():
            raise ValueError(f"no draft model at {self.path}")
        if isinstance(self.num_speculative_tokens, bool) or not 1 <= int(self.num_speculative_tokens) <= 16:
            raise ValueError(f"num_speculative_tokens must be in 1..16, got {self.num_speculative_tokens!r}")
        if self.sample_method not in DRAFT_SAMPLE_METHODS:
            raise ValueError(f"sample_method must be one of {DRAFT_SAMPLE_METHODS}, got {self.sample_method!r}")

    def speculative_config(self) -> dict:
        """vLLM's ``speculative_config`` for this draft."""
        return {
            "method": "draft_model",
            "model": self.path,
            "num_speculative_tokens": int(self.num_speculative_tokens),
            "draft_sample_method": self.sample_method,
        }


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated for the block (vLLM reads these while it builds and spawns its engine)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _start_async_llm(args, threads: int):
    """vLLM's ``AsyncLLM`` from ``args``; on CPU with the model in the engine core process and ``threads`` torch
    threads there (module docstring)."""
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor import Executor

    env = {}
    if current_platform.is_cpu():
        # vLLM's engine core drops torch to 1 thread unless OMP_NUM_THREADS is set
        env["OMP_NUM_THREADS"] = str(threads)
        if args.distributed_executor_backend is None:
            args.distributed_executor_backend = "uni"
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # else vLLM's CPU platform turns "uni" back into "mp"
    with _environment(env):
        config = args.create_engine_config()
    with _environment({"OMP_NUM_THREADS": env["OMP_NUM_THREADS"]} if env else {}):
        return AsyncLLM(
            vllm_config=config,
            executor_class=Executor.get_class(config),
            log_requests=args.enable_log_requests,
            log_stats=not args.disable_log_stats,
        )


def compile_cache_dir() -> Path:
    """Where vLLM keeps its torch.compile artifacts (``VLLM_CACHE_ROOT``, unless exported): ``unitok/vllm`` under
    the user's cache folder (``$XDG_CACHE_HOME``, else ``~/.cache``), shared by every engine of this user. vLLM keys
    its entries by config, versions and the traced source files (checked again at load), and a warm cache starts a
    compiled engine of the bundled model in ~28 s instead of ~52 s. Where that folder cannot be made, a temporary
    folder removed when the interpreter exits (a fresh one per process had left ~0.5 MB behind at every start)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitok" / "vllm"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    temporary = tempfile.mkdtemp(prefix="unitok-vllm-")
    atexit.register(shutil.rmtree, temporary, ignore_errors=True)
    return Path(temporary)


def engine_core_pids(llm) -> list[int]:
    """The process ids of ``llm``'s (an ``AsyncLLM``'s) engine core processes; empty where vLLM runs them elsewhere
    (e.g. Ray) or the attributes moved."""
    resources = getattr(getattr(llm, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return [proc.pid for proc in getattr(manager, "processes", []) if proc.pid is not None]


def lower_priority(pid: int, nice: int) -> None:
    """Raise process ``pid``'s niceness by ``nice`` (capped at 19), every thread of it on Linux (where niceness is
    per thread and the engine core's torch threads already exist)."""
    tasks = Path(f"/proc/{pid}/task")
    threads = [int(t.name) for t in tasks.iterdir()] if tasks.is_dir() else [pid]
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close the event loop an engine ran on, after :meth:`VllmImageEngine.shutdown`. The shutdown cancels vLLM's
    output handler, which holds a ZMQ socket: the cancellation has to run, or the ZMQ context blocks the
    interpreter's exit."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def engine_arguments(
    path: str,
    spec: ImageSpec,
    max_num_seqs: int = 64,
    enforce_eager: bool = True,
    enable_prefix_caching: bool = True,
    seed: int = 0,
) -> dict:
    """vLLM engine arguments (``AsyncEngineArgs`` / ``LLM`` keywords) serving the generator at ``path`` as ``spec``
    describes it (its guidance scale; per-request guidance when ``spec`` says so), fp32, no tokenizer. Also sets
    vLLM's CPU environment (:data:`CPU_ENVIRONMENT`, where not exported) and its compile cache folder."""
    for key, value in CPU_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if "VLLM_CACHE_ROOT" not in os.environ:
        os.environ["VLLM_CACHE_ROOT"] = str(compile_cache_dir())
    generation: dict = {"guidance_scale": spec.guidance_scale}
    if spec.per_request_guidance:
        generation["per_request_guidance"] = True
    return {
        "model": path,
        "dtype": "float32",
        "max_model_len": spec.max_model_len,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": enforce_eager,
        "enable_prefix_caching": enable_prefix_caching,
        "skip_tokenizer_init": True,  # prompts are token ids and outputs visual ids: nothing to (de)tokenize
        "seed": seed,
        "hf_overrides": {"generation": generation},
        "disable_log_stats": True,
    }


def image_sampling_params(
    spec: ImageSpec,
    sampling: SamplingConfig,
    n: int = 1,
    seed: int | None = None,
    logprobs: int | None = None,
    stream: bool = False,
    guidance_scale: float | None = None,
):
    """vLLM ``SamplingParams`` for ``n`` images of ``spec``: exactly ``num_visual`` tokens each, no detokenizing;
    the final output only, or every step's tokens so far with ``stream``; ``guidance_scale`` for an engine with
    per-request guidance (None: the engine's scale)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=n,
        seed=seed,
        temperature=float(sampling.temperature),
        top_k=int(sampling.top_k),
        top_p=float(sampling.top_p),
        max_tokens=spec.num_visual,
        min_tokens=spec.num_visual,
        ignore_eos=True,
        detokenize=False,
        logprobs=logprobs,
        output_kind=RequestOutputKind.CUMULATIVE if stream else RequestOutputKind.FINAL_ONLY,
        extra_args={"guidance_scale": float(guidance_scale)} if guidance_scale is not None else None,
    )


class VllmImageEngine:
    """An ``AsyncLLM`` serving one unitok next-token generator; see the module docstring."""

    def __init__(self, llm, spec: ImageSpec, path: str, draft: SpeculativeDraft | None = None, cpu: bool = True):
        self.llm = llm
        self.spec = spec
        self.path = path
        self.draft = draft  # when vLLM speculates with a draft model
        self.cpu = cpu  # vLLM's CPU platform

    @property
    def alive(self) -> bool:
        """False once the engine is shut down or its engine core died."""
        return self.llm is not None and not self.llm.errored

    @property
    def per_request_guidance(self) -> bool:
        return self.spec.per_request_guidance

    def accepts(self, guidance_scale: float | None) -> bool:
        """Whether this engine can guide with ``guidance_scale`` (None: the engine's own)."""
        if guidance_scale is None or self.per_request_guidance:
            return True
        return check_guidance_scale(guidance_scale) == self.guidance_scale

    @classmethod
    def start(
        cls,
        path: str | Path,
        *,
        guidance_scale: float | None = None,
        draft: SpeculativeDraft | str | Path | None = None,
        max_num_seqs: int = 64,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        threads: int | None = None,
        per_request_guidance: bool = False,
        nice: int = 0,
        **engine_args,
    ) -> VllmImageEngine:
        """Start vLLM on ``path``.

        ``enforce_eager=True`` starts in ~20 s; ``False`` (torch.compile) in ~50 s and decodes ~40% faster on the
        bundled model (16 concurrent images, 2 CPU cores): use it for long-running servers. ``draft``: a unitok
        draft model (a folder, or a :class:`SpeculativeDraft`); sampled speculation on vllm-cpu 0.32 relies on
        :mod:`unitok.serving.vllm_fixes` (installed by the model file).
        ``threads``: torch threads of vLLM's engine core on CPU (default: this process's count).
        ``per_request_guidance``: every request may bring its own guidance scale (``guidance_scale`` is then the
        scale of requests that name none); not with ``draft``. ``engine_args`` go to vLLM's ``AsyncEngineArgs``
        (over :func:`engine_arguments`' values).

        ``nice`` (0..19): raise the engine core process's niceness by this much once it runs, so that work in this
        process (a server's HTTP handling, pixel decoding, PNG encoding) preempts the engine's steps instead of
        queueing behind them. Under a steady load that only reorders the same work, and the request path is the
        part whose delay leaves engine slots empty: ``unitok serve`` uses 5, which took its throughput from 46 to 50
        images/s on 2 cores with 16 concurrent clients (measured, same server, alternating settings)."""
        threads = torch.get_num_threads() if threads is None else threads
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an int in 0..19, got {nice!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int, got {threads!r}")
        path = str(path)
        spec = ImageSpec.from_pretrained(path, guidance_scale)
        if isinstance(draft, (str, Path)):
            draft = SpeculativeDraft(str(draft))
        if not isinstance(per_request_guidance, bool):
            raise ValueError(f"per_request_guidance must be a bool, got {per_request_guidance!r}")
        if per_request_guidance and draft is not None:
            raise ValueError(
                "per_request_guidance does not combine with a draft model: vLLM's draft proposer samples from the "
                "draft's own logits, which would then be unguided; start one engine for each"
            )
        if per_request_guidance:
            from unitok.serving.vllm_guidance import GuidanceLogitsProcessor

            spec = replace(spec, per_request_guidance=True)
            engine_args.setdefault("logits_processors", [GuidanceLogitsProcessor])
            engine_args.setdefault("logprobs_mode", "processed_logprobs")  # raw ones would be over 2V columns
        if draft is not None:
            engine_args["speculative_config"] = draft.speculative_config()
        from vllm.engine.arg_utils import AsyncEngineArgs

        ours = engine_arguments(path, spec, max_num_seqs, enforce_eager, enable_prefix_caching, seed)
        args = AsyncEngineArgs(**{**ours, **engine_args})
        from vllm.platforms import current_platform

        cpu = current_platform.is_cpu()
        llm = _start_async_llm(args, threads)
        if nice:
            pids = engine_core_pids(llm)
            if not pids:
                logger.warning("nice=%d not applied: this vLLM does not expose its engine core processes", nice)
            for pid in pids:
                lower_priority(pid, nice)
        engine = cls(llm, spec, path, draft=draft, cpu=cpu)
        # vLLM keeps an optional dependency's ImportError (torchcodec) with its traceback, which keeps alive the frames
        # of the first call that imported vLLM, this one included, locals and all: without this the AsyncLLM outlived
        # shutdown() and vLLM's finaliser failed at interpreter exit ("'NoneType' object is not callable").
        del llm
        return engine

    @property
    def guidance_scale(self) -> float:
        return self.spec.guidance_scale

    async def sample(
        self,
        prefix_ids: list[int],
        n: int = 1,
        seed: int | None = None,
        sampling: SamplingConfig | None = None,
        logprobs: int | None = None,
        guidance_scale: float | None = None,
        on_tokens: Callable[[int, torch.Tensor], None] | None = None,
    ) -> VllmSamples:
        """``n`` images for one prefix (BOS + condition slot); ``logprobs`` k also returns the top-k log-probs of
        every step (and the sampled token's). ``guidance_scale`` None is the engine's; another scale needs an
        engine started with ``per_request_guidance=True``. ``on_tokens(i, tokens)`` (n=1 only: streaming) is called
        on this event loop with the (1, i + 1) visual tokens so far, for every ``i`` in order."""
        from vllm.exceptions import VLLMValidationError

        sampling = sampling or SamplingConfig()
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise ValueError(f"logprobs must be None or an int >= 0, got {logprobs!r}")
        if on_tokens is not None and n != 1:
            raise ValueError(f"on_tokens (streaming) follows one image, got n={n}")
        if not self.accepts(guidance_scale):
            raise ValueError(
                f"this vLLM engine guides with scale {self.guidance_scale}; start one with "
                f"guidance_scale={guidance_scale} or per_request_guidance=True (VllmImageEngine.start) to serve it"
            )
        if self.llm is None:
            raise RuntimeError("this engine was shut down")
        if self.llm.errored:
            raise EngineDeadError(f"vLLM's engine core for {self.path} has stopped; start a new engine")
        spec = self.spec
        prompt = spec.prompt(prefix_ids)
        # vLLM refuses n > 1 when greedy; greedy samples of one prompt are one image, sampled once and repeated
        copies, n = (n, 1) if sampling.greedy else (1, n)
        try:
            params = image_sampling_params(
                spec,
                sampling,
                n,
                seed,
                logprobs,
                stream=on_tokens is not None,  # every step's tokens so far; else one output holding all n images
                guidance_scale=guidance_scale if self.per_request_guidance else None,
            )
            final, reported = None, 0
            async for output in self.llm.generate({"prompt_token_ids": prompt}, params, request_id=uuid.uuid4().hex):
                final = output
                if on_tokens is not None:
                    so_far = torch.tensor([list(output.outputs[0].token_ids)], dtype=torch.long) - spec.visual_offset
                    for i in range(reported, so_far.shape[1]):  # outputs may merge steps: report each one
                        on_tokens(i, so_far[:, : i + 1])
                    reported = so_far.shape[1]
        except VLLMValidationError as err:
            raise ValueError(f"vLLM refused the request: {err}") from None
        except Exception as err:
            if self.llm is not None and self.llm.errored:
                raise EngineDeadError(f"vLLM's engine core for {self.path} stopped: {err}") from err
            raise
        completions = sorted(final.outputs, key=lambda c: c.index)
        rows = [list(c.token_ids) for c in completions]
        if len(rows) != n or any(len(r) != spec.num_visual for r in rows):
            raise RuntimeError(f"vLLM returned {[len(r) for r in rows]} tokens for {n} image(s) of {spec.num_visual}")
        tokens = torch.tensor(rows, dtype=torch.long) - spec.visual_offset
        outside = (tokens < 0) | (tokens >= spec.num_visual_tokens)
        if outside.any():
            # compute_logits gives every non-visual id -inf, and vllm-cpu 0.32's sampler (fused_gumbel_argmax)
            # returns one only for a row with no finite logit (id 0); a NaN row gives the first visual id instead.
            # Seen once, not reproduced since: name the sample, step and id so the next occurrence says which.
            where = [(int(i), int(j), int(tokens[i, j]) + spec.visual_offset) for i, j in outside.nonzero()[:8]]
            raise RuntimeError(
                f"vLLM returned tokens outside the visual vocabulary ({spec.visual_offset}.."
                f"{spec.visual_offset + spec.num_visual_tokens - 1}) for n={n}, seed={seed}: "
                f"{int(outside.sum())} of {tokens.numel()}, first (sample, step, id): {where}"
            )
        steps = None
        if logprobs is not None:
            steps = [
                [{token - spec.visual_offset: lp.logprob for token, lp in step.items()} for step in c.logprobs]
                for c in completions
            ] * copies
        return VllmSamples(tokens.repeat(copies, 1), steps)

    async def generate(
        self,
        prefix_ids: list[int],
        n: int = 1,
        guidance_scale: float | None = None,
        seed: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
    ) -> torch.LongTensor:
        """(n, num_visual) visual indices for one prefix. ``guidance_scale`` None means the engine's scale; any other
        value must equal it, unless the engine guides per request."""
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
        return (await self.sample(prefix_ids, n, seed, sampling, guidance_scale=guidance_scale)).tokens

    def shutdown(self) -> None:
        """Stop vLLM's engine core (idempotent). The AsyncLLM is dropped here, while the interpreter is whole:
        left to interpreter exit, its finaliser shuts down a second time and fails on half-torn-down modules."""
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()
