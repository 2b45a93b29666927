"""Train a unitok generator (next-token, next-scale or next-block) on real data with a bundled tokenizer.

    python scripts/train_ar.py --config scripts/configs/ar_next_token.yaml --export checkpoints/gen-next-token
    python scripts/train_ar.py --config ... --max-minutes 20 --set train.lr=5e-4 --set mode=next-block

The dataset is tokenized once and cached with ``datasets`` (``cache_dir``). A run killed at any point restarts from
its last checkpoint when started again with the same --output-dir. See unitok/training/ar.py for every config key.
"""

from __future__ import annotations

import argparse
import sys

from unitok.training.ar import DEFAULTS, train_ar
from unitok.training.cli import run_script, script_parser


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    return script_parser(description, "scripts/configs/ar_*.yaml", "checkpoints/gen-next-token")


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    return run_script(train_ar, args, DEFAULTS, extra)


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
