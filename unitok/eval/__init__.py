"""Evaluation: PSNR/SSIM, codebook usage, FD and class accuracy under the bundled classifier, video metrics."""

from unitok.eval.classifier import (
    EvalClassifier,
    class_accuracy,
    extract_features,
    load_eval_classifier,
    predict_logits,
    prepare_images,
)
from unitok.eval.fd import FeatureStats, fd_images, frechet_distance
from unitok.eval.metrics import code_counts, codebook_perplexity, codebook_usage, psnr, ssim
from unitok.eval.video import video_metrics

__all__ = [
    "EvalClassifier",
    "FeatureStats",
    "class_accuracy",
    "code_counts",
    "codebook_perplexity",
    "codebook_usage",
    "extract_features",
    "fd_images",
    "frechet_distance",
    "load_eval_classifier",
    "predict_logits",
    "prepare_images",
    "psnr",
    "ssim",
    "video_metrics",
]
