import numpy as np
import pytest
import torch

from unitok.eval import class_accuracy, extract_features, load_eval_classifier, prepare_images
from unitok.eval.classifier import ASSET_PATH, classifier_metadata


def test_bundled_weights_are_small_and_documented():
    assert ASSET_PATH.stat().st_size < 2_000_000
    meta = classifier_metadata()
    assert meta["test_accuracy"] >= 0.88
    assert meta["recipe"]["seed"] == 0


def test_bundled_classifier_classifies_real_test_images(fashion_test):
    acc = class_accuracy(fashion_test.images[:2000], fashion_test.labels[:2000])
    assert acc >= 0.88
    shuffled = np.random.default_rng(0).permutation(fashion_test.labels[:2000])
    assert class_accuracy(fashion_test.images[:2000], shuffled) < 0.2


def test_features_are_deterministic_and_batch_independent(fashion_test):
    imgs = fashion_test.images[:64]
    a = extract_features(imgs, batch_size=64)
    b = torch.cat([extract_features(imgs[:10], batch_size=3), extract_features(imgs[10:], batch_size=64)])
    assert a.shape == (64, 128)
    assert torch.allclose(a, b, atol=1e-5)
    assert load_eval_classifier() is load_eval_classifier()


def test_input_conversions_agree(fashion_test):
    u8 = np.array(fashion_test.images[:4])
    as_float = prepare_images(u8.astype(np.float32) / 255)
    assert torch.equal(prepare_images(u8), as_float)
    assert torch.equal(prepare_images(torch.from_numpy(u8)[:, None]), as_float)
    big = torch.nn.functional.interpolate(as_float, scale_factor=2, mode="nearest")
    assert prepare_images(big, resize=True).shape == (4, 1, 28, 28)


@pytest.mark.parametrize(
    "images, match",
    [
        (np.zeros((2, 3, 28, 28), np.uint8), "grayscale"),
        (np.zeros((2, 32, 32), np.uint8), "resize=True"),
        (np.full((2, 28, 28), 3.0, np.float32), r"\[0, 1\]"),
        (np.zeros((28, 28), np.uint8), r"\(N, H, W\)"),
        (np.zeros((0, 28, 28), np.uint8), "no images"),
        (np.zeros((2, 28, 28), np.int32), "uint8 or float"),
    ],
)
def test_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        prepare_images(images)


def test_missing_weights_name_the_script(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_eval_classifier.py"):
        load_eval_classifier(tmp_path / "nope.safetensors")


def test_label_count_mismatch(fashion_test):
    with pytest.raises(ValueError, match="labels"):
        class_accuracy(fashion_test.images[:4], [0, 1])
