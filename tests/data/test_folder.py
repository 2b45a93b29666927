import numpy as np
import pytest
from PIL import Image

from unitok.data import dataset_to_arrays, load_image_folder


def _write(path, array, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_class_subfolders_become_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("boots", "hats"):
        for i in range(3):
            _write(tmp_path / cls / f"{i}.png", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    ds = load_image_folder(tmp_path, image_size=28)
    assert len(ds) == 6
    assert ds.features["label"].names == ["boots", "hats"]
    assert sorted(ds["label"]) == [0, 0, 0, 1, 1, 1]
    img = ds[0]["image"]
    assert img.mode == "L" and img.size == (28, 28)
    images, labels = dataset_to_arrays(ds)
    assert images.shape == (6, 28, 28) and labels.tolist() == ds["label"]


def test_rgb_mode_and_flat_folder(tmp_path):
    _write(tmp_path / "a.png", np.full((8, 8, 3), 200, dtype=np.uint8))
    _write(tmp_path / "b.jpg", np.full((8, 8, 3), 10, dtype=np.uint8), fmt="JPEG")
    ds = load_image_folder(tmp_path, mode="RGB")
    assert len(ds) == 2 and set(ds["label"]) == {0}
    assert ds[0]["image"].mode == "RGB"


def test_stored_pixels_are_preserved(tmp_path):
    src = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    _write(tmp_path / "x" / "0.png", src)
    images, _ = dataset_to_arrays(load_image_folder(tmp_path))
    assert np.array_equal(images[0], src)


def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="no image files"):
        load_image_folder(tmp_path / "empty")
    _write(tmp_path / "file.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="got a file"):
        load_image_folder(tmp_path / "file.png")


def test_corrupt_file_is_named(tmp_path):
    _write(tmp_path / "ok" / "0.png", np.zeros((8, 8), np.uint8))
    good = (tmp_path / "ok" / "0.png").read_bytes()
    (tmp_path / "ok" / "1.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="1.png"):
        load_image_folder(tmp_path)


def test_mixed_layout_and_bad_options(tmp_path):
    _write(tmp_path / "cls" / "0.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "loose.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="mixes images"):
        load_image_folder(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        load_image_folder(tmp_path / "cls", mode="CMYK")
    with pytest.raises(ValueError, match="image_size"):
        load_image_folder(tmp_path / "cls", image_size=(0, 4))


def test_different_sizes_need_image_size(tmp_path):
    _write(tmp_path / "c" / "0.png", np.zeros((8, 8), np.uint8))
    _write(tmp_path / "c" / "1.png", np.zeros((9, 8), np.uint8))
    with pytest.raises(ValueError, match="different sizes"):
        dataset_to_arrays(load_image_folder(tmp_path))
    images, _ = dataset_to_arrays(load_image_folder(tmp_path, image_size=8))
    assert images.shape == (2, 8, 8)
