"""Fine-tune a saved unitok generator on your own image folder (one sub-folder per class = new classes/prompts).

    python scripts/finetune.py --model checkpoints/gen-next-token --data my_images/ --output-dir runs/ft --export my-gen
    python scripts/finetune.py --model ... --data ... --max-minutes 10 --set train.lr=1e-4

The generator keeps its tokenizer, prediction mode and weights; the folder's class names join its vocabulary (new
words start at the mean text embedding) and become its classes. Images are converted to the generator's grayscale
size. Same machinery as scripts/train_ar.py: datasets token cache, atomic checkpoints, resume, sample grids, FD.
"""

from __future__ import annotations

import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))

from train_ar import parser, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--model", required=True, help="a saved generator folder (e.g. checkpoints/gen-next-token)")
    p.add_argument("--data", required=True, help="image folder: one sub-folder of images per class")
    args = p.parse_args(argv)
    import json
    from pathlib import Path

    config = Path(args.model) / "config.json"
    if not config.is_file():
        print(f"error: no generator at {args.model} ({config} is missing)", file=sys.stderr)
        return 2
    try:
        size = json.loads(config.read_text())["visual"]["image_size"]
    except (json.JSONDecodeError, KeyError) as err:
        print(f"error: {args.model} is not a unitok generator ({err})", file=sys.stderr)
        return 2
    data = json.dumps({"source": "folder", "path": args.data, "image_size": size})
    extra = [
        f"init_from={args.model}",
        f"data={data}",
        f"eval_data={data}",
        "train.lr=3e-4",
        "train.warmup_steps=20",
        "train.max_steps=300",
        "train.eval_every=100",
        "train.save_every=100",
        "eval.num_samples=100",
        "output_dir=runs/finetune",
    ]
    return run(args, extra)


if __name__ == "__main__":
    sys.exit(main())
