"""Choose a generator's recommended sampling settings by FD and write them into its config.json ("generation").

    python scripts/tune_sampling.py --model checkpoints/gen-next-block --n 1000

Sweeps guidance scale x temperature x top-k on ``--n`` class-balanced samples (FD against 5000 real Fashion-MNIST
test images, seed fixed), keeps the setting with the lowest FD among those whose class accuracy is at least
``--min-class-acc`` (else the lowest FD), and stores it; ``UnitokPipeline``, ``unitok generate`` and
``unitok bench generation`` then use it by default. The sweep is printed as JSON. The config is rewritten atomically.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a generator folder (e.g. checkpoints/gen-next-block)")
    p.add_argument("--n", type=int, default=1000, help="samples per setting (default 1000)")
    p.add_argument("--guidance", default="1.5,2,3,4", help="comma-separated guidance scales")
    p.add_argument("--temperature", default="1.0,0.9", help="comma-separated temperatures")
    p.add_argument("--top-k", default="0,200", help="comma-separated top-k values (0 = off)")
    p.add_argument("--min-class-acc", type=float, default=0.85)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the sweep, do not write config.json")
    args = p.parse_args(argv)
    try:
        import numpy as np

        from unitok.data import load_fashion_mnist
        from unitok.decoding.sampling import SamplingConfig
        from unitok.eval.fd import FeatureStats
        from unitok.eval.generation import image_scores, sample_balanced
        from unitok.model.pretrained import load_generator

        grid = [
            [float(v) for v in args.guidance.split(",")],
            [float(v) for v in args.temperature.split(",")],
            [int(v) for v in args.top_k.split(",")],
        ]
        gen = load_generator(args.model)
        if gen.spec.is_video:
            raise ValueError("tune_sampling scores images; video generators keep the defaults")
        real = FeatureStats.from_images(np.asarray(load_fashion_mnist("test").images[:5000]))
        sweep = []
        for guidance, temperature, top_k in itertools.product(*grid):
            sampling = SamplingConfig(temperature=temperature, top_k=top_k)
            pixels, labels, _ = sample_balanced(gen, args.n, guidance, 100, args.seed, sampling)
            scores = image_scores(pixels, labels, real)
            row = {
                "guidance_scale": guidance,
                "temperature": temperature,
                "top_k": top_k,
                "top_p": 1.0,
                "fd": scores["fd"],
                "class_acc": scores["class_acc"],
            }
            print(json.dumps(row), flush=True)
            sweep.append(row)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ok = [r for r in sweep if r["class_acc"] >= args.min_class_acc] or sweep
    best = min(ok, key=lambda r: r["fd"])
    chosen = {k: best[k] for k in ("guidance_scale", "temperature", "top_k", "top_p")}
    print(json.dumps({"chosen": chosen, "fd": best["fd"], "class_acc": best["class_acc"], "n": args.n}))
    if not args.dry_run:
        config_file = Path(args.model) / "config.json"
        config = json.loads(config_file.read_text())
        config["generation"] = chosen
        tmp = config_file.with_name("config.json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.replace(config_file)
        print(f"wrote the chosen settings into {config_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
