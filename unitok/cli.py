"""The ``unitok`` command line: ``unitok data info``, ``generate``, ``bench <suite>``, ``serve PATH``, ``demo``.

Heavy imports happen inside the command that needs them, so ``unitok --help`` answers at once. User errors
(bad paths, bad options, missing data packages) print one ``error:`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
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
    _save_generations(out)


def _save_generations(out: Path) -> None:
    """The main job: class-conditional samples from every bundled generator (one row per class), and video clips."""
    from unitok.bench.generation import CHECKPOINT_ROOT
    from unitok.pipeline import UnitokPipeline, image_grid, save_gif

    if not any(CHECKPOINT_ROOT.glob("gen-*/config.json")):
        print(f"no bundled generators in {CHECKPOINT_ROOT} (train one with scripts/train_ar.py)")
        return
    pipe = UnitokPipeline.from_pretrained(CHECKPOINT_ROOT)
    for mode, video in pipe.available:
        names = pipe.class_names(mode, video)
        if video:
            result = pipe(names, num_images=len(names), mode=mode, video=True, seed=0)
            frames = [
                image_grid([clip[t] for clip in result.videos], ncol=len(names)) for t in range(len(result.videos[0]))
            ]
            path = save_gif(frames, out / f"generated-video-{mode}.gif", scale=1)
            print(
                f"wrote {path}: one clip per class, {result.forward_passes:g} forward passes per clip, "
                f"{result.seconds:.1f} s"
            )
            continue
        per_class = 8
        labels = [c for c in range(len(names)) for _ in range(per_class)]
        result = pipe(labels, num_images=len(labels), mode=mode, seed=0)
        path = out / f"generated-{mode}.png"
        image_grid(result.images, ncol=per_class).save(path)
        print(
            f"wrote {path}: {per_class} samples per class (rows: {', '.join(names)}), {mode}, "
            f"{result.forward_passes:g} forward passes per image, {result.seconds:.1f} s for {len(labels)} images"
        )


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


def _cmd_generate(args: argparse.Namespace) -> None:
    from unitok.pipeline import UnitokPipeline, image_grid, save_gif

    pipe = UnitokPipeline.from_pretrained(args.model)
    video = args.video
    gen = pipe.generator(args.mode, video)
    prompts = args.prompt or list(gen.vocab.class_names)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for prompt in prompts:
        result = pipe(
            prompt,
            num_images=args.num_images,
            mode=args.mode,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            video=video,
            decoder=args.decoder,
            guidance_ramp=args.guidance_ramp,
            guidance_interval=tuple(args.guidance_interval),
            **_decoder_options(args),
        )
        slug = "".join(ch if ch.isalnum() else "_" for ch in str(prompt)).strip("_") or "prompt"
        if video:
            for i, frames in enumerate(result.videos):
                path = save_gif(frames, out / f"{slug}-{i}.gif")
                print(f"wrote {path} ({len(frames)} frames, {result.forward_passes:g} forward passes per clip)")
        else:
            rows.extend(result.images)
            print(
                f"{prompt}: {args.num_images} images, {result.forward_passes:g} forward passes each, "
                f"{result.seconds:.2f} s"
            )
    if rows:
        path = out / f"{gen.spec.mode}.png"
        image_grid(rows, ncol=args.num_images).save(path)
        print(f"wrote {path} (one row per prompt: {', '.join(map(str, prompts))})")


def _serve_vllm_options(args: argparse.Namespace) -> dict:
    """``VllmImageEngine.start`` options from ``unitok serve``'s flags; a bad combination is a ValueError here, before
    anything starts."""
    options = {
        "enforce_eager": args.enforce_eager,
        "per_request_guidance": args.per_request_guidance,
        "nice": args.vllm_nice,
    }
    if args.vllm_draft is None:
        return options
    if args.backend == "native":
        raise ValueError("--vllm-draft speculates inside vLLM; it needs --backend vllm or auto")
    if args.per_request_guidance:
        raise ValueError("--vllm-draft does not combine with --per-request-guidance (the draft guides with one scale)")
    from unitok.serving.vllm_engine import SpeculativeDraft

    options["draft"] = SpeculativeDraft(args.vllm_draft, args.vllm_draft_tokens)
    return options


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from unitok.serving.server import create_app

    vllm_options = _serve_vllm_options(args)
    app = create_app(
        args.path,
        backend=args.backend,
        max_n=args.max_n,
        max_queue=args.max_queue,
        max_batch_images=args.max_batch,
        draft_model=args.draft_model,
        vllm_options=vllm_options,
        api_key=args.api_key,
    )
    # keep-alive past the clients' own 5 s expiry, so a reused idle connection never races the server closing it
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_keep_alive=30)


def _decoder_options(args: argparse.Namespace) -> dict:
    """The options of the chosen decoder that were given on the command line (the rest keep their defaults)."""
    names = {
        "sjd": ("window", "init"),
        "grouped": ("window", "init", "group_size", "min_p"),
        "relaxed": ("window", "init", "delta", "min_p"),
        "draft": ("draft_model", "gamma"),
    }.get(args.decoder, ())
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


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

    gen = sub.add_parser("generate", help="generate images (PNG grid) or clips (GIF) from a trained generator")
    gen.add_argument("--model", default="checkpoints", help="a generator folder or a folder of gen-<mode> folders")
    gen.add_argument("--prompt", action="append", help="class name or prompt (repeatable; default: every class)")
    gen.add_argument("--num-images", type=int, default=8, help="samples per prompt (default 8)")
    gen.add_argument("--mode", choices=["next-token", "next-scale", "next-block"], default=None)
    gen.add_argument("--video", action="store_true", help="use the video generator and write GIF clips")
    gen.add_argument("--guidance-scale", type=float, help="classifier-free guidance (1 = off; default: the model's)")
    gen.add_argument("--temperature", type=float, help="default: the model's recommended setting")
    gen.add_argument("--top-k", type=int, help="default: the model's recommended setting")
    gen.add_argument("--top-p", type=float, help="default: the model's recommended setting")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--decoder",
        choices=["block", "sjd", "grouped", "relaxed", "draft", "hf"],
        default="block",
        help="decoding algorithm (default block; see unitok/decoding/)",
    )
    gen.add_argument("--guidance-ramp", choices=["constant", "linear"], default="constant", help="guidance schedule")
    gen.add_argument(
        "--guidance-interval",
        nargs=2,
        type=float,
        default=(0.0, 1.0),
        metavar=("LO", "HI"),
        help="guide only tokens whose progress through the sample lies in [LO, HI] (default 0 1)",
    )
    gen.add_argument("--window", type=int, help="sjd/grouped/relaxed: tokens verified per forward")
    gen.add_argument("--init", choices=["random", "spatial", "temporal"], help="sjd/grouped/relaxed: fresh drafts")
    gen.add_argument("--delta", type=float, help="relaxed: total-variation bound of the relaxation")
    gen.add_argument("--group-size", type=int, help="grouped: codes per acceptance group")
    gen.add_argument(
        "--min-p", type=float, help="grouped/relaxed: a neighbour counts if its probability >= min_p x the top one's"
    )
    gen.add_argument("--draft-model", help="draft: a small generator folder trained on the same tokenizer")
    gen.add_argument("--gamma", type=int, help="draft: tokens proposed per target forward (default 4)")
    gen.add_argument("--out", default="generated", help="output folder (default: generated)")
    gen.set_defaults(func=_cmd_generate)

    serve = sub.add_parser("serve", help="OpenAI-compatible image/video server (FastAPI) over generator folders")
    serve.add_argument("path", help="a generator folder or a folder of gen-<mode> folders (e.g. checkpoints)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--backend",
        choices=["auto", "native", "vllm"],
        default="auto",
        help="next-token models: vLLM's AsyncLLM (auto: when vllm imports) or the native batching engine",
    )
    serve.add_argument(
        "--enforce-eager",
        action="store_true",
        help="vLLM without torch.compile: starts in ~20 s instead of ~50 s, decodes ~30%% slower on CPU",
    )
    serve.add_argument(
        "--per-request-guidance",
        action="store_true",
        help="vLLM serves every guidance_scale (2-17%% slower on CPU); without it, vLLM guides with the checkpoint's "
        "scale and requests asking for another are served by the native engine",
    )
    serve.add_argument(
        "--vllm-nice",
        type=int,
        default=5,
        help="raise vLLM's engine core niceness by this much (0..19, default 5), so HTTP handling and pixel "
        "decoding preempt its steps (more images/s under concurrent clients on few cores); 0 keeps it equal",
    )
    serve.add_argument(
        "--vllm-draft",
        metavar="FOLDER",
        help="speculative decoding inside vLLM with this unitok draft generator (e.g. PATH/gen-draft): exact for "
        "greedy and sampled requests, seeds reproducible; for GPUs (on 2 CPU cores it is 2-3.5x slower)",
    )
    serve.add_argument(
        "--vllm-draft-tokens", type=int, default=4, help="--vllm-draft: tokens drafted per step (1..16, default 4)"
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("UNITOK_API_KEY"),
        help="require this key as a Bearer token on /v1/ requests (default: $UNITOK_API_KEY; unset: open)",
    )
    serve.add_argument("--max-n", type=int, default=16, help="samples per request (default 16)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests admitted at once; more get 429")
    serve.add_argument("--max-batch", type=int, default=64, help="samples per native batch (default 64)")
    serve.add_argument("--draft-model", help="draft generator for decoder=draft (default: PATH/gen-draft)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_cmd_serve)

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
