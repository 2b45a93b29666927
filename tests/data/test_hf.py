import numpy as np
import pytest

from unitok.data import (
    CLASS_NAMES,
    MovingFashionMNIST,
    ViSPClips,
    dataset_to_arrays,
    load_fashion_mnist,
    to_hf_dataset,
)


def test_fashion_mnist_round_trips_through_datasets():
    ds = to_hf_dataset("fashion_mnist", "test", limit=50)
    assert len(ds) == 50 and ds.features["label"].names == list(CLASS_NAMES)
    images, labels = dataset_to_arrays(ds)
    test = load_fashion_mnist("test")
    assert np.array_equal(images, test.images[:50]) and np.array_equal(labels, test.labels[:50])


def test_clip_sources_have_frames_and_labels():
    ds = to_hf_dataset("moving_fashion_mnist", "train", limit=2, num_frames=4, image_size=32)
    row = ds[1]
    assert len(row["frames"]) == 4 and row["frames"][0].size == (32, 32)
    expected = MovingFashionMNIST("train", num_frames=4, image_size=32)[1]
    assert np.array_equal(np.stack([np.asarray(f) for f in row["frames"]]), expected.frames)
    assert row["label"] == list(expected.labels)

    visp = to_hf_dataset("visp", "test", limit=3, num_frames=4, image_size=16)
    assert len(visp) == 3 and visp.features["label"].names[visp[0]["label"]] == "ellipse-1"
    assert np.array_equal(np.asarray(visp[0]["frames"][2]), ViSPClips("test", num_frames=4, image_size=16)[0][2])


def test_bad_source_and_options():
    with pytest.raises(ValueError, match="unknown data source"):
        to_hf_dataset("cifar10")
    with pytest.raises(ValueError, match="limit"):
        to_hf_dataset("fashion_mnist", limit=0)
    with pytest.raises(ValueError, match="takes no options"):
        to_hf_dataset("fashion_mnist", num_frames=3)
