"""Every unitok data source as a ``datasets.Dataset``, so training scripts share one path.

Images become an ``image`` column (``datasets.Image``) with a ``label`` column (``ClassLabel``); clips become a
``frames`` column (a list of images) with a ``label`` column. Arrow stores the images PNG-encoded, which is
lossless for uint8 grayscale, and ``datasets`` caches what a script maps over them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from unitok.data.fashion_mnist import CLASS_NAMES, load_fashion_mnist
from unitok.data.moving import MovingFashionMNIST
from unitok.data.visp import SEQUENCES, ViSPClips

SOURCES = ("fashion_mnist", "moving_fashion_mnist", "visp")


def to_hf_dataset(source: str, split: str = "train", limit: int | None = None, **options):
    """Convert a named source ("fashion_mnist", "moving_fashion_mnist", "visp") to a ``datasets.Dataset``.

    ``options`` go to the source (e.g. ``num_frames=8`` for clips); ``limit`` keeps the first N items.
    """
    import datasets

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if source == "fashion_mnist":
        if options:
            raise ValueError(f"fashion_mnist takes no options, got {sorted(options)}")
        data = load_fashion_mnist(split)
        n = len(data) if limit is None else min(limit, len(data))
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))})
        return datasets.Dataset.from_dict(
            {"image": list(data.images[:n]), "label": data.labels[:n].tolist()}, features=features
        )
    if source == "moving_fashion_mnist":
        clips = MovingFashionMNIST(split, **options)
        n = len(clips) if limit is None else min(limit, len(clips))
        items = [clips[i] for i in range(n)]
        frames = [[Image.fromarray(f) for f in item.frames] for item in items]
        labels = [list(item.labels) for item in items]
        features = datasets.Features(
            {
                "frames": datasets.Sequence(datasets.Image()),
                "label": datasets.Sequence(datasets.ClassLabel(names=list(CLASS_NAMES))),
            }
        )
        return datasets.Dataset.from_dict({"frames": frames, "label": labels}, features=features)
    if source == "visp":
        clips = ViSPClips(split, **options)
        n = len(clips) if limit is None else min(limit, len(clips))
        names = list(SEQUENCES)
        frames = [[Image.fromarray(f) for f in clips[i]] for i in range(n)]
        labels = [names.index(clips.clip_source(i)[0]) for i in range(n)]
        features = datasets.Features(
            {"frames": datasets.Sequence(datasets.Image()), "label": datasets.ClassLabel(names=names)}
        )
        return datasets.Dataset.from_dict({"frames": frames, "label": labels}, features=features)
    raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES} or use load_image_folder(path)")


def dataset_to_arrays(ds, column: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """An image dataset (from :func:`to_hf_dataset` or ``load_image_folder``) to uint8 arrays (images, labels)."""
    from unitok.data.folder import images_to_array

    if column not in ds.column_names:
        raise ValueError(f"dataset has no {column!r} column (columns: {ds.column_names})")
    rows = ds[:]
    return images_to_array(rows[column]), np.asarray(rows["label"], dtype=np.int64)
