"""``UnitokPipeline``: tokenizer + transformer + decoder in one call, like a diffusers pipeline.

    pipe = UnitokPipeline.from_pretrained("checkpoints")            # every bundled generator, picked by mode
    out = pipe("sneaker", num_images=4, mode="next-scale", guidance_scale=2.0, seed=0)
    out.images[0].save("sneaker.png")
    clip = pipe("sneaker", video=True, mode="next-block").videos[0]  # list of PIL frames

``from_pretrained`` takes one generator folder (see :mod:`unitok.model.pretrained`) or a folder of them named
``gen-<mode>`` (images) and ``gen-video-<mode>`` (video), loaded lazily on first use. The pipeline owns the loop
over batches, the seeds and the guidance; the decoder (one block per forward, :mod:`unitok.decoding.block`) owns
the algorithm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from unitok.decoding.cfg import Guidance, check_guidance_scale
from unitok.decoding.sampling import SamplingConfig
from unitok.model.modes import MODES
from unitok.model.pretrained import Generator, load_generator

MAX_IMAGES = 1024


@dataclass
class PipelineOutput:
    images: list[Image.Image] = field(default_factory=list)  # one per sample (images), empty for video
    videos: list[list[Image.Image]] = field(default_factory=list)  # frames per clip (video), empty for images
    tokens: torch.Tensor | None = None  # (num_images, N) visual token ids
    forward_passes: float = 0  # forward passes per sample (a batch's passes serve all its samples)
    seconds: float = 0.0
    mode: str = ""


def _to_pil(frames: torch.Tensor) -> list[Image.Image]:
    """(N, 1, H, W) in [-1, 1] -> grayscale PIL images."""
    arr = ((frames[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a, mode="L") for a in arr]


class UnitokPipeline:
    def __init__(self, generators: dict[tuple[str, bool], Generator | Path], device: str = "cpu"):
        if not generators:
            raise ValueError("a pipeline needs at least one generator")
        self._generators = generators
        self.device = device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> UnitokPipeline:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no generator or checkpoints folder at {path}")
        if (path / "config.json").is_file():
            gen = load_generator(path, device)
            return cls({(gen.spec.mode, gen.spec.is_video): gen}, device)
        found: dict[tuple[str, bool], Generator | Path] = {}
        for mode in MODES:
            for video, name in ((False, f"gen-{mode}"), (True, f"gen-video-{mode}")):
                if (path / name / "config.json").is_file():
                    found[(mode, video)] = path / name
        if not found:
            raise FileNotFoundError(f"{path} holds no generator (config.json) and no gen-<mode> folders")
        return cls(found, device)

    @property
    def available(self) -> list[tuple[str, bool]]:
        """(mode, is_video) of every generator this pipeline can run."""
        return sorted(self._generators)

    def generator(self, mode: str | None = None, video: bool = False) -> Generator:
        choices = [k for k in self._generators if k[1] == video and (mode is None or k[0] == mode)]
        if not choices:
            kind = "video" if video else "image"
            have = ", ".join(f"{m} ({'video' if v else 'image'})" for m, v in self.available)
            raise ValueError(f"no {kind} generator for mode {mode!r} here; available: {have}")
        key = sorted(choices, key=lambda k: list(MODES).index(k[0]))[0]
        gen = self._generators[key]
        if not isinstance(gen, Generator):
            gen = self._generators[key] = load_generator(gen, self.device)
        return gen

    def _draft_model(self, gen: Generator, draft):
        """The draft decoder's small model: a generator folder (path) or a loaded model; checked against ``gen``."""
        if draft is None:
            raise ValueError(
                "decoder='draft' needs draft_model=PATH of a small generator trained on the same tokenizer"
            )
        if isinstance(draft, str | Path):
            key = str(Path(draft).resolve())
            cache = self.__dict__.setdefault("_drafts", {})
            if key not in cache:
                cache[key] = load_generator(draft, self.device)
            drafter = cache[key]
            if drafter.spec.to_dict() != gen.spec.to_dict() or not _same_vocabulary(drafter, gen):
                raise ValueError(
                    f"the draft generator {draft} was not trained on this model's tokenizer, layout and classes"
                )
            return drafter.model
        return draft

    def class_names(self, mode: str | None = None, video: bool = False) -> list[str]:
        return list(self.generator(mode, video).vocab.class_names)

    def __call__(
        self,
        prompt: str | int | list[str | int] | None,
        num_images: int = 1,
        mode: str | None = None,
        guidance_scale: float | None = None,
        seed: int | None = 0,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        video: bool = False,
        batch_size: int = 64,
        decoder: str = "block",
        guidance_ramp: str = "constant",
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        **decoder_options,
    ) -> PipelineOutput:
        """``prompt``: a class name, class index or prompt (one for all samples, or a list of ``num_images``);
        None samples unconditionally. ``guidance_scale``, ``temperature``, ``top_k``, ``top_p`` default to the
        generator's recommended settings (``config.json`` "generation"). Returns PIL images (or clips of frames
        with ``video=True``). ``decoder`` names a decoding algorithm (:mod:`unitok.decoding`; e.g. "sjd" with
        ``window=16``). ``guidance_ramp`` ("constant" or "linear") and ``guidance_interval`` ((lo, hi) fractions of
        the sample's tokens) schedule the guidance (:class:`unitok.decoding.cfg.Guidance`)."""
        from unitok.decoding import get_decoder

        get_decoder(decoder)  # unknown names fail before any work
        if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
            raise ValueError(f"num_images must be an int in 1..{MAX_IMAGES}, got {num_images!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if mode is not None and mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
        gen = self.generator(mode, video)
        defaults = gen.sampling_defaults()  # the generator's recommended settings fill what the caller left out
        guidance = Guidance(
            check_guidance_scale(defaults["guidance_scale"] if guidance_scale is None else guidance_scale),
            ramp=guidance_ramp,
            interval=guidance_interval,
        )
        sampling = SamplingConfig(
            temperature=defaults["temperature"] if temperature is None else temperature,
            top_k=defaults["top_k"] if top_k is None else top_k,
            top_p=defaults["top_p"] if top_p is None else top_p,
        )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        conditions = list(prompt) if isinstance(prompt, list | tuple) else [prompt] * num_images
        if len(conditions) != num_images:
            raise ValueError(f"got {len(conditions)} prompts for num_images={num_images}; pass one or num_images")
        gen.vocab.prefix_ids(conditions)  # validates every condition before any compute
        if decoder == "draft":
            decoder_options["draft_model"] = self._draft_model(gen, decoder_options.get("draft_model"))
        rng = torch.Generator().manual_seed(seed) if seed is not None else None
        start = time.perf_counter()
        tokens, passes = [], 0.0
        for i in range(0, num_images, batch_size):
            result = gen.generate_tokens(
                conditions[i : i + batch_size], guidance, sampling, rng, decoder, **decoder_options
            )
            tokens.append(result.tokens)
            passes += result.forward_passes * len(result.tokens) / num_images  # per image, batch-weighted
        tokens_all = torch.cat(tokens)
        pixels = gen.codec.decode(tokens_all)
        out = PipelineOutput(
            tokens=tokens_all, forward_passes=passes, seconds=time.perf_counter() - start, mode=gen.spec.mode
        )
        if gen.spec.is_video:
            out.videos = [_to_pil(clip) for clip in pixels]
        else:
            out.images = _to_pil(pixels)
        return out


def _same_vocabulary(a: Generator, b: Generator) -> bool:
    return a.vocab.tokenizer.get_vocab() == b.vocab.tokenizer.get_vocab() and a.vocab.cond_len == b.vocab.cond_len


def image_grid(images: list[Image.Image], ncol: int, scale: int = 2) -> Image.Image:
    """Tile equally sized grayscale images ``ncol`` per row, upscaled ``scale`` x (nearest)."""
    arrays = [np.asarray(im) for im in images]
    h, w = arrays[0].shape
    rows = -(-len(arrays) // ncol)
    canvas = np.zeros((rows * h, ncol * w), dtype=np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, ncol)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = a
    img = Image.fromarray(canvas, mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def save_gif(frames: list[Image.Image], path: str | Path, fps: int = 6, scale: int = 2) -> Path:
    path = Path(path)
    big = [f.resize((f.width * scale, f.height * scale), Image.Resampling.NEAREST) for f in frames]
    big[0].save(path, save_all=True, append_images=big[1:], duration=int(1000 / fps), loop=0)
    return path
