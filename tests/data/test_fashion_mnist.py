import gzip
import struct

import numpy as np
import pytest

from unitok.data import CLASS_NAMES, DataNotFoundError, class_index, load_fashion_mnist


def test_splits_have_documented_sizes_and_classes():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == np.uint8
    assert len(CLASS_NAMES) == 10
    # Fashion-MNIST is balanced: 6000 / 1000 per class.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert 0.25 < train.as_float().mean() < 0.32


def test_arrays_are_read_only_and_cached():
    data = load_fashion_mnist("test")
    with pytest.raises(ValueError):
        data.images[0, 0, 0] = 1
    assert load_fashion_mnist("test") is data


def test_bad_split_and_missing_package(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation")
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt Fashion-MNIST file"):
        load_fashion_mnist("test", root=tmp_path)


def test_truncated_idx_payload_is_rejected(tmp_path):
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, 2, 28, 28) + bytes(28 * 28))  # header says 2 images, holds 1
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, 2) + bytes(2))
    with pytest.raises(ValueError, match="header of shape"):
        load_fashion_mnist("test", root=tmp_path)


def test_class_index():
    assert class_index("Sneaker") == 7
    assert class_index("ankle boot") == 9
    assert class_index(3) == 3
    with pytest.raises(ValueError, match="unknown Fashion-MNIST class"):
        class_index("hat")
    with pytest.raises(ValueError, match="out of range"):
        class_index(10)
