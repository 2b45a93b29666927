"""Train a unitok tokenizer (any kind) on real data; resumes from the last checkpoint in --output-dir.

    python scripts/train_tokenizer.py --config scripts/configs/tokenizer_baseline.yaml
    python scripts/train_tokenizer.py --config ... --max-minutes 10 --set train.lr=5e-4 --set data.limit=20000

A run killed at any point restarts where its last checkpoint left off when started again with the same
--output-dir. ``--export DIR`` writes the final tokenizer (config.json + model.safetensors + training.yaml).
See unitok/tokenizers/training.py for the config keys and their defaults.
"""

from __future__ import annotations

import argparse
import json
import sys

from unitok.tokenizers.training import DEFAULTS, train_tokenizer
from unitok.training.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see scripts/configs/tokenizer_*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--output-dir", help="run folder: checkpoints, metrics.jsonl (resume happens here)")
    parser.add_argument("--export", help="write the final tokenizer here (e.g. checkpoints/tokenizer-baseline)")
    parser.add_argument("--max-steps", type=int, help="training steps (sets the LR schedule)")
    parser.add_argument("--max-minutes", type=float, help="stop after this many minutes of this run (and save)")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --output-dir")
    args = parser.parse_args(argv)
    try:
        overrides = list(args.set)
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        if args.max_minutes is not None:
            overrides.append(f"train.max_minutes={args.max_minutes}")
        if args.no_resume:
            overrides.append("train.resume=false")
        cfg = load_config(args.config, overrides, defaults=DEFAULTS)
        if args.output_dir:
            cfg["output_dir"] = args.output_dir
        if args.export:
            cfg["export_dir"] = args.export
        summary = train_tokenizer(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
