import numpy as np
import pytest

from unitok.training.config import apply_override, load_config
from unitok.training.data import StepSampler, load_arrays


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  batch_size: 8\ndata:\n  source: fashion_mnist\n")
    cfg = load_config(path, ["train.lr=3e-4", "tokenizer.config.quantizer={type: fsq, levels: [4, 4]}"], {"x": 1})
    assert cfg["train"] == {"lr": 3e-4, "batch_size": 8}
    assert cfg["tokenizer"]["config"]["quantizer"] == {"type": "fsq", "levels": [4, 4]}
    assert cfg["x"] == 1
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_override({}, "train.lr")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("- a list")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "bad.yaml")


def test_step_sampler_is_a_pure_function_of_step():
    a, b = StepSampler(100, 16, seed=1), StepSampler(100, 16, seed=1)
    seq = [a.indices(s).tolist() for s in range(20)]
    assert [b.indices(s).tolist() for s in reversed(range(20))] == seq[::-1]
    epoch0 = np.concatenate([a.indices(s) for s in range(a.steps_per_epoch)])
    assert len(set(epoch0.tolist())) == len(epoch0) == 96  # no repeats within an epoch


def test_load_arrays_sources(tmp_path):
    images, labels = load_arrays({"source": "fashion_mnist", "split": "test", "limit": 10})
    assert images.shape == (10, 28, 28) and labels.shape == (10,)
    clips, _ = load_arrays(
        {
            "sources": [
                {"source": "moving_fashion_mnist", "options": {"num_clips": 3, "num_frames": 5, "image_size": 32}},
                {"source": "visp", "split": "train", "options": {"num_frames": 5, "image_size": 32, "stride": 200}},
            ]
        }
    )
    assert clips.shape[1:] == (5, 32, 32) and len(clips) > 3
    with pytest.raises(ValueError, match="different shapes"):
        load_arrays({"sources": [{"source": "fashion_mnist", "limit": 2}, {"source": "visp", "split": "test"}]})
    with pytest.raises(ValueError, match="unknown data source"):
        load_arrays({"source": "imagenet"})
    with pytest.raises(ValueError, match="needs a path"):
        load_arrays({"source": "folder"})


def test_hf_dataset_source(tmp_path):
    from unitok.data import to_hf_dataset

    to_hf_dataset("fashion_mnist", "test", limit=12).save_to_disk(str(tmp_path / "ds"))
    images, labels = load_arrays({"source": "hf_dataset", "path": str(tmp_path / "ds")})
    assert images.shape == (12, 28, 28)


def test_random_crop_is_seeded_per_step_and_shared_across_frames():
    from unitok.tokenizers.training import random_crop

    clips = np.random.default_rng(0).integers(0, 255, (4, 3, 16, 16), dtype=np.uint8)
    a, b = random_crop(clips, 8, seed=0, step=5), random_crop(clips, 8, seed=0, step=5)
    assert a.shape == (4, 3, 8, 8) and np.array_equal(a, b)
    assert not np.array_equal(a, random_crop(clips, 8, seed=0, step=6))
    for clip, crop in zip(clips, a, strict=True):  # one window for every frame of a clip
        hits = [(y, x) for y in range(9) for x in range(9) if np.array_equal(clip[:, y : y + 8, x : x + 8], crop)]
        assert hits
    with pytest.raises(ValueError, match="train.crop"):
        random_crop(clips, 17, seed=0, step=0)
