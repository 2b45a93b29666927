"""The evaluation classifier: a small CNN trained on Fashion-MNIST whose 128-d features define our FD.

FID's Inception weights cannot be downloaded here, so unitok ships its own feature network, trained with a
fixed seed and recipe by ``scripts/train_eval_classifier.py``; the weights live in ``unitok/assets`` so every
machine computes the same numbers. Distances in this space are called FD, not FID, and are comparable only
with each other.

The features are standardised per dimension with the mean and spread they have on the Fashion-MNIST train split
(stored with the weights), so FD is measured in units of each feature's natural variation and does not depend on
the arbitrary scale a training run happens to give a layer. On n = 5000 per side this puts the real train-vs-test
floor near 0.6 and Gaussian noise (sigma 0.1) near 33.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "eval_classifier.safetensors"
INPUT_SIZE = (28, 28)
FEATURE_DIM = 128
NUM_CLASSES = 10
# Fashion-MNIST train-set pixel statistics; folded into the model so callers pass plain [0, 1] images.
PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class EvalClassifier(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-conv128-GAP -> fc128 (features) -> fc10 (logits)."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(1, 32),
            _conv_block(32, 32),
            nn.MaxPool2d(2),  # (B, 32, 14, 14)
            _conv_block(32, 64),
            _conv_block(64, 64),
            nn.MaxPool2d(2),  # (B, 64, 7, 7)
            _conv_block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 128)
        )
        self.feature = nn.Sequential(nn.Linear(128, feature_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(feature_dim, num_classes)
        # Per-dimension statistics of the raw features on the train split (set after training).
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) images in [0, 1] -> (B, 128) penultimate activations."""
        return self.feature(self.body((x - PIXEL_MEAN) / PIXEL_STD))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 28, 28) images in [0, 1] -> (B, 128) standardised features (the FD space)."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def set_feature_statistics(self, raw: torch.Tensor) -> None:
        """Standardise with the statistics of ``raw`` (N, 128).

        A ReLU unit that almost never fires has a tiny spread; dividing by it would turn sampling noise into a
        large distance, so each spread is floored at a tenth of the median spread.
        """
        std = raw.std(0)
        self.feature_mean.copy_(raw.mean(0))
        self.feature_std.copy_(std.clamp_min(0.1 * float(std.median())))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.raw_features(x)))


def prepare_images(images, resize: bool = False) -> torch.Tensor:
    """Validate and convert images to float32 (N, 1, 28, 28) in [0, 1].

    Accepts uint8 arrays/tensors in [0, 255] or float ones in [0, 1], shaped (N, H, W) or (N, 1, H, W), or a
    list of PIL images. Other sizes are an error unless ``resize=True`` (area-style antialiased resize).
    """
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError("no images given")
        images = np.stack([np.asarray(img.convert("L") if hasattr(img, "convert") else img) for img in images])
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = np.array(images)  # torch cannot wrap read-only memory (the cached datasets are read-only)
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() != 4:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W); got shape {tuple(x.shape)}")
    if x.shape[1] != 1:
        raise ValueError(
            f"the evaluation classifier reads grayscale images (1 channel), got {x.shape[1]} channels; "
            "convert to grayscale first"
        )
    if x.shape[0] == 0:
        raise ValueError("no images given")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f"float images must lie in [0, 1], got range [{lo:.3f}, {hi:.3f}]")
    else:
        raise ValueError(f"images must be uint8 or float, got {x.dtype}")
    if tuple(x.shape[-2:]) != INPUT_SIZE:
        if not resize:
            raise ValueError(
                f"images must be {INPUT_SIZE[0]}x{INPUT_SIZE[1]}, got {tuple(x.shape[-2:])}; pass resize=True"
            )
        x = F.interpolate(x, size=INPUT_SIZE, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


@lru_cache(maxsize=2)
def _load(path: str) -> EvalClassifier:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(
            f"evaluation classifier weights not found at {path}; retrain them with "
            "`python scripts/train_eval_classifier.py`"
        )
    model = EvalClassifier()
    model.load_state_dict(load_file(path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_eval_classifier(path: str | Path | None = None) -> EvalClassifier:
    """The bundled classifier (cached, eval mode, frozen)."""
    return _load(str(path or ASSET_PATH))


def classifier_metadata(path: str | Path | None = None) -> dict:
    """The recipe and measured accuracy stored beside the weights."""
    from safetensors import safe_open

    with safe_open(str(path or ASSET_PATH), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


@torch.inference_mode()
def _batched(fn, images, batch_size: int, resize: bool) -> torch.Tensor:
    x = prepare_images(images, resize=resize)
    return torch.cat([fn(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def extract_features(images, batch_size: int = 500, resize: bool = False, model: EvalClassifier | None = None):
    """(N, 128) float64 features of the bundled classifier."""
    model = model or load_eval_classifier()
    return _batched(model.features, images, batch_size, resize).double()


def predict_logits(images, batch_size: int = 500, resize: bool = False, model: EvalClassifier | None = None):
    """(N, 10) logits of the bundled classifier."""
    model = model or load_eval_classifier()
    return _batched(model, images, batch_size, resize)


def class_accuracy(images, labels, batch_size: int = 500, resize: bool = False) -> float:
    """Fraction of ``images`` the classifier assigns to ``labels`` (e.g. class-conditional samples)."""
    labels = torch.tensor(np.asarray(labels)).long().reshape(-1)
    logits = predict_logits(images, batch_size, resize)
    if len(labels) != len(logits):
        raise ValueError(f"{len(logits)} images but {len(labels)} labels")
    return float((logits.argmax(1) == labels).float().mean())
