"""Train a unitok tokenizer (any kind) on real data; resumes from the last checkpoint in --output-dir.

    python scripts/train_tokenizer.py --config scripts/configs/tokenizer_baseline.yaml
    python scripts/train_tokenizer.py --config ... --max-minutes 10 --set train.lr=5e-4 --set data.limit=20000

A run killed at any point restarts where its last checkpoint left off when started again with the same
--output-dir. ``--export DIR`` writes the final tokenizer (config.json + model.safetensors + training.yaml).
See unitok/tokenizers/training.py for the config keys and their defaults.
"""

from __future__ import annotations

import sys

from unitok.tokenizers.training import DEFAULTS, train_tokenizer
from unitok.training.cli import run_script, script_parser


def main(argv: list[str] | None = None) -> int:
    args = script_parser(__doc__, "scripts/configs/tokenizer_*.yaml", "checkpoints/tokenizer-baseline").parse_args(argv)
    return run_script(train_tokenizer, args, DEFAULTS)


if __name__ == "__main__":
    sys.exit(main())
