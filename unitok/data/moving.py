"""Moving Fashion-MNIST: seeded video clips of real Fashion-MNIST garments bouncing in a square canvas.

The construction follows Moving MNIST (Srivastava et al., 2015): each object starts at a random position with a
random velocity and reflects off the walls; objects are composited with a per-pixel maximum. What is ours: the
garments are real Fashion-MNIST images, train clips draw only from the train split and held-out clips only from
the test split, and clip ``i`` depends only on ``(seed, split, i)`` and the configuration, so any subset of clips
is reproducible without generating the ones before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unitok.data.fashion_mnist import CLASS_NAMES, IMAGE_SIZE, load_fashion_mnist

_SPLIT_SALT = {"train": 0, "test": 1}


@dataclass(frozen=True)
class MovingFashionMNISTConfig:
    num_clips: int = 10000
    num_frames: int = 16
    image_size: int = 64
    num_objects: int = 2
    speed: tuple[float, float] = (1.5, 3.5)
    seed: int = 0

    def validate(self) -> None:
        if self.num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {self.num_clips}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.image_size < IMAGE_SIZE[0]:
            raise ValueError(f"image_size must be >= {IMAGE_SIZE[0]} (the garment size), got {self.image_size}")
        if self.num_objects < 1:
            raise ValueError(f"num_objects must be >= 1, got {self.num_objects}")
        lo, hi = self.speed
        if not 0 <= lo <= hi:
            raise ValueError(f"speed must be (min, max) with 0 <= min <= max pixels/frame, got {self.speed}")


@dataclass(frozen=True)
class Clip:
    """``frames`` uint8 (T, H, W); ``labels`` the class of each object, in drawing order."""

    frames: np.ndarray
    labels: tuple[int, ...]


class MovingFashionMNIST:
    """A deterministic, lazily generated set of clips; ``len()`` clips, ``ds[i]`` is a :class:`Clip`."""

    def __init__(self, split: str = "train", config: MovingFashionMNISTConfig | None = None, **overrides):
        if split not in _SPLIT_SALT:
            raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
        config = config or MovingFashionMNISTConfig()
        if overrides:
            unknown = set(overrides) - set(MovingFashionMNISTConfig.__dataclass_fields__)
            if unknown:
                raise ValueError(f"unknown Moving Fashion-MNIST options {sorted(unknown)}")
            config = MovingFashionMNISTConfig(**{**config.__dict__, **overrides})
        config.validate()
        self.split = split
        self.config = config
        self._source = load_fashion_mnist(split)

    def __len__(self) -> int:
        return self.config.num_clips

    @property
    def frame_shape(self) -> tuple[int, int]:
        return (self.config.image_size, self.config.image_size)

    @property
    def class_names(self) -> tuple[str, ...]:
        return CLASS_NAMES

    def __getitem__(self, index: int) -> Clip:
        if not -len(self) <= index < len(self):
            raise IndexError(f"clip index {index} out of range for {len(self)} clips")
        index %= len(self)
        cfg = self.config
        rng = np.random.default_rng([cfg.seed, _SPLIT_SALT[self.split], index])
        size, obj = cfg.image_size, IMAGE_SIZE[0]
        span = size - obj
        frames = np.zeros((cfg.num_frames, size, size), dtype=np.uint8)
        picks = rng.integers(0, len(self._source), size=cfg.num_objects)
        for pick in picks:
            garment = self._source.images[pick]
            pos = rng.uniform(0, span, size=2)
            angle = rng.uniform(0, 2 * np.pi)
            speed = rng.uniform(*cfg.speed)
            vel = speed * np.array([np.sin(angle), np.cos(angle)])
            for t in range(cfg.num_frames):
                y, x = np.rint(pos).astype(int)
                window = frames[t, y : y + obj, x : x + obj]
                np.maximum(window, garment, out=window)
                pos, vel = _bounce(pos + vel, vel, span)
        return Clip(frames=frames, labels=tuple(int(self._source.labels[p]) for p in picks))

    def as_array(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Clips ``start:stop`` stacked as uint8 (N, T, H, W)."""
        stop = len(self) if stop is None else min(stop, len(self))
        if not 0 <= start < stop:
            raise ValueError(f"empty clip range [{start}, {stop}) for {len(self)} clips")
        return np.stack([self[i].frames for i in range(start, stop)])


def _bounce(pos: np.ndarray, vel: np.ndarray, span: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflect a position off the walls [0, span] (per axis), flipping the velocity that crossed."""
    pos, vel = pos.copy(), vel.copy()
    for axis in range(2):
        if span == 0:
            pos[axis] = 0.0
            continue
        if pos[axis] < 0:
            pos[axis], vel[axis] = -pos[axis], -vel[axis]
        elif pos[axis] > span:
            pos[axis], vel[axis] = 2 * span - pos[axis], -vel[axis]
        pos[axis] = float(np.clip(pos[axis], 0, span))
    return pos, vel
