"""Score a generator: class-balanced samples -> FD and class accuracy (images), per-frame FD and motion (video)."""

from __future__ import annotations

import time

import numpy as np
import torch

from unitok.eval.classifier import predict_logits
from unitok.eval.fd import FeatureStats, frechet_distance


def balanced_labels(num_samples: int, num_classes: int) -> list[int]:
    return [i % num_classes for i in range(num_samples)]


@torch.no_grad()
def sample_balanced(
    gen, num_samples: int, guidance_scale: float, batch_size: int = 100, seed: int = 0, sampling=None
) -> tuple[torch.Tensor, list[int], dict]:
    """(pixels in [0, 1], labels, timing) for ``num_samples`` class-balanced samples of generator ``gen``."""
    labels = balanced_labels(num_samples, len(gen.vocab.class_names))
    rng = torch.Generator().manual_seed(seed)
    pixels, passes, start = [], 0, time.perf_counter()
    for i in range(0, num_samples, batch_size):
        chunk = labels[i : i + batch_size]
        result = gen.generate_tokens(chunk, guidance_scale, sampling=sampling, generator=rng)
        passes = result.forward_passes
        pixels.append((gen.codec.decode(result.tokens) + 1) / 2)
    seconds = time.perf_counter() - start
    timing = {"forward_passes_per_image": passes, "seconds_per_image": seconds / num_samples, "batch_size": batch_size}
    return torch.cat(pixels), labels, timing


def image_scores(images: torch.Tensor, labels: list[int], real: FeatureStats | None, resize: bool = False) -> dict:
    """FD against ``real`` statistics and class accuracy of (N, 1, H, W) images in [0, 1]."""
    from unitok.eval.classifier import extract_features

    feats = extract_features(images, resize=resize)
    logits = predict_logits(images, resize=resize)
    acc = float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())
    out = {"class_acc": acc, "num_samples": int(images.shape[0])}
    if real is not None:
        out["fd"] = frechet_distance(FeatureStats.from_features(feats), real)
    return out


def real_image_stats(images: np.ndarray, limit: int = 5000) -> FeatureStats:
    return FeatureStats.from_images(images[:limit], resize=images.shape[-1] != 28)
