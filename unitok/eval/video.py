"""Video metrics: per-frame FD plus temporal measures in the same classifier feature space.

- ``fd_frames``: FD over all frames of all clips (frames resized to the classifier's 28x28).
- ``fd_motion``: FD between the distributions of feature changes between consecutive frames,
  phi(x_{t+1}) - phi(x_t): clips with the right content but wrong motion (frozen, flickering, jumping) score badly.
- ``temporal_consistency``: mean cosine similarity of consecutive-frame features (1 = static), shown beside the
  real clips' value so a reader sees which way a model errs.
- ``flicker``: mean absolute pixel change between consecutive frames, also shown for the real clips.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unitok.eval.classifier import extract_features
from unitok.eval.fd import frechet_distance


def _clips_to_tensor(clips, name: str) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(clips) if not isinstance(clips, torch.Tensor) else clips)
    if x.dim() == 5:
        if x.shape[2] != 1:
            raise ValueError(f"{name}: clips must be grayscale (N, T, 1, H, W), got {x.shape[2]} channels")
        x = x[:, :, 0]
    if x.dim() != 4:
        raise ValueError(f"{name}: clips must be (N, T, H, W) or (N, T, 1, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"{name}: clips need at least 2 frames for temporal metrics, got {x.shape[1]}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"{name}: clips must be uint8 or float in [0, 1], got {x.dtype}")
    return x.float()


def _clip_features(clips: torch.Tensor) -> torch.Tensor:
    n, t, h, w = clips.shape
    feats = extract_features(clips.reshape(n * t, h, w), resize=True)
    return feats.reshape(n, t, -1)  # (N, T, D)


def video_metrics(fake, real) -> dict[str, float]:
    """Compare generated (or reconstructed) clips with real ones; both (N, T, H, W)."""
    a, b = _clips_to_tensor(fake, "fake"), _clips_to_tensor(real, "real")
    fa, fb = _clip_features(a), _clip_features(b)
    motion_a = (fa[:, 1:] - fa[:, :-1]).flatten(0, 1)
    motion_b = (fb[:, 1:] - fb[:, :-1]).flatten(0, 1)
    return {
        "fd_frames": frechet_distance(fa.flatten(0, 1), fb.flatten(0, 1)),
        "fd_motion": frechet_distance(motion_a, motion_b),
        "temporal_consistency": _consistency(fa),
        "temporal_consistency_real": _consistency(fb),
        "flicker": float((a[:, 1:] - a[:, :-1]).abs().mean()),
        "flicker_real": float((b[:, 1:] - b[:, :-1]).abs().mean()),
        "num_clips": int(a.shape[0]),
        "num_frames": int(a.shape[1]),
    }


def _consistency(feats: torch.Tensor) -> float:
    return float(F.cosine_similarity(feats[:, 1:], feats[:, :-1], dim=-1).mean())
