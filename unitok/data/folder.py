"""A user's own images: an image folder (one sub-folder per class, or flat) loaded through HF ``datasets``.

``datasets``' packaged ``imagefolder`` builder does the reading (no network: the builder ships with the library).
What is ours is the checking done first, so the user sees which file or folder is wrong instead of an Arrow or
PIL traceback: missing paths, empty folders, files PIL cannot decode, and (after loading) the size and mode
normalisation that every training script expects.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")
_MODES = {"L": 1, "RGB": 3}


def list_image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``folder`` (recursive), sorted; raises if the folder is missing or holds none."""
    root = Path(folder)
    if not root.exists():
        raise FileNotFoundError(f"image folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"expected a folder of images, got a file: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return files


def check_image_files(files: list[Path]) -> None:
    """Decode every file once; a corrupt or truncated file raises ValueError naming it."""
    for path in files:
        try:
            with Image.open(path) as img:
                img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"cannot decode image {path}: {err}; remove or replace the file") from err


def load_image_folder(
    folder: str | os.PathLike[str],
    image_size: int | tuple[int, int] | None = None,
    mode: str = "L",
    check: bool = True,
):
    """Load an image folder as a ``datasets.Dataset`` with ``image`` and ``label`` columns.

    Sub-folders name the classes (``folder/sneaker/001.png`` -> label "sneaker"); a flat folder gets one class.
    ``mode`` ("L" or "RGB") and ``image_size`` (H, W) are applied on access, so the stored files stay untouched.
    """
    import datasets

    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    size = _as_size(image_size) if image_size is not None else None
    files = list_image_files(folder)
    if check:
        check_image_files(files)
    root = Path(folder)
    class_dirs = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    if class_dirs and any(p.parent == root for p in files):
        raise ValueError(f"{root} mixes images at the top level with class sub-folders; move them into a class folder")
    names = class_dirs or [root.name or "images"]
    label_of = {name: i for i, name in enumerate(names)}
    labels = [label_of[p.relative_to(root).parts[0]] if class_dirs else 0 for p in files]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in files], "label": labels}, features=features)
    return ds.with_transform(_ImageTransform(mode, size))


class _ImageTransform:
    """Converts decoded PIL images to the requested mode and size (picklable, for dataloader workers)."""

    def __init__(self, mode: str, size: tuple[int, int] | None):
        self.mode, self.size = mode, size

    def __call__(self, batch: dict) -> dict:
        out = dict(batch)
        if "image" in batch:
            out["image"] = [self._convert(img) for img in batch["image"]]
        return out

    def _convert(self, img: Image.Image) -> Image.Image:
        img = img.convert(self.mode)
        if self.size is not None and img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
        return img


def _as_size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (H, W) with positive sides, got {size}")
    return size


def images_to_array(images, mode: str = "L") -> np.ndarray:
    """A list of PIL images (all the same size) to uint8 (N, H, W) for "L" or (N, H, W, 3) for "RGB"."""
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {list(_MODES)}, got {mode!r}")
    arrays = [np.asarray(img.convert(mode), dtype=np.uint8) for img in images]
    if not arrays:
        raise ValueError("no images to convert")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"images have different sizes {sorted(shapes)}; pass image_size to load_image_folder")
    return np.stack(arrays)
