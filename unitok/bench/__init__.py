"""``unitok bench <suite> --json PATH``: benchmarks that write machine-readable results.

A suite is declared here (help text and options, so ``unitok --help`` imports nothing heavy) and implemented in
its own module as ``run(args) -> dict``, imported only when the suite runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Suite:
    module: str
    help: str
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


SUITES: dict[str, Suite] = {
    "eval": Suite(
        module="unitok.bench.eval",
        help="check the FD metric on real Fashion-MNIST (classifier accuracy, train-vs-test floor, corruptions)",
        options={
            "--n": {
                "type": int,
                "default": 5000,
                "help": "images per side of each FD (>= 2000; default 5000)",
            },
            "--seed": {"type": int, "default": 0, "help": "seed for the sample draw and the corruptions"},
        },
    ),
    "tokenizers": Suite(
        module="unitok.bench.tokenizers",
        help="reconstruction PSNR/SSIM, codebook usage, bits and speed of the bundled tokenizers",
        options={
            "--n": {"type": int, "default": 10000, "help": "Fashion-MNIST test images to score (5000..10000)"},
            "--checkpoints": {"default": None, "help": "folder holding tokenizer-* checkpoints (default: bundled)"},
        },
    ),
    "generation": Suite(
        module="unitok.bench.generation",
        help="FD, class accuracy, forward passes and speed of the bundled generators (every mode, image and video)",
        options={
            "--n": {"type": int, "default": 2000, "help": "class-balanced samples per image mode (default 2000)"},
            "--num-real": {"type": int, "default": 5000, "help": "real Fashion-MNIST test images (default 5000)"},
            "--video-n": {"type": int, "default": 200, "help": "clips per video mode (default 200)"},
            "--guidance-scale": {"type": float, "default": None, "help": "override each generator's guidance"},
            "--batch-size": {"type": int, "default": 100, "help": "samples per batch (default 100)"},
            "--seed": {"type": int, "default": 0},
            "--checkpoints": {"default": None, "help": "folder holding gen-* generators (default: bundled)"},
        },
    ),
    "decoding": Suite(
        module="unitok.bench.decoding",
        help="forward passes, wall time, FD of sjd/grouped/relaxed/draft vs plain AR on the bundled next-token model",
        options={
            "--n": {"type": int, "default": 500, "help": "class-balanced images per method (default 500)"},
            "--guidance-scale": {"type": float, "default": None, "help": "default: the generator's"},
            "--window": {"type": int, "default": 8, "help": "sjd window (default 8)"},
            "--lossy-window": {"type": int, "default": 8, "help": "grouped/relaxed window (default 8)"},
            "--group-size": {"type": int, "default": 32, "help": "grouped: codes per group (default 32)"},
            "--delta": {"type": float, "default": 0.4, "help": "relaxed: total-variation bound (default 0.4)"},
            "--neighbors": {"type": int, "default": 32, "help": "relaxed: latent neighbours per code (default 32)"},
            "--min-p": {"type": float, "default": 0.05, "help": "grouped/relaxed: plausible-neighbour rule (0.05)"},
            "--gamma": {"type": int, "default": 4, "help": "draft: tokens per target forward (default 4)"},
            "--draft": {"default": None, "help": "draft generator folder (default: checkpoints/gen-draft)"},
            "--threads": {"type": int, "default": None, "help": "torch threads (default: torch's)"},
            "--dist-samples": {"type": int, "default": 20000, "help": "samples of the distribution test"},
            "--seed": {"type": int, "default": 0},
            "--checkpoints": {"default": None, "help": "folder holding gen-next-token (default: bundled)"},
        },
    ),
    "serving": Suite(
        module="unitok.bench.serving",
        help="images/s of the real server (vLLM next-token, native next-block) under concurrent openai clients vs HF "
        "generate, latency, CFG pair divergences, and vLLM's engine alone (the ceiling of the server's ratio)",
        options={
            "--n": {"type": int, "default": 64, "help": "images per measured run (default 64)"},
            "--clients": {"type": int, "default": 16, "help": "concurrent clients = HF batch size (default 16)"},
            "--rounds": {"type": int, "default": 3, "help": "alternating HF / vLLM rounds; medians (default 3)"},
            "--speculative": {
                "action": "store_true",
                "help": "also vLLM's engine alone speculating with gen-draft (4 drafts; argmax and probabilistic), "
                "at --clients and at 1 client, against no draft (~4 minutes more)",
            },
            "--seed": {"type": int, "default": 0},
            "--checkpoints": {"default": None, "help": "folder holding gen-next-token and gen-next-block"},
        },
    ),
}
