"""The command line every training script shares: YAML config + ``--set`` overrides, run folder, export, limits."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from unitok.training.config import load_config


def script_parser(description: str, config_glob: str, export_example: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML config (see {config_glob})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--output-dir", help="run folder: checkpoints, metrics.jsonl (resume happens here)")
    p.add_argument("--export", help=f"write the final model here (e.g. {export_example})")
    p.add_argument("--max-steps", type=int, help="training steps (sets the LR schedule)")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes of this run (and save)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --output-dir")
    return p


def run_script(
    train: Callable[[dict], dict], args: argparse.Namespace, defaults: dict[str, Any], extra: list[str] | None = None
) -> int:
    """Build the config (defaults < YAML < ``extra`` < ``--set`` < flags), train, print the summary as JSON.
    User errors print one ``error:`` line and return 2."""
    try:
        overrides = [*(extra or []), *args.set]
        if args.max_steps is not None:
            overrides.append(f"train.max_steps={args.max_steps}")
        if args.max_minutes is not None:
            overrides.append(f"train.max_minutes={args.max_minutes}")
        if args.no_resume:
            overrides.append("train.resume=false")
        cfg = load_config(args.config, overrides, defaults=defaults)
        if args.output_dir:
            cfg["output_dir"] = args.output_dir
        if args.export:
            cfg["export_dir"] = args.export
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    return 0
