import numpy as np
import pytest

from unitok.data import DataNotFoundError, ViSPClips, load_sequence
from unitok.data.visp import SPLIT_SEQUENCES, sequence_files, visp_info


def test_sequences_match_the_package():
    info = visp_info()
    assert info["mire-2"] == {"frames": 501, "size": [288, 384], "split": "train"}
    assert info["mbt-cube"]["frames"] == 218 and info["mbt-cube"]["size"] == [480, 640]
    assert set(SPLIT_SEQUENCES["train"]).isdisjoint(SPLIT_SEQUENCES["test"])


def test_frames_are_in_temporal_order():
    files = sequence_files("line")
    numbers = [int(p.stem.split(".")[-1]) for p in files]
    assert numbers == sorted(numbers) and len(numbers) == 33


def test_clips_cut_with_stride_and_resize():
    clips = ViSPClips("test", num_frames=8, image_size=(32, 48), stride=4)
    # ellipse-1 (50 frames) -> starts 0..42 step 4 = 11 clips; line (33) -> starts 0..25 step 4 = 7 clips.
    assert len(clips) == 11 + 7
    clip = clips[0]
    assert clip.shape == (8, 32, 48) and clip.dtype == np.uint8
    assert clips.clip_source(11) == ("line", 0)
    full = load_sequence("ellipse-1", (32, 48))
    assert np.array_equal(clips[1], full[4:12])


def test_frame_step_subsamples_in_time():
    clips = ViSPClips(sequences=("line",), num_frames=4, frame_step=3, stride=100, image_size=16)
    full = load_sequence("line", (16, 16))
    assert np.array_equal(clips[0], full[0:12:3])


def test_real_camera_content_changes_over_time():
    clip = ViSPClips(sequences=("mire-2",), num_frames=16, stride=400, image_size=(64, 64))[0].astype(float)
    assert clip.std() > 10
    assert np.abs(clip[-1] - clip[0]).mean() > 1.0


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown ViSP split"):
        ViSPClips("validation")
    with pytest.raises(ValueError, match="unknown ViSP sequence"):
        ViSPClips(sequences=("nope",))
    with pytest.raises(ValueError, match="no ViSP clip"):
        ViSPClips(sequences=("line",), num_frames=100)
    with pytest.raises(ValueError, match="stride"):
        ViSPClips(stride=0)
    with pytest.raises(DataNotFoundError, match="visp-images-data"):
        ViSPClips(root=tmp_path / "missing")
