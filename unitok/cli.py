"""The ``unitok`` command line: ``unitok data info``, ``unitok bench <suite>``, ``unitok demo``.

Heavy imports happen inside the command that needs them, so ``unitok --help`` answers at once. User errors
(bad paths, bad options, missing data packages) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from unitok import __version__
from unitok.bench import SUITES


def _write_json(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=2, default=float)
    if path is None:
        print(text)
        return
    path = Path(path)
    if path.exists() and path.is_dir():
        raise ValueError(f"--json must be a file path, got a directory: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def _cmd_data_info(args: argparse.Namespace) -> None:
    from unitok.data import data_info

    _write_json(data_info(), args.json)


def _cmd_bench(args: argparse.Namespace) -> None:
    module = importlib.import_module(SUITES[args.suite].module)
    result = module.run(args)
    _write_json(result, args.json)


def _cmd_demo(args: argparse.Namespace) -> None:
    from unitok.bench import eval as bench_eval
    from unitok.data import data_info

    out = Path(args.out)
    info = data_info()
    _write_json(info, out / "data_info.json")
    fm, mv, vs = info["fashion_mnist"], info["moving_fashion_mnist"], info["visp"]
    classes = len(fm["classes"])
    print(f"Fashion-MNIST: {fm['train']} train / {fm['test']} test images of {fm['image_size']}, {classes} classes")
    print(f"Moving Fashion-MNIST: {mv['train']} train / {mv['test']} test clips of {mv['clip_shape']}")
    print(f"ViSP real video: {vs['sequences']} sequences, {vs['frames']} frames, clips {vs['clips']}")
    report = bench_eval.run(argparse.Namespace(n=5000, seed=0))
    _write_json(report, out / "bench_eval.json")
    print(
        f"eval classifier test accuracy {report['classifier_test_acc']:.4f}; FD train-vs-test "
        f"{report['fd_train_vs_test']:.2f}, +noise {report['fd_noise']:.1f}, blur {report['fd_blur']:.1f}, "
        f"shuffled {report['fd_shuffled']:.1f} (n={report['n']})"
    )
    _save_demo_grid(out / "fashion_mnist_test.png")
    _save_reconstructions(out / "tokenizers.png")


def _save_reconstructions(path: Path) -> None:
    """One row of real test images, then one row per bundled image tokenizer reconstructing them."""
    import numpy as np
    import torch
    from PIL import Image

    from unitok.bench.tokenizers import BUNDLED, CHECKPOINT_ROOT
    from unitok.data import load_fashion_mnist
    from unitok.eval.metrics import psnr
    from unitok.tokenizers import load_tokenizer, to_pixel_values, to_uint8, to_unit_range

    test = load_fashion_mnist("test")
    images = np.stack([test.images[np.flatnonzero(test.labels == c)[0]] for c in range(10)])  # one per class
    x = to_pixel_values(images)
    rows = [images]
    for name, folder in BUNDLED.items():
        ckpt = CHECKPOINT_ROOT / folder
        if name == "video" or not (ckpt / "config.json").is_file():
            continue
        tok = load_tokenizer(ckpt)
        with torch.inference_mode():
            recon = tok.decode(tok.encode(x)).clamp(-1, 1)
        rows.append(to_uint8(recon)[:, 0])
        quality = float(psnr(to_unit_range(recon), to_unit_range(x)))
        print(f"{name:>10} tokenizer: {tok.tokens_per_image()} tokens per image, PSNR {quality:.1f} dB on these 10")
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.Resampling.NEAREST).save(path)
    print(f"wrote {path} (top row: real test images; below: each bundled tokenizer's reconstruction)")


def _save_demo_grid(path: Path) -> None:
    import numpy as np
    from PIL import Image

    from unitok.data import load_fashion_mnist

    test = load_fashion_mnist("test")
    rows = [test.images[np.flatnonzero(test.labels == c)[:10]] for c in range(10)]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)  # (280, 280)
    Image.fromarray(grid).resize((560, 560), Image.Resampling.NEAREST).save(path)
    print(f"wrote {path} (10 real test images per class, one class per row)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unitok", description="Autoregressive visual generation with discrete tokens."
    )
    parser.add_argument("--version", action="version", version=f"unitok {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = sub.add_parser("data", help="inspect the bundled real data sources")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = data_sub.add_parser("info", help="counts and shapes of every data source")
    info.add_argument("--json", type=Path, default=None, help="write the result here (default: stdout)")
    info.set_defaults(func=_cmd_data_info)

    bench = sub.add_parser("bench", help="run a benchmark suite and write JSON")
    bench_sub = bench.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name, spec in SUITES.items():
        suite = bench_sub.add_parser(name, help=spec.help, description=spec.help)
        suite.add_argument("--json", type=Path, default=None, help="write the result here (default: stdout)")
        for flag, kwargs in spec.options.items():
            suite.add_argument(flag, **kwargs)
        suite.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="the main job on the bundled defaults")
    demo.add_argument("--out", default="demo_out", help="folder for the demo's outputs (default: demo_out)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
