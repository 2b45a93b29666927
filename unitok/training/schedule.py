"""The learning-rate schedule every unitok trainer uses: linear warmup, then cosine decay to ``min_ratio``."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: (step + 1) / warmup during warmup, then cosine from 1 to ``min_ratio`` at ``total``."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn
