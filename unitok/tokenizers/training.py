"""The tokenizer training loop behind ``scripts/train_tokenizer.py`` (accelerate; any tokenizer kind, any data).

One step: a batch of real images or clips -> ``tokenizer(pixel_values)`` -> reconstruction losses (L2/L1/SSIM,
optional patch-GAN) + the quantizer's own losses -> AdamW with linear warmup and cosine decay. Every
``eval_every`` steps PSNR / SSIM / codebook usage on held-out data are logged to ``metrics.jsonl``; every
``save_every`` steps an atomic checkpoint is written, and a new run in the same ``output_dir`` resumes from the last
one (same batches, same RNG). ``max_steps`` fixes the schedule; ``max_minutes`` stops early but still saves.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from unitok.eval.metrics import codebook_usage, psnr, ssim
from unitok.tokenizers.base import UnitokTokenizer, to_unit_range
from unitok.tokenizers.losses import (
    LossWeights,
    PatchDiscriminator,
    discriminator_loss,
    generator_gan_loss,
    reconstruction_losses,
)
from unitok.training.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from unitok.training.data import StepSampler, load_arrays
from unitok.training.schedule import lr_lambda

DEFAULTS: dict[str, Any] = {
    "tokenizer": {"kind": "baseline", "config": {}},
    "data": {"source": "fashion_mnist", "split": "train"},
    "eval_data": {"source": "fashion_mnist", "split": "test", "limit": 1000},
    "train": {
        "batch_size": 128,
        "lr": 1e-3,
        "min_lr_ratio": 0.05,
        "weight_decay": 0.0,
        "betas": [0.9, 0.99],
        "warmup_steps": 200,
        "max_steps": 3000,
        "max_minutes": None,
        "grad_clip": 1.0,
        "crop": None,
        "eval_every": 500,
        "save_every": 500,
        "log_every": 25,
        "seed": 0,
        "threads": None,
        "resume": True,
    },
    "loss": {},
    "output_dir": "runs/tokenizer",
    "export_dir": None,
}


def build_tokenizer(spec: dict[str, Any]) -> UnitokTokenizer:
    """``{"kind": NAME, "config": {...}}`` -> a fresh tokenizer, or ``{"init_from": PATH}`` -> a saved one."""
    from unitok.tokenizers import TOKENIZERS, load_tokenizer

    if spec.get("init_from"):
        saved = load_tokenizer(spec["init_from"])
        overrides = spec.get("config") or {}
        if not overrides:
            return saved.train()
        # Fine-tune with changed settings that keep the weights' shapes (e.g. other FSQ levels of the same width).
        config = type(saved.config)(**{**saved.config.to_dict(), **overrides})
        model = type(saved)(config)
        # A new quantizer (e.g. VQ in place of FSQ) starts fresh; every other weight must carry over unchanged.
        state = {k: v for k, v in saved.state_dict().items() if not k.startswith("quantizer.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:
            raise ValueError(f"config overrides {overrides} change the weights of {spec['init_from']}: {err}") from err
        foreign = [k for k in [*missing, *unexpected] if not k.startswith("quantizer.")]
        if foreign:
            raise ValueError(f"config overrides {overrides} change the weights of {spec['init_from']}: {foreign}")
        if not any(k.startswith("quantizer.") for k in missing):  # same quantizer weights: keep them too
            model.load_state_dict(saved.state_dict(), strict=True)
        return model
    kind = spec.get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {sorted(TOKENIZERS)}")
    cls = TOKENIZERS[kind]
    return cls(cls.config_class(**(spec.get("config") or {})))


def to_batch(arrays: np.ndarray, video: bool) -> torch.Tensor:
    """uint8 (B, H, W) -> (B, 1, H, W), or clips (B, T, H, W) -> (B, T, 1, H, W); float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(arrays)).float() / 127.5 - 1.0
    return x[:, :, None] if video else x[:, None]


def random_crop(arrays: np.ndarray, size: int, seed: int, step: int) -> np.ndarray:
    """A random ``size`` x ``size`` crop of each image or clip (the same window for every frame of a clip).

    Training convolutional tokenizers on crops is how video tokenizers are trained cheaply: the network is fully
    convolutional, so it encodes full frames at evaluation. Offsets are a pure function of (seed, step), so a
    resumed run sees the crops it would have seen.
    """
    h, w = arrays.shape[-2:]
    if not 1 <= size <= min(h, w):
        raise ValueError(f"train.crop must be between 1 and the data's size {h}x{w}, got {size}")
    rng = np.random.default_rng([seed, step, 7])
    ys = rng.integers(0, h - size + 1, len(arrays))
    xs = rng.integers(0, w - size + 1, len(arrays))
    return np.stack([a[..., y : y + size, x : x + size] for a, y, x in zip(arrays, ys, xs, strict=True)])


@torch.no_grad()
def evaluate(model: UnitokTokenizer, arrays: np.ndarray, batch_size: int = 250) -> dict[str, float]:
    """PSNR / SSIM in [0, 1] space and codebook usage of the tokens, over ``arrays``."""
    was_training = model.training
    model.eval()
    video = model.kind == "video"
    recons, tokens = [], []
    for i in range(0, len(arrays), batch_size):
        out = model(to_batch(arrays[i : i + batch_size], video))
        recons.append(out.reconstruction.clamp(-1, 1).cpu())
        tokens.append(out.tokens.cpu())
    model.train(was_training)
    recon, target = torch.cat(recons), to_batch(arrays, video)
    result = {"psnr": float(psnr(to_unit_range(recon), to_unit_range(target)))}
    if min(target.shape[-2:]) >= 11:
        result["ssim"] = float(ssim(to_unit_range(recon), to_unit_range(target)))
    size = model.codebook_size
    if size <= 1 << 20:
        result["codebook_usage"] = codebook_usage(torch.cat([t.reshape(-1) for t in tokens]), size)
    return result


