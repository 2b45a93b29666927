"""Real camera footage: grayscale PGM sequences from the Debian package ``visp-images-data`` (GPL-2).

ViSP ships a few real image sequences recorded with a camera (a calibration target, a cube, an ellipse, a line).
We cut them into fixed-length clips with a configurable stride and resize the frames (area resampling after a
centre crop to the target aspect ratio). Sequences are held out whole: "train" and "test" never share a
sequence, so a tokenizer evaluated on "test" clips has never seen that scene.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unitok.data.errors import INSTALL_HINT, DataNotFoundError

VISP_DIR = Path(os.environ.get("UNITOK_VISP_DIR", "/usr/share/visp-images-data/ViSP-images"))
# Real camera sequences, longest first. Held out by sequence.
SEQUENCES: dict[str, str] = {
    "mire-2": "mire-2",
    "mbt-cube": "mbt/cube",
    "cube": "cube",
    "ellipse-1": "ellipse-1",
    "line": "line",
}
SPLIT_SEQUENCES: dict[str, tuple[str, ...]] = {
    "train": ("mire-2", "mbt-cube", "cube"),
    "test": ("ellipse-1", "line"),
    "all": tuple(SEQUENCES),
}
_FRAME_NUMBER = re.compile(r"(\d+)\.pgm$")


def _root(root: str | os.PathLike[str] | None) -> Path:
    base = Path(root) if root is not None else VISP_DIR
    if not base.is_dir():
        raise DataNotFoundError(f"ViSP images not found at {base}; {INSTALL_HINT}")
    return base


@lru_cache(maxsize=16)
def sequence_files(name: str, root: str | None = None) -> tuple[Path, ...]:
    """The frame files of one sequence in temporal order."""
    if name not in SEQUENCES:
        raise ValueError(f"unknown ViSP sequence {name!r}; choose one of {list(SEQUENCES)}")
    folder = _root(root) / SEQUENCES[name]
    if not folder.is_dir():
        raise DataNotFoundError(f"ViSP sequence folder missing: {folder}; {INSTALL_HINT}")
    numbered = []
    for path in folder.iterdir():
        match = _FRAME_NUMBER.search(path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    if not numbered:
        raise ValueError(f"no numbered .pgm frames in {folder}")
    return tuple(path for _, path in sorted(numbered))


def _read_frame(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert("L")
            if size is not None:
                img = _center_crop_resize(img, size)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"cannot read ViSP frame {path}: {err}") from err


def _center_crop_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the largest centred box with the target aspect ratio (H, W), then resize with box filtering."""
    height, width = size
    target = width / height
    w, h = img.size
    if w / h > target:
        new_w = round(h * target)
        left = (w - new_w) // 2
        box = (left, 0, left + new_w, h)
    else:
        new_h = round(w / target)
        top = (h - new_h) // 2
        box = (0, top, w, top + new_h)
    return img.resize((width, height), Image.Resampling.BOX, box=box)


@lru_cache(maxsize=8)
def load_sequence(name: str, size: tuple[int, int] | None = None, root: str | None = None) -> np.ndarray:
    """All frames of a sequence as uint8 (T, H, W), resized to ``size`` (H, W) if given. Cached, read-only."""
    frames = np.stack([_read_frame(p, size) for p in sequence_files(name, root)])
    frames.setflags(write=False)
    return frames


@dataclass(frozen=True)
class ViSPClipsConfig:
    num_frames: int = 16
    image_size: tuple[int, int] = (64, 64)
    stride: int = 8
    frame_step: int = 1

    def validate(self) -> None:
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.stride < 1 or self.frame_step < 1:
            raise ValueError(f"stride and frame_step must be >= 1, got {self.stride}, {self.frame_step}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive sides, got {self.image_size}")


class ViSPClips:
    """Clips of ``num_frames`` frames (every ``frame_step``-th frame), starting every ``stride`` frames."""

    def __init__(
        self,
        split: str = "test",
        config: ViSPClipsConfig | None = None,
        sequences: tuple[str, ...] | None = None,
        root: str | os.PathLike[str] | None = None,
        **overrides,
    ):
        if sequences is None:
            if split not in SPLIT_SEQUENCES:
                raise ValueError(f"unknown ViSP split {split!r}; choose one of {list(SPLIT_SEQUENCES)}")
            sequences = SPLIT_SEQUENCES[split]
        for name in sequences:
            if name not in SEQUENCES:
                raise ValueError(f"unknown ViSP sequence {name!r}; choose one of {list(SEQUENCES)}")
        config = config or ViSPClipsConfig()
        if overrides:
            unknown = set(overrides) - set(ViSPClipsConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown ViSP clip options {sorted(unknown)}")
            config = ViSPClipsConfig(**{**config.__dict__, **overrides})
        if isinstance(config.image_size, int):
            config = ViSPClipsConfig(**{**config.__dict__, "image_size": (config.image_size, config.image_size)})
        config.validate()
        self.split, self.config, self.sequences = split, config, tuple(sequences)
        self._root = str(_root(root))
        span = (config.num_frames - 1) * config.frame_step + 1
        self._index: list[tuple[str, int]] = []
        for name in self.sequences:
            length = len(sequence_files(name, self._root))
            self._index.extend((name, start) for start in range(0, length - span + 1, config.stride))
        if not self._index:
            raise ValueError(
                f"no ViSP clip of {config.num_frames} frames (step {config.frame_step}) fits in {self.sequences}; "
                "use fewer frames or a smaller frame_step"
            )

    def __len__(self) -> int:
        return len(self._index)

    def clip_source(self, index: int) -> tuple[str, int]:
        """(sequence name, first frame index) of clip ``index``."""
        return self._index[index]

    def __getitem__(self, index: int) -> np.ndarray:
        """Clip ``index`` as uint8 (T, H, W)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        name, start = self._index[index]
        frames = load_sequence(name, tuple(self.config.image_size), self._root)
        stop = start + self.config.num_frames * self.config.frame_step
        return np.array(frames[start : stop : self.config.frame_step])

    def as_array(self) -> np.ndarray:
        """All clips as uint8 (N, T, H, W)."""
        return np.stack([self[i] for i in range(len(self))])


def visp_info(root: str | os.PathLike[str] | None = None) -> dict:
    """Sequence names, frame counts and native frame sizes."""
    base = str(_root(root))
    info = {}
    for name in SEQUENCES:
        files = sequence_files(name, base)
        with Image.open(files[0]) as img:
            width, height = img.size
        split = next(s for s in ("train", "test") if name in SPLIT_SEQUENCES[s])
        info[name] = {"frames": len(files), "size": [height, width], "split": split}
    return info
