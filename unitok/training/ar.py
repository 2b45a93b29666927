"""The generator training loop behind ``scripts/train_ar.py`` and ``scripts/finetune.py`` (accelerate + datasets).

1. The dataset is tokenized once by the chosen unitok tokenizer and cached with ``datasets`` (``save_to_disk``) under
   ``cache_dir``, keyed by the tokenizer's weights and the data spec, so later runs and resumes skip encoding.
2. Each step: class labels -> condition prefixes (``condition.drop`` of them replaced by the null condition for
   classifier-free guidance), the mode's teacher-forcing inputs and block-causal mask, cross-entropy of the visual
   slots over the visual vocabulary. AdamW, linear warmup, cosine decay.
3. Every ``eval_every`` steps: class-balanced samples with guidance -> a PNG grid (images) and FD / class accuracy
   against real held-out data (video: per-frame FD and motion FD), logged to ``metrics.jsonl``.
4. Atomic checkpoints every ``save_every`` steps; a new run in the same ``output_dir`` resumes from the last one.
   ``max_minutes`` stops early (and saves). ``export_dir`` receives the final generator folder (see
   :mod:`unitok.model.pretrained`).

``init_from`` (fine-tuning) starts from a saved generator: its tokenizer, mode and weights; class names absent from
its vocabulary are added as new words (their embeddings start at the mean of the known ones).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from unitok.model.configuration import UnitokConfig
from unitok.model.modeling import UnitokForCausalLM
from unitok.model.pretrained import Generator, load_generator, save_generator
from unitok.model.visual import VisualCodec
from unitok.model.vocab import UnitokVocabulary
from unitok.training.checkpoint import latest_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from unitok.training.data import StepSampler, load_arrays
from unitok.training.schedule import lr_lambda

DEFAULTS: dict[str, Any] = {
    "tokenizer": "checkpoints/tokenizer-baseline",
    "init_from": None,
    "mode": "next-token",
    "block": "auto",
    "head": "vocabulary",  # or "bitwise" (binary tokenizers: d binary logits per token, as Infinity)
    "data": {"source": "fashion_mnist", "split": "train"},
    "eval_data": {"source": "fashion_mnist", "split": "test"},
    "model": {
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 688,
    },
    "condition": {"cond_len": None, "drop": 0.1, "class_names": None, "prompts": None},
    "train": {
        "batch_size": 64,
        "lr": 1e-3,
        "min_lr_ratio": 0.05,
        "weight_decay": 0.05,
        "betas": [0.9, 0.95],
        "warmup_steps": 200,
        "max_steps": 4000,
        "max_minutes": None,
        "grad_clip": 1.0,
        "eval_every": 1000,
        "save_every": 500,
        "log_every": 25,
        "seed": 0,
        "threads": None,
        "resume": True,
    },
    "eval": {"num_samples": 500, "guidance_scale": 2.0, "num_real": 5000, "batch_size": 100},
    "output_dir": "runs/ar",
    "export_dir": None,
    "export_dtype": "float16",  # weights of the exported generator (float16 halves bundled checkpoints; loads as fp32)
    "cache_dir": "runs/cache",
}


def class_names_of(spec: dict[str, Any]) -> list[str]:
    """The class names of a ``data`` section (label i is class_names[i])."""
    if "sources" in spec:
        return class_names_of(spec["sources"][0])
    source = spec.get("source")
    if source in ("fashion_mnist", "moving_fashion_mnist"):
        from unitok.data.fashion_mnist import CLASS_NAMES

        return list(CLASS_NAMES)
    if source == "visp":
        from unitok.data.visp import SEQUENCES

        return list(SEQUENCES)
    if source == "folder":
        from unitok.data import load_image_folder

        features = load_image_folder(spec["path"]).features
    elif source == "hf_dataset":
        import datasets

        features = datasets.load_from_disk(spec["path"]).features
    else:
        raise ValueError(f"unknown data source {source!r}")
    label = features.get("label")
    if label is None or not hasattr(label, "names"):
        raise ValueError(f"{spec.get('path')} has no class labels; put images in one sub-folder per class")
    return list(label.names)


def to_pixels(arrays: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W) -> (B, 1, H, W), clips (B, T, H, W) -> (B, T, 1, H, W); float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(arrays)).float() / 127.5 - 1.0
    return x[:, :, None] if x.dim() == 4 else x[:, None]


def _fingerprint(codec: VisualCodec, data_spec: dict) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(codec.tokenizer.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([data_spec, codec.spec.to_dict()], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def pretokenize(codec: VisualCodec, data_spec: dict, cache_dir: str | Path, batch_size: int = 500):
    """(tokens (N, T) int64, labels (N,) int64) of a data section, from the ``datasets`` cache or encoded now."""
    import datasets

    path = Path(cache_dir) / f"tokens-{_fingerprint(codec, data_spec)}"
    if (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path)).with_format("numpy")
        return torch.from_numpy(np.asarray(ds["tokens"])), torch.from_numpy(np.asarray(ds["label"]))
    arrays, labels = load_arrays(data_spec)
    chunks = []
    for i in tqdm(range(0, len(arrays), batch_size), desc="tokenizing", leave=False):
        chunks.append(codec.encode(to_pixels(arrays[i : i + batch_size])))
    tokens = torch.cat(chunks)
    ds = datasets.Dataset.from_dict({"tokens": tokens.numpy(), "label": np.asarray(labels, dtype=np.int64)})
    tmp = path.with_name(path.name + ".tmp")
    ds.save_to_disk(str(tmp))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return tokens, torch.as_tensor(np.asarray(labels, dtype=np.int64))


def build_generator(cfg: dict[str, Any], class_names: list[str], sample_shape: tuple[int, ...]) -> Generator:
    """A fresh generator for ``cfg`` or the one in ``cfg['init_from']`` extended with new class names."""
    from unitok.tokenizers import load_tokenizer

    ccfg = {**DEFAULTS["condition"], **(cfg.get("condition") or {})}
    names = list(ccfg["class_names"] or class_names)
    prompts = list(ccfg["prompts"] or [])
    if cfg.get("init_from"):
        base = load_generator(cfg["init_from"])
        return extend_vocabulary(base, names, prompts, ccfg["cond_len"])
    tokenizer = load_tokenizer(cfg.get("tokenizer") or DEFAULTS["tokenizer"])
    num_frames = sample_shape[0] if len(sample_shape) == 3 else 1
    codec = VisualCodec.create(
        tokenizer, cfg.get("mode", "next-token"), tuple(sample_shape[-2:]), num_frames, block=cfg.get("block", "auto")
    )
    from unitok.model.vocab import words_of

    cond_len = ccfg["cond_len"] or max(len(words_of([n])) for n in [*names, *prompts])
    vocab = UnitokVocabulary.build(prompts, codec.codebook_size, cond_len=cond_len, class_names=names)
    mcfg = {**DEFAULTS["model"], **(cfg.get("model") or {})}
    if mcfg.get("num_block_embeddings") == "auto":  # one per block of the layout (VAR's level embedding)
        mcfg["num_block_embeddings"] = codec.spec.layout(vocab.prefix_len).num_blocks
    head = cfg.get("head", "vocabulary")
    if head not in ("vocabulary", "bitwise"):
        raise ValueError(f"head must be 'vocabulary' or 'bitwise', got {head!r}")
    bits = 0
    if head == "bitwise":
        bits = int(getattr(tokenizer, "bits", 0) or 0)
        if not bits or codec.codebook_size != 1 << bits:
            raise ValueError(
                f"head: bitwise needs a binary tokenizer (LFQ/BSQ with one id per token); got {tokenizer.kind}"
            )
    config = UnitokConfig(
        vocab_size=vocab.text_vocab_size if bits else vocab.vocab_size,
        visual_bits=bits,
        max_position_embeddings=vocab.prefix_len + codec.spec.num_tokens + 64,
        tie_word_embeddings=True,
        bos_token_id=vocab.bos_id,
        eos_token_id=vocab.eoi_id,
        pad_token_id=vocab.pad_id,
        **mcfg,
    )
    config._attn_implementation = "sdpa"
    model = UnitokForCausalLM(config)
    return Generator(model, vocab, codec)


def extend_vocabulary(base: Generator, names: list[str], prompts: list[str], cond_len: int | None) -> Generator:
    """``base`` with the words of new class names / prompts appended to its text vocabulary (visual ids move up;
    the embedding and head rows are copied to their new places, new words start at the mean text embedding)."""
    from unitok.model.vocab import words_of

    old = base.vocab
    cond_len = max(cond_len or 0, old.cond_len, max(len(words_of([n])) for n in [*names, *prompts]))
    vocab = old.extended(prompts, names, cond_len)
    if vocab.text_vocab_size == old.text_vocab_size and cond_len == old.cond_len and names == old.class_names:
        return base
    model = base.model
    emb = model.get_input_embeddings().weight.data
    d = emb.shape[1]
    bitwise = bool(getattr(model.config, "visual_bits", 0))  # bitwise: no visual rows in the vocabulary
    size = vocab.text_vocab_size if bitwise else vocab.vocab_size
    new_emb = torch.empty(size, d)
    new_emb[: old.text_vocab_size] = emb[: old.text_vocab_size]
    new_emb[old.text_vocab_size : vocab.text_vocab_size] = emb[: old.text_vocab_size].mean(0)
    if not bitwise:
        new_emb[vocab.visual_offset :] = emb[old.visual_offset : old.visual_offset + old.num_visual_tokens]
    config = copy.deepcopy(model.config)  # ``base`` keeps a config that matches its own weights
    config.vocab_size = size
    config.max_position_embeddings = max(config.max_position_embeddings, vocab.prefix_len + base.spec.num_tokens + 64)
    fresh = UnitokForCausalLM(config)
    state = {k: v for k, v in model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    fresh.load_state_dict(state, strict=False)
    fresh.get_input_embeddings().weight.data.copy_(new_emb)
    if not config.tie_word_embeddings:
        head = model.lm_head.weight.data
        new_head = new_emb.clone()
        new_head[: old.text_vocab_size] = head[: old.text_vocab_size]
        if not bitwise:
            new_head[vocab.visual_offset :] = head[old.visual_offset : old.visual_offset + old.num_visual_tokens]
        fresh.lm_head.weight.data.copy_(new_head)
    return Generator(fresh, vocab, base.codec)


def ar_loss(gen: Generator, tokens: torch.Tensor, prefix_ids: torch.Tensor) -> torch.Tensor:
    """Teacher-forced cross-entropy of the visual slots over the visual vocabulary."""
    model, visual = gen.model, gen.visual
    layout = gen.layout()
    embed = model.get_input_embeddings()
    inputs = layout.inputs_embeds(embed(prefix_ids), visual.embed(model, tokens), visual.start(model))
    plen = layout.prefix_len
    visual_inputs = visual.add_block_embedding(model, inputs[:, plen:], layout.block_ids[plen:])
    inputs = torch.cat([inputs[:, :plen], visual_inputs], 1)
    batch = tokens.shape[0]
    scores = visual.scores(
        model,
        layout.num_visual,
        inputs_embeds=inputs,
        position_ids=layout.positions[:, None].to(inputs.device),
        attention_mask=layout.attention_mask(0, layout.length, batch).to(inputs.device),
    )
    return visual.loss(scores, tokens)


def evaluate_generator(gen: Generator, real: np.ndarray, ecfg: dict, seed: int = 0, grid_path: Path | None = None):
    """Samples with guidance -> FD / class accuracy (images) or video metrics, plus a PNG grid of the first ones."""
    from unitok.eval.generation import image_scores, real_image_stats, sample_balanced

    was_training = gen.model.training
    gen.model.eval()
    try:
        pixels, labels, timing = sample_balanced(
            gen, int(ecfg["num_samples"]), float(ecfg["guidance_scale"]), int(ecfg["batch_size"]), seed
        )
    finally:
        gen.model.train(was_training)
    if grid_path is not None:
        save_grid(pixels, grid_path, nrow=len(gen.vocab.class_names))
    if gen.spec.is_video:
        from unitok.eval.video import video_metrics

        num_real = min(len(real), int(ecfg["num_real"]))
        scores = video_metrics(pixels[:, :, 0], torch.from_numpy(np.asarray(real[:num_real])))
    else:
        scores = image_scores(
            pixels, labels, real_image_stats(np.asarray(real), int(ecfg["num_real"])), resize=pixels.shape[-1] != 28
        )
        from unitok.data.fashion_mnist import CLASS_NAMES

        if list(gen.vocab.class_names) != list(CLASS_NAMES):  # the classifier only knows Fashion-MNIST's classes
            scores.pop("class_acc")
    return {**scores, **timing}


def save_grid(pixels: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """(N, 1, H, W) images or (N, T, 1, H, W) clips in [0, 1] -> one PNG (clips: one row of frames per clip)."""
    from PIL import Image

    x = pixels[:, :, 0] if pixels.dim() == 5 else pixels[:, 0]  # (N, T, H, W) or (N, H, W)
    if x.dim() == 4:
        rows = x[: min(len(x), 2 * nrow)]
        n, t, h, w = rows.shape
        img = rows.permute(0, 2, 1, 3).reshape(n * h, t * w)
    else:
        n = min(len(x), nrow * nrow)
        x = x[:n]
        ncol = nrow
        nrows = math.ceil(n / ncol)
        h, w = x.shape[-2:]
        canvas = torch.zeros(nrows * h, ncol * w)
        for i in range(n):
            r, c = divmod(i, ncol)
            canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = x[i]
        img = canvas
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img.clamp(0, 1) * 255).round().byte().numpy(), mode="L").save(path)


def train_ar(cfg: dict[str, Any]) -> dict[str, Any]:
    from accelerate import Accelerator

    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    for section in ("train", "eval", "condition"):
        extra = set(cfg.get(section) or {}) - set(DEFAULTS[section])
        if extra:
            raise ValueError(f"unknown {section} options {sorted(extra)}; known: {sorted(DEFAULTS[section])}")
    tcfg = {**DEFAULTS["train"], **(cfg.get("train") or {})}
    ecfg = {**DEFAULTS["eval"], **(cfg.get("eval") or {})}
    ccfg = {**DEFAULTS["condition"], **(cfg.get("condition") or {})}
    if not 0 <= float(ccfg["drop"]) < 1:
        raise ValueError(f"condition.drop must be in [0, 1), got {ccfg['drop']}")
    out_dir = Path(cfg.get("output_dir") or DEFAULTS["output_dir"])
    if tcfg["threads"]:
        torch.set_num_threads(int(tcfg["threads"]))
    torch.manual_seed(tcfg["seed"])

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    data_spec = cfg.get("data") or DEFAULTS["data"]
    eval_spec = cfg.get("eval_data") or DEFAULTS["eval_data"]
    probe, _ = load_arrays({**data_spec, "limit": 1} if "sources" not in data_spec else data_spec)
    gen = build_generator(cfg, class_names_of(data_spec), tuple(probe.shape[1:]))
    tokens, labels = pretokenize(gen.codec, data_spec, cfg.get("cache_dir") or DEFAULTS["cache_dir"])
    if int(labels.max()) >= len(gen.vocab.class_names):
        raise ValueError(f"labels reach {int(labels.max())} but there are {len(gen.vocab.class_names)} class names")
    real, _ = load_arrays({**eval_spec, "limit": int(ecfg["num_real"])})
    model = gen.model
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg["lr"],
        betas=tuple(tcfg["betas"]),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(tcfg["warmup_steps"], tcfg["max_steps"], tcfg["min_lr_ratio"])
    )

    step = 0
    ckpt = latest_checkpoint(out_dir) if tcfg["resume"] else None
    if ckpt is not None:
        from safetensors.torch import load_file

        state_dict = load_file(str(ckpt / "model.safetensors"))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        if unexpected or any("lm_head" not in k for k in missing):
            raise ValueError(f"checkpoint {ckpt} does not fit this config: missing {missing}, unexpected {unexpected}")
        state = load_trainer_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        # The optimizer state holds the LR the saved run's schedule set for this step; a resume with another
        # max_steps (or warmup) must continue on the new schedule from this very step, not one step later.
        for group, base_lr, fn in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas, strict=True):
            group["lr"] = base_lr * fn(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in opt.param_groups]
        set_rng_state(state["rng"])
        step = state["step"]
        accelerator.print(f"resumed from {ckpt} at step {step}")

    model, opt = accelerator.prepare(model, opt)
    gen.model = accelerator.unwrap_model(model)
    sampler = StepSampler(len(tokens), tcfg["batch_size"], tcfg["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "metrics.jsonl"

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint() -> None:
        if accelerator.is_main_process:
            state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step, "rng": rng_state()}
            save_checkpoint(out_dir, f"step-{step:07d}", accelerator.unwrap_model(model), state)

    drop_rng = torch.Generator().manual_seed(tcfg["seed"] + 1)
    start = time.perf_counter()
    deadline = start + 60 * tcfg["max_minutes"] if tcfg["max_minutes"] else math.inf
    model.train()
    bar = tqdm(total=tcfg["max_steps"], initial=step, disable=not accelerator.is_main_process, desc=gen.spec.mode)
    tokens_seen = 0
    last_eval: dict = {}
    while step < tcfg["max_steps"] and time.perf_counter() < deadline:
        idx = torch.from_numpy(sampler.indices(step))
        batch_tokens = tokens[idx].to(accelerator.device)
        drop_rng.manual_seed(tcfg["seed"] * 1_000_003 + step)  # a pure function of the step: resumes reproduce it
        drop = torch.rand(len(idx), generator=drop_rng) < float(ccfg["drop"])
        prefix = gen.vocab.class_prefix_ids(labels[idx], drop).to(accelerator.device)
        loss = ar_loss(gen, batch_tokens, prefix)
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if tcfg["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        opt.step()
        sched.step()
        step += 1
        tokens_seen += batch_tokens.numel()
        bar.update(1)
        if step % tcfg["log_every"] == 0 or step == 1:
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            log({"step": step, "loss": float(loss.detach()), "lr": sched.get_last_lr()[0]})
        if step % tcfg["eval_every"] == 0:
            last_eval = evaluate_generator(
                gen, real, ecfg, seed=tcfg["seed"], grid_path=out_dir / f"samples-{step:07d}.png"
            )
            log({"step": step, "eval": last_eval})
            accelerator.print(
                f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in last_eval.items() if isinstance(v, float))
            )
        if step % tcfg["save_every"] == 0:
            checkpoint()
    bar.close()
    elapsed = time.perf_counter() - start
    checkpoint()
    final = evaluate_generator(gen, real, ecfg, seed=tcfg["seed"], grid_path=out_dir / "samples-final.png")
    summary = {
        "step": step,
        "minutes": round(elapsed / 60, 2),
        "tokens_per_s": round(tokens_seen / max(elapsed, 1e-9), 1),
        "parameters": sum(p.numel() for p in gen.model.parameters()),
        "eval": final,
        "output_dir": str(out_dir),
    }
    log({"step": step, "final": summary})
    if cfg.get("export_dir") and accelerator.is_main_process:
        import yaml

        dtype = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[
            str(cfg.get("export_dtype") or "float16")
        ]
        save_generator(
            cfg["export_dir"],
            gen,
            {"training.yaml": yaml.safe_dump({"config": cfg, "summary": summary}, sort_keys=False)},
            dtype,
        )
        summary["export_dir"] = str(cfg["export_dir"])
    return summary
