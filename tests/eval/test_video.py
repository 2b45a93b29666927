import numpy as np
import pytest

from unitok.data import MovingFashionMNIST
from unitok.eval import video_metrics


@pytest.fixture(scope="module")
def clips():
    train = MovingFashionMNIST("test", num_clips=48, num_frames=6, image_size=48).as_array()
    other = MovingFashionMNIST("test", num_clips=48, num_frames=6, image_size=48, seed=1).as_array()
    return train, other


def test_real_vs_real_beats_broken_motion(clips):
    a, b = clips
    good = video_metrics(a, b)
    frozen = np.repeat(a[:, :1], a.shape[1], axis=1)  # right content, no motion
    bad = video_metrics(frozen, b)
    assert good["fd_motion"] < bad["fd_motion"]
    assert bad["temporal_consistency"] == pytest.approx(1.0, abs=1e-6)
    assert bad["flicker"] == 0.0
    assert good["flicker_real"] == pytest.approx(bad["flicker_real"])
    noise = np.random.default_rng(0).integers(0, 255, a.shape, dtype=np.uint8)
    assert video_metrics(noise, b)["fd_frames"] > 5 * good["fd_frames"]


def test_video_input_errors(clips):
    a, _ = clips
    with pytest.raises(ValueError, match="at least 2 frames"):
        video_metrics(a[:, :1], a[:, :1])
    with pytest.raises(ValueError, match="grayscale"):
        video_metrics(np.zeros((2, 3, 3, 28, 28), np.uint8), a)
    with pytest.raises(ValueError, match=r"\(N, T, H, W\)"):
        video_metrics(a[0], a)
