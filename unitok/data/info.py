"""``unitok data info``: counts and shapes of every data source on this machine."""

from __future__ import annotations

from unitok.data.fashion_mnist import CLASS_NAMES, IMAGE_SIZE, load_fashion_mnist
from unitok.data.moving import MovingFashionMNIST, MovingFashionMNISTConfig
from unitok.data.visp import SPLIT_SEQUENCES, ViSPClips, ViSPClipsConfig, visp_info


def data_info() -> dict:
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    cfg = MovingFashionMNISTConfig()
    moving = MovingFashionMNIST("train", cfg)
    first = moving[0]
    sequences = visp_info()
    visp_cfg = ViSPClipsConfig()
    clips = {split: len(ViSPClips(split, visp_cfg)) for split in ("train", "test")}
    return {
        "fashion_mnist": {
            "train": len(train),
            "test": len(test),
            "image_size": list(IMAGE_SIZE),
            "classes": list(CLASS_NAMES),
            "class_counts_train": [int((train.labels == c).sum()) for c in range(len(CLASS_NAMES))],
        },
        "moving_fashion_mnist": {
            "train": cfg.num_clips,
            "test": cfg.num_clips,
            "clip_shape": list(first.frames.shape),
            "num_objects": cfg.num_objects,
            "speed": list(cfg.speed),
            "seed": cfg.seed,
            "source": "train clips from the Fashion-MNIST train split, test clips from the test split",
        },
        "visp": {
            "sequences": len(sequences),
            "frames": sum(s["frames"] for s in sequences.values()),
            "per_sequence": sequences,
            "split_sequences": {k: list(v) for k, v in SPLIT_SEQUENCES.items() if k != "all"},
            "clips": clips,
            "clip_shape": [visp_cfg.num_frames, *visp_cfg.image_size],
            "clip_stride": visp_cfg.stride,
        },
    }
