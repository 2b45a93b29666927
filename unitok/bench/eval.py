"""``unitok bench eval``: checks the FD metric itself on real Fashion-MNIST.

The bundled classifier's test accuracy, then FD between n train and n test images (the real-vs-real floor) and
between the same n train images and n test images corrupted three ways: Gaussian noise (sigma 0.1), Gaussian
blur (sigma 1.0) and pixel shuffling. A usable metric puts every corruption far above the floor.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from unitok.data import load_fashion_mnist
from unitok.eval.classifier import class_accuracy, classifier_metadata, prepare_images
from unitok.eval.fd import FeatureStats, frechet_distance


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W) images with reflect padding."""
    radius = max(1, int(round(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(coords**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))


def corruptions(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    noise = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    perm = torch.randperm(x[0].numel(), generator=gen)
    shuffled = x.flatten(1)[:, perm].view_as(x)
    return {"fd_noise": noise, "fd_blur": gaussian_blur(x, 1.0), "fd_shuffled": shuffled}


def run(args: argparse.Namespace) -> dict:
    if args.n < 2000:
        raise ValueError(f"--n must be >= 2000 (FD is biased upward with fewer samples), got {args.n}")
    start = time.perf_counter()
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.n > len(test):
        raise ValueError(f"--n must be <= {len(test)} (the test split size), got {args.n}")
    rng = np.random.default_rng(args.seed)
    train_idx = rng.choice(len(train), args.n, replace=False)
    test_idx = rng.choice(len(test), args.n, replace=False)
    x_train, x_test = prepare_images(train.images[train_idx]), prepare_images(test.images[test_idx])

    result: dict = {"n": args.n, "classifier_test_acc": class_accuracy(test.images, test.labels)}
    ref = FeatureStats.from_images(x_train)
    result["fd_train_vs_test"] = frechet_distance(ref, FeatureStats.from_images(x_test))
    for name, corrupted in corruptions(x_test, args.seed).items():
        result[name] = frechet_distance(ref, FeatureStats.from_images(corrupted))
    floor = result["fd_train_vs_test"]
    result["ratio_noise"] = result["fd_noise"] / floor
    result["ratio_blur"] = result["fd_blur"] / floor
    result["passes"] = bool(
        result["classifier_test_acc"] >= 0.88 and result["ratio_noise"] >= 10 and result["ratio_blur"] >= 10
    )
    result["classifier"] = classifier_metadata()
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result
