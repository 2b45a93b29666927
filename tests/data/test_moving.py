import numpy as np
import pytest

from unitok.data import MovingFashionMNIST, load_fashion_mnist


def test_clips_are_deterministic_and_independent_of_count():
    a = MovingFashionMNIST("train", num_clips=5, num_frames=6, image_size=48, seed=3)
    b = MovingFashionMNIST("train", num_clips=100, num_frames=6, image_size=48, seed=3)
    assert np.array_equal(a[4].frames, b[4].frames)
    assert a[4].labels == b[4].labels
    c = MovingFashionMNIST("train", num_clips=5, num_frames=6, image_size=48, seed=4)
    assert not np.array_equal(a[4].frames, c[4].frames)


def test_clip_shapes_and_motion():
    ds = MovingFashionMNIST("test", num_clips=4, num_frames=8, image_size=64, num_objects=3, speed=(2.0, 3.0))
    arr = ds.as_array()
    assert arr.shape == (4, 8, 64, 64) and arr.dtype == np.uint8
    assert len(ds[0].labels) == 3
    # Objects move: consecutive frames differ, and every frame holds garment pixels.
    assert all((arr[:, t] != arr[:, t + 1]).any() for t in range(7))
    assert (arr.reshape(4 * 8, -1).max(1) > 100).all()


def test_train_and_test_clips_use_their_own_split():
    # A single static object in a canvas the size of the garment reproduces the source image exactly.
    ds = MovingFashionMNIST("test", num_clips=3, num_frames=2, image_size=28, num_objects=1, speed=(0, 0))
    test = load_fashion_mnist("test")
    for i in range(3):
        frame = ds[i].frames[0]
        matches = np.flatnonzero((test.images == frame).all(axis=(1, 2)))
        assert len(matches) >= 1
        assert ds[i].labels[0] == test.labels[matches[0]]


def test_objects_stay_inside_the_canvas():
    ds = MovingFashionMNIST("train", num_clips=2, num_frames=40, image_size=40, num_objects=1, speed=(5.0, 6.0))
    for i in range(2):
        frames = ds[i].frames
        # The garment's total brightness is preserved in every frame: it is never clipped by the border.
        sums = frames.reshape(40, -1).astype(np.int64).sum(1)
        assert np.all(sums == sums[0])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_frames": 0}, "num_frames"),
        ({"image_size": 20}, "image_size"),
        ({"speed": (3.0, 1.0)}, "speed"),
        ({"num_objects": 0}, "num_objects"),
        ({"colour": True}, "unknown"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MovingFashionMNIST("train", **kwargs)


def test_bad_split_and_index():
    with pytest.raises(ValueError, match="split"):
        MovingFashionMNIST("val")
    ds = MovingFashionMNIST("train", num_clips=2)
    with pytest.raises(IndexError):
        ds[2]
