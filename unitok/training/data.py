"""Training data as in-memory uint8 arrays, from any unitok source, a user's image folder or a saved HF dataset.

``data`` sections of training configs look like ``{"source": "fashion_mnist", "split": "train"}``,
``{"source": "moving_fashion_mnist", "split": "train", "options": {"num_frames": 9, "num_clips": 4000}}``,
``{"source": "visp", "split": "train", "options": {...}}``, ``{"source": "folder", "path": DIR, "image_size": 28}``
or ``{"source": "hf_dataset", "path": DIR}`` (``datasets.save_to_disk`` output with image + label columns);
``{"sources": [...]}`` concatenates several (all must give the same shape). Batches are drawn by
:class:`StepSampler`, a pure function of (seed, step), so a resumed run sees exactly the batches it would have.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def load_arrays(spec: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 (N, H, W) or (N, T, H, W), labels int64 (N,)) for a ``data`` config section."""
    if "sources" in spec:
        parts = [load_arrays(s) for s in spec["sources"]]
        shapes = {p[0].shape[1:] for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"data sources give different shapes {sorted(shapes)}; set the same size/frames")
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    source = spec.get("source")
    split = spec.get("split", "train")
    options = dict(spec.get("options") or {})
    limit = spec.get("limit")
    if source == "fashion_mnist":
        from unitok.data import load_fashion_mnist

        data = load_fashion_mnist(split)
        images, labels = np.array(data.images), np.array(data.labels)
    elif source == "moving_fashion_mnist":
        from unitok.data import MovingFashionMNIST

        clips = MovingFashionMNIST(split, **options)
        n = len(clips) if limit is None else min(int(limit), len(clips))
        images = clips.as_array(0, n)
        labels = np.array([clips[i].labels[0] for i in range(n)], dtype=np.int64)
    elif source == "visp":
        from unitok.data import ViSPClips
        from unitok.data.visp import SEQUENCES

        clips = ViSPClips(split, **options)
        images = clips.as_array()
        names = list(SEQUENCES)
        labels = np.array([names.index(clips.clip_source(i)[0]) for i in range(len(clips))], dtype=np.int64)
    elif source == "folder":
        from unitok.data import dataset_to_arrays, load_image_folder

        if "path" not in spec:
            raise ValueError("a folder data source needs a path")
        images, labels = dataset_to_arrays(load_image_folder(spec["path"], image_size=spec.get("image_size")))
    elif source == "hf_dataset":
        import datasets

        from unitok.data import dataset_to_arrays

        if "path" not in spec:
            raise ValueError("an hf_dataset data source needs the path of a datasets.save_to_disk folder")
        images, labels = dataset_to_arrays(datasets.load_from_disk(spec["path"]))
    else:
        raise ValueError(
            f"unknown data source {source!r}; use fashion_mnist, moving_fashion_mnist, visp, folder or hf_dataset"
        )
    if limit is not None:
        images, labels = images[: int(limit)], labels[: int(limit)]
    if len(images) == 0:
        raise ValueError(f"data source {source!r} is empty")
    return images, labels


class StepSampler:
    """Batch indices for any global step: epoch e is a permutation seeded by (seed, e); no hidden state."""

    def __init__(self, num_items: int, batch_size: int, seed: int = 0):
        if batch_size < 1 or num_items < 1:
            raise ValueError(f"need batch_size >= 1 and a non-empty dataset, got {batch_size}, {num_items}")
        self.num_items, self.batch_size, self.seed = num_items, min(batch_size, num_items), seed
        self.steps_per_epoch = max(1, num_items // self.batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, offset = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
            self._epoch = epoch
        return self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]