def train_tokenizer(cfg: dict[str, Any]) -> dict[str, Any]:
    from accelerate import Accelerator

    tcfg = {**DEFAULTS["train"], **(cfg.get("train") or {})}
    unknown = set(tcfg) - set(DEFAULTS["train"])
    if unknown:
        raise ValueError(f"unknown train options {sorted(unknown)}; known: {sorted(DEFAULTS['train'])}")
    weights = LossWeights.from_dict(cfg.get("loss"))
    out_dir = Path(cfg.get("output_dir") or DEFAULTS["output_dir"])
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    torch.manual_seed(tcfg["seed"])

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    data, _ = load_arrays(cfg.get("data") or DEFAULTS["data"])
    eval_arrays, _ = load_arrays(cfg.get("eval_data") or DEFAULTS["eval_data"])
    model = build_tokenizer(cfg.get("tokenizer") or DEFAULTS["tokenizer"])
    video = model.kind == "video"
    disc = PatchDiscriminator(model.config.in_channels) if weights.gan else None
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], betas=tuple(tcfg["betas"]), weight_decay=tcfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(tcfg["warmup_steps"], tcfg["max_steps"], tcfg["min_lr_ratio"])
    )
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=tcfg["lr"], betas=(0.5, 0.9)) if disc else None

    step = 0
    ckpt = latest_checkpoint(out_dir) if tcfg["resume"] else None
    if ckpt is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=True)
        state = load_trainer_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if disc is not None and (ckpt / "discriminator.pt").is_file():
            disc.load_state_dict(torch.load(ckpt / "discriminator.pt"))
            disc_opt.load_state_dict(state["disc_optimizer"])
        set_rng_state(state["rng"])
        step = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")

    model, opt = accelerator.prepare(model, opt)
    if disc is not None:
        disc, disc_opt = accelerator.prepare(disc, disc_opt)
    sampler = StepSampler(len(data), tcfg["batch_size"], tcfg["seed"])
    log_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        if not accelerator.is_main_process:
            return
        state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "rng": rng_state()}
        extra = {}
        if disc is not None:
            state["disc_optimizer"] = disc_opt.state_dict()
            extra["discriminator"] = accelerator.unwrap_model(disc)
        save_checkpoint(out_dir, f"step-{step:07d}", accelerator.unwrap_model(model), state, extra)

    start = time.perf_counter()
    deadline = start + 60 * tcfg["max_minutes"] if tcfg["max_minutes"] else math.inf
    model.train()
    bar = tqdm(total=tcfg["max_steps"], initial=step, disable=not accelerator.is_main_process, desc="tokenizer")
    images_seen = 0
    while step < tcfg["max_steps"] and time.perf_counter() < deadline:
        batch = data[sampler.indices(step)]
        if tcfg["crop"]:
            batch = random_crop(batch, int(tcfg["crop"]), seed=tcfg["seed"], step=step)
        x = to_batch(batch, video).to(accelerator.device)
        out = model(x)
        terms = reconstruction_losses(out.reconstruction, x, weights)
        terms.update(out.losses or {})
        use_gan = disc is not None and step >= weights.gan_start_step
        if use_gan:
            terms["gan"] = weights.gan * generator_gan_loss(disc, out.reconstruction)
        loss = torch.stack(list(terms.values())).sum()
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if tcfg["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        opt.step()
        sched.step()
        if use_gan:
            d_loss = discriminator_loss(disc, x, out.reconstruction)
            disc_opt.zero_grad(set_to_none=True)
            accelerator.backward(d_loss)
            disc_opt.step()
        step += 1
        images_seen += len(x)
        bar.update(1)
        if step % tcfg["log_every"] == 0 or step == 1:
            metrics = {k: float(v) for k, v in (out.metrics or {}).items()}
            record = {
                "step": step,
                "loss": float(loss.detach()),
                **{k: float(v.detach()) for k, v in terms.items()},
                **metrics,
            }
            record["lr"] = sched.get_last_lr()[0]
            bar.set_postfix(loss=f"{float(loss):.4f}", **{k: f"{v:.3g}" for k, v in metrics.items()})
            log(record)
        if step % tcfg["eval_every"] == 0:
            result = evaluate(accelerator.unwrap_model(model), eval_arrays)
            log({"step": step, "eval": result})
            accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if step % tcfg["save_every"] == 0:
            checkpoint()
    bar.close()
    elapsed = time.perf_counter() - start
    checkpoint()
    unwrapped = accelerator.unwrap_model(model)
    final = evaluate(unwrapped, eval_arrays)
    summary = {
        "step": step,
        "minutes": round(elapsed / 60, 2),
        "items_per_s": round(images_seen / max(elapsed, 1e-9), 1),
        "eval": final,
        "output_dir": str(out_dir),
    }
    log({"step": step, "final": summary})
    if cfg.get("export_dir") and accelerator.is_main_process:
        export(unwrapped, Path(cfg["export_dir"]), summary, cfg)
        summary["export_dir"] = str(cfg["export_dir"])
    return summary


def export(model: UnitokTokenizer, path: Path, summary: dict, cfg: dict) -> None:
    """Write the trained tokenizer (weights + config + how it was trained) to ``path`` atomically."""
    import shutil

    import yaml

    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    (tmp / "training.yaml").write_text(yaml.safe_dump({"config": cfg, "summary": summary}, sort_keys=False))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
