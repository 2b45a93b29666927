"""Request and response bodies of the OpenAI-compatible server (pydantic), validated before any work is queued.

Field names follow OpenAI's Images and Completions APIs (``prompt``, ``n``, ``size``, ``response_format``,
``seed``, ``temperature``, ``top_p``); unitok's own settings ride beside them (``guidance_scale``, ``mode``,
``decoder``, ``top_k``, ...), which the official ``openai`` client sends with ``extra_body={...}``. Unknown fields
are refused (``extra="forbid"``) so a misspelt option is an error, not a silent default. Limits that depend on the
server's configuration (``n`` against ``max_n``, the prompt's length) are checked by the server.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Mode = Literal["next-token", "next-scale", "next-block"]
DecoderName = Literal["block", "sjd", "grouped", "relaxed", "draft", "hf"]
NEXT_TOKEN_DECODERS = ("sjd", "grouped", "relaxed", "draft", "hf")  # decoders that only run next-token models
DECODER_OPTIONS: dict[str, tuple[str, ...]] = {  # the options each decoder reads (the rest are refused)
    "block": (),
    "hf": (),
    "sjd": ("window", "init"),
    "grouped": ("window", "init", "group_size"),
    "relaxed": ("window", "init", "delta"),
    "draft": ("gamma",),
}
MAX_SEED = 2**63 - 1


class GenerationFields(BaseModel):
    """What every generation endpoint accepts: the condition, the model, and unitok's sampling settings."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    prompt: str | int | None = Field(
        None, description="a class name or a text prompt (text-conditioned models); an int is a class index"
    )
    class_label: int | None = Field(None, alias="class", description="a class index (instead of prompt)")
    model: str | None = Field(None, description="a served model id (GET /v1/models); default: chosen by mode")
    n: int = Field(1, description="samples for this prompt (1..max_n of the server)")
    mode: Mode | None = Field(None, description="prediction mode; default: the model's, or the first served")
    decoder: DecoderName = "block"
    guidance_scale: float | None = Field(None, description="classifier-free guidance (1 = off; default: model's)")
    guidance_ramp: Literal["constant", "linear"] = "constant"
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    seed: int | None = Field(None, description="same seed and settings -> same samples; default: random")
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    window: int | None = Field(None, ge=1, le=64, description="sjd/grouped/relaxed: tokens verified per forward")
    init: Literal["random", "spatial", "temporal"] | None = None
    group_size: int | None = Field(None, ge=1, le=256)
    delta: float | None = Field(None, ge=0, lt=1)
    gamma: int | None = Field(None, ge=1, le=16)
    user: str | None = Field(None, description="accepted for OpenAI compatibility; unused")

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_bool_prompt(cls, value):
        if isinstance(value, bool):
            raise ValueError("prompt must be a string (class name or text) or an int (class index), not a bool")
        return value

    @field_validator("n", "seed", "top_k", "class_label", mode="before")
    @classmethod
    def _strict_int(cls, value):
        if isinstance(value, bool) or isinstance(value, float):
            raise ValueError(f"must be an integer, got {value!r}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_range(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {value}")
        return value

    @field_validator("guidance_scale")
    @classmethod
    def _guidance(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or not 0 <= value <= 100):
            raise ValueError(f"guidance_scale must be a finite number in [0, 100] (1 = no guidance), got {value}")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or not 0 <= value <= 10):
            raise ValueError(f"temperature must be in [0, 10] (0 = greedy), got {value}")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {value}")
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.class_label is not None and self.prompt not in (None, ""):
            raise ValueError("give either prompt or class, not both")
        if self.class_label is None and self.prompt in (None, ""):
            raise ValueError("prompt (a class name or text) or class (a class index) is required")
        if self.decoder in NEXT_TOKEN_DECODERS and self.mode not in (None, "next-token"):
            raise ValueError(
                f"decoder {self.decoder!r} decodes next-token models; mode {self.mode!r} generates a block per "
                "forward already (use decoder 'block')"
            )
        allowed = DECODER_OPTIONS[self.decoder]
        given = [name for name in ("window", "init", "group_size", "delta", "gamma") if getattr(self, name) is not None]
        refused = [name for name in given if name not in allowed]
        if refused:
            raise ValueError(
                f"decoder {self.decoder!r} takes no option(s) {refused}; its options: {list(allowed) or 'none'}"
            )
        return self

    @property
    def condition(self) -> str | int:
        """The request's condition: a class index or a prompt string."""
        return self.class_label if self.class_label is not None else self.prompt

    def decoder_options(self) -> dict:
        return {name: getattr(self, name) for name in DECODER_OPTIONS[self.decoder] if getattr(self, name) is not None}


class ImageGenerationRequest(GenerationFields):
    """``POST /v1/images/generations`` (OpenAI Images API)."""

    size: str | None = Field(None, description="'WxH': the model's size or an integer multiple (nearest upscale)")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="b64_json: base64 PNG; url: a data: URL of the PNG (nothing is stored)"
    )
    output_format: Literal["png"] | None = None
    stream: bool = Field(False, description="server-sent events: partial previews, then the image (n=1)")
    partial_images: int | None = Field(None, ge=0, le=64, description="previews to stream before the image")


class VideoGenerationRequest(GenerationFields):
    """``POST /v1/videos/generations``: animated GIF or H.264 MP4 clips from a video generator."""

    size: str | None = None
    response_format: Literal["b64_gif", "b64_mp4"] = Field(
        "b64_gif", description="base64 animated GIF, or base64 H.264 MP4 (needs PyAV, in the serve extra)"
    )
    fps: int = Field(6, ge=1, le=60)


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``: the visual token ids of an image (or clip) as space-separated text."""

    model: str = Field(..., description="a served model id (GET /v1/models), or 'unitok'")
    prompt: str | int | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1, description="must cover a whole sample if given")
    stream: bool = False
    echo: bool = False
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="log-probabilities of the sampled tokens (and the top k) under the guided distribution; "
        "requests served by vLLM only",
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_kind(cls, value):
        if isinstance(value, bool):
            raise ValueError("prompt must be a string, a list of strings or a class index")
        if isinstance(value, list) and (not value or not all(isinstance(v, str) for v in value)):
            raise ValueError(
                "a list prompt must be a non-empty list of strings (token-id prompts are not supported: send the "
                "class name or text)"
            )
        return value

    @model_validator(mode="after")
    def _supported(self):
        if self.stream:
            raise ValueError("stream=true is not supported on /v1/completions (a sample is returned whole)")
        if self.echo:
            raise ValueError("echo=true is not supported")
        return self

    @property
    def conditions(self) -> list[str | int]:
        if isinstance(self.prompt, list):
            return list(self.prompt)
        return [self.condition]


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str
    seed: int | None  # reproduces this response (drawn at random when the request gave none; None: no one seed does)
    model: str


class VideoData(BaseModel):
    b64_gif: str | None = None
    b64_mp4: str | None = None
    frames: int


class VideosResponse(BaseModel):
    created: int
    data: list[VideoData]
    size: str
    fps: int
    seed: int | None
    model: str


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape; a token is a visual id as text (the words of ``text``)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] = "stop"


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    seed: int | None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "unitok"
    mode: str
    video: bool
    backend: str
    classes: list[str]
    size: str
    num_visual_tokens: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
