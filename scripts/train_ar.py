"""Train a unitok generator (next-token, next-scale or next-block) on real data with a bundled tokenizer.

    python scripts/train_ar.py --config scripts/configs/ar_next_token.yaml --export checkpoints/gen-next-token
    python scripts/train_ar.py --config ... --max-minutes 20 --set train.lr=5e-4 --set mode=next-block

The dataset is tokenized once and cached with ``datasets`` (``cache_dir``). A run killed at any point restarts from
its last checkpoint when started again with the same --output-dir. See unitok/training/ar.py for every config key.
"""

from __future__ import annotations

import argparse
import json
import sys

from unitok.training.ar import DEFAULTS, train_ar
from unitok.training.config import load_config


def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see scripts/configs/ar_*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output-dir", help="run folder: checkpoints, metrics.jsonl, sample grids (resume happens here)")
    p.add_argument("--export", help="write the final generator here (e.g. checkpoints/gen-next-token)")
    p.add_argument("--max-steps", type=int, help="training steps (sets the LR schedule)")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes of this run (and save)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --output-dir")
    return p


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    try:
        overrides = [*(extra or []), *args.set]
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
        summary = train_ar(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
