"""Fashion-MNIST (Xiao et al., 2017) read from the Debian package ``dataset-fashion-mnist``.

The files are gzip-compressed IDX: images carry a 16-byte header (magic 2051, count, rows, cols), labels an
8-byte header (magic 2049, count). Nothing is downloaded; a missing package raises :class:`DataNotFoundError`
naming the install command. Arrays are decoded once per process and shared read-only.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from unitok.data.errors import INSTALL_HINT, DataNotFoundError

FASHION_MNIST_DIR = Path(os.environ.get("UNITOK_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
IMAGE_SIZE = (28, 28)
SPLITS = ("train", "test")
_FILE_PREFIX = {"train": "train", "test": "t10k"}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


@dataclass(frozen=True)
class FashionMNIST:
    """One split: ``images`` uint8 (N, 28, 28) in [0, 255], ``labels`` int64 (N,) in [0, 10)."""

    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = CLASS_NAMES

    def __len__(self) -> int:
        return len(self.labels)

    def as_float(self) -> np.ndarray:
        """Images as float32 in [0, 1], shape (N, 28, 28)."""
        return self.images.astype(np.float32) / 255.0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; choose one of {SPLITS}")


def _read_idx(path: Path, magic: int, header: int) -> tuple[tuple[int, ...], np.ndarray]:
    if not path.is_file():
        raise DataNotFoundError(f"Fashion-MNIST file not found: {path}; {INSTALL_HINT}")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {err}; reinstall dataset-fashion-mnist") from err
    if len(raw) < header:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {len(raw)} bytes is shorter than its header")
    found_magic, count = struct.unpack(">II", raw[:8])
    if found_magic != magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {found_magic}, expected {magic})")
    dims = (count,) + tuple(struct.unpack(f">{(header - 8) // 4}I", raw[8:header]))
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {data.size} values for a header of shape {dims}")
    return dims, data.reshape(dims)


@lru_cache(maxsize=2)
def _load(split: str, root: str) -> FashionMNIST:
    prefix = _FILE_PREFIX[split]
    base = Path(root)
    _, images = _read_idx(base / f"{prefix}-images-idx3-ubyte.gz", _IMAGES_MAGIC, 16)
    _, labels = _read_idx(base / f"{prefix}-labels-idx1-ubyte.gz", _LABELS_MAGIC, 8)
    if len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return FashionMNIST(split=split, images=images, labels=labels)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike[str] | None = None) -> FashionMNIST:
    """Load a Fashion-MNIST split ("train": 60k, "test": 10k). Arrays are read-only and cached."""
    _check_split(split)
    return _load(split, str(root if root is not None else FASHION_MNIST_DIR))


def class_index(name_or_index: str | int) -> int:
    """Map a class name ("sneaker", case-insensitive) or index to its index, with a clear error."""
    if isinstance(name_or_index, bool):
        raise ValueError(f"class must be a name or an index, not {name_or_index!r}")
    if isinstance(name_or_index, int):
        if not 0 <= name_or_index < len(CLASS_NAMES):
            raise ValueError(f"class index {name_or_index} out of range [0, {len(CLASS_NAMES)})")
        return name_or_index
    key = str(name_or_index).strip().lower()
    aliases = {name: i for i, name in enumerate(CLASS_NAMES)}
    aliases.update({"t-shirt": 0, "top": 0, "tshirt": 0, "boot": 9, "ankle-boot": 9})
    if key not in aliases:
        raise ValueError(f"unknown Fashion-MNIST class {name_or_index!r}; choose one of {list(CLASS_NAMES)}")
    return aliases[key]
