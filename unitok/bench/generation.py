"""``unitok bench generation``: quality and cost of the bundled generators, one entry per prediction mode.

Images: ``--n`` class-balanced samples per mode (default 2000) at the default guidance, scored against ``--num-real``
real Fashion-MNIST test images (default 5000) by FD in the bundled classifier's feature space and by the
classifier's accuracy on the requested classes. ``real_floor_fd`` is FD between ``--n`` real training images and the
same real test images: the number a perfect generator would get at this sample size. ``tokenizer_fd`` is FD of the
generator's own tokenizer reconstructions of the real test images: the best its tokens allow.

Video: ``--video-n`` clips per mode against as many real Moving Fashion-MNIST test clips; per-frame FD, motion FD
and temporal consistency (see :mod:`unitok.eval.video`).

Cost: forward passes per sample (one per block of the mode) and wall seconds per sample at batch ``--batch-size``
(CFG rows ride in the same forward). Sampling uses each generator's recommended settings (``config.json``
"generation": guidance, temperature, top-k, top-p); ``--guidance-scale`` overrides the guidance.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from unitok.decoding.sampling import SamplingConfig
from unitok.eval.fd import FeatureStats, frechet_distance
from unitok.eval.generation import image_scores, sample_balanced
from unitok.model.pretrained import load_generator

CHECKPOINT_ROOT = Path(__file__).resolve().parents[2] / "checkpoints"
IMAGE_MODES = ("next-token", "next-scale", "next-block")
VIDEO_MODES = ("next-block", "next-token")


def _real_test_clips(gen, n: int) -> np.ndarray:
    from unitok.data import MovingFashionMNIST

    spec = gen.spec
    clips = MovingFashionMNIST("test", num_frames=spec.num_frames, image_size=spec.image_size[0], num_objects=1)
    return clips.as_array(0, min(n, len(clips)))


def _settings(gen, args) -> tuple[float, SamplingConfig, dict]:
    """The generator's recommended sampling settings, with ``--guidance-scale`` overriding its guidance."""
    d = gen.sampling_defaults()
    if args.guidance_scale is not None:
        d["guidance_scale"] = args.guidance_scale
    return d["guidance_scale"], SamplingConfig(d["temperature"], d["top_k"], d["top_p"]), d


def _images(gen, args, real_stats: FeatureStats, real_test: np.ndarray, path: Path) -> dict:
    guidance, sampling, settings = _settings(gen, args)
    pixels, labels, timing = sample_balanced(gen, args.n, guidance, args.batch_size, args.seed, sampling)
    scores = image_scores(pixels, labels, real_stats)
    x = torch.from_numpy(np.array(real_test)).float()[:, None] / 127.5 - 1  # a writable copy
    recon = torch.cat([gen.codec.decode(gen.codec.encode(x[i : i + 500])) for i in range(0, len(x), 500)])
    tokenizer_fd = frechet_distance(FeatureStats.from_images((recon + 1) / 2), real_stats)
    return {
        "checkpoint": str(path),
        **settings,
        **scores,
        "tokenizer_fd": tokenizer_fd,
        **timing,
    }


def _video(gen, args, path: Path) -> dict:
    from unitok.eval.video import video_metrics

    guidance, sampling, settings = _settings(gen, args)
    pixels, labels, timing = sample_balanced(gen, args.video_n, guidance, args.batch_size, args.seed, sampling)
    real = _real_test_clips(gen, args.video_n)
    scores = video_metrics(pixels[:, :, 0], torch.from_numpy(real))
    return {
        "checkpoint": str(path),
        **settings,
        "fd": scores["fd_frames"],
        **scores,
        "forward_passes_per_clip": timing["forward_passes_per_image"],
        "seconds_per_clip": timing["seconds_per_image"],
        "batch_size": timing["batch_size"],
    }


def run(args: argparse.Namespace) -> dict:
    from unitok.data import load_fashion_mnist

    if args.n < 2 or args.num_real < 2:
        raise ValueError("--n and --num-real must be >= 2 (FD needs >= 2000 samples to be comparable)")
    root = Path(args.checkpoints) if args.checkpoints else CHECKPOINT_ROOT
    torch.manual_seed(args.seed)
    test, train = load_fashion_mnist("test"), load_fashion_mnist("train")
    real_test = np.asarray(test.images[: args.num_real])
    real_stats = FeatureStats.from_images(real_test)
    rng = np.random.default_rng(args.seed)
    floor_idx = rng.choice(len(train.images), size=min(args.n, len(train.images)), replace=False)
    result: dict = {
        "real_floor_fd": frechet_distance(FeatureStats.from_images(np.asarray(train.images)[floor_idx]), real_stats),
        "num_samples": args.n,
        "num_real": len(real_test),
        "modes": {},
        "video": {},
    }
    for mode in IMAGE_MODES:
        path = root / f"gen-{mode}"
        if (path / "config.json").is_file():
            print(f"benchmarking {path}")
            result["modes"][mode] = _images(load_generator(path), args, real_stats, real_test, path)
    for mode in VIDEO_MODES:
        path = root / f"gen-video-{mode}"
        if (path / "config.json").is_file():
            print(f"benchmarking {path}")
            result["video"][mode] = _video(load_generator(path), args, path)
    if not result["modes"] and not result["video"]:
        raise FileNotFoundError(f"no gen-<mode> generators under {root}")
    base = result["modes"].get("next-token")
    for entry in result["modes"].values():
        if base:
            entry["forward_pass_reduction"] = base["forward_passes_per_image"] / entry["forward_passes_per_image"]
    vbase = result["video"].get("next-token")
    for entry in result["video"].values():
        if vbase:
            entry["forward_pass_reduction"] = vbase["forward_passes_per_clip"] / entry["forward_passes_per_clip"]
    return result
