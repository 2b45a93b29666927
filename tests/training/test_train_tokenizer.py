import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unitok.tokenizers import load_tokenizer
from unitok.tokenizers.training import train_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tokenizer.py"
TINY = [
    "tokenizer.kind=baseline",
    "tokenizer.config={channels: 8, channel_mults: [1, 2, 2], z_channels: 8, quantizer: {type: fsq, levels: [4, 3]}}",
    "data.limit=256",
    "eval_data.limit=64",
    "train.batch_size=16",
    "train.warmup_steps=5",
    "train.eval_every=1000",
    "train.threads=1",
]


def _run(out, *extra):
    args = [sys.executable, str(SCRIPT), "--output-dir", str(out)]
    for item in TINY:
        args += ["--set", item]
    return args + list(extra)


def test_training_reduces_the_loss_and_exports(tmp_path):
    from unitok.tokenizers.training import DEFAULTS
    from unitok.training.config import load_config

    cfg = load_config(None, TINY + ["train.max_steps=40", "train.save_every=20"], DEFAULTS)
    cfg["output_dir"], cfg["export_dir"] = str(tmp_path / "run"), str(tmp_path / "export")
    summary = train_tokenizer(cfg)
    assert summary["step"] == 40
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    tok = load_tokenizer(tmp_path / "export")
    assert (tmp_path / "export" / "training.yaml").is_file()
    assert tok.encode(torch.zeros(1, 1, 28, 28)).shape == (1, 7, 7)


def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    steps = ["--max-steps", "60", "--set", "train.save_every=5"]
    subprocess.run(_run(tmp_path / "full", *steps), check=True, capture_output=True, timeout=300)

    proc = subprocess.Popen(_run(tmp_path / "killed", *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "last").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    last = (tmp_path / "killed" / "last").resolve().name
    assert last != "step-0000060", "the run finished before it could be killed; make it longer"
    resumed = subprocess.run(_run(tmp_path / "killed", *steps), check=True, capture_output=True, text=True, timeout=300)
    assert "resumed from" in resumed.stdout + resumed.stderr

    a = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_config_is_a_clear_error(tmp_path):
    out = subprocess.run(_run(tmp_path, "--set", "train.bogus=1"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown train options" in out.stderr
    out = subprocess.run(_run(tmp_path, "--set", "tokenizer.kind=magic"), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown tokenizer kind" in out.stderr


@pytest.mark.parametrize("kind", ["multiscale"])
def test_other_kinds_train(tmp_path, kind):
    from unitok.tokenizers.training import DEFAULTS
    from unitok.training.config import load_config

    cfg = load_config(
        None,
        TINY
        + [
            f"tokenizer.kind={kind}",
            "tokenizer.config={channels: 8, z_channels: 8, scales: [1, 3, 7], quantizer: {type: fsq, levels: [4, 3]}}",
            "train.max_steps=3",
        ],
        DEFAULTS,
    )
    cfg["output_dir"] = str(tmp_path)
    assert train_tokenizer(cfg)["step"] == 3


def test_patch_discriminator_trains_and_resumes(tmp_path):
    from unitok.tokenizers.training import DEFAULTS
    from unitok.training.config import load_config

    base = TINY + ["loss={mse: 1.0, ssim: 0.1, gan: 0.1, gan_start_step: 2}", "train.save_every=3", "train.log_every=1"]
    cfg = load_config(None, base + ["train.max_steps=3"], DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "run")
    train_tokenizer(cfg)
    ckpt = sorted((tmp_path / "run").glob("step-*"))[-1]
    assert (ckpt / "discriminator.pt").is_file()
    cfg = load_config(None, base + ["train.max_steps=5"], DEFAULTS)
    cfg["output_dir"] = str(tmp_path / "run")
    assert train_tokenizer(cfg)["step"] == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gan_steps = [r["step"] for r in records if "loss" in r and "gan" in r]
    assert gan_steps == [3, 4, 5]  # logged steps 1..5; the generator's GAN term starts after gan_start_step
