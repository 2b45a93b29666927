"""Atomic checkpoints and resume.

A checkpoint is a folder: the model's ``save_pretrained`` output plus ``trainer_state.pt`` (optimizer, scheduler,
step, RNG states, extra). It is written to a temporary sibling and renamed into place, so a run killed at any
moment leaves either the previous checkpoint or the new one, never a half-written folder. ``last`` always names
the newest complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(out_dir: Path, name: str, model, state: dict[str, Any], extra_models: dict | None = None) -> Path:
    """Write ``out_dir/name`` atomically and point ``out_dir/last`` at it (also atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    for sub, extra in (extra_models or {}).items():
        torch.save(extra.state_dict(), tmp / f"{sub}.pt")
    torch.save(state, tmp / STATE_FILE)
    if final.exists():
        old = out_dir / f".{name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    link_tmp = out_dir / f".last.tmp-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    link_tmp.symlink_to(name)
    os.replace(link_tmp, out_dir / "last")
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` (via ``last``), or None."""
    last = Path(out_dir) / "last"
    if last.exists() and (last / STATE_FILE).is_file():
        return last.resolve()
    return None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {STATE_FILE} in {ckpt}: not a training checkpoint")
    return torch.load(path, map_location="cpu", weights_only=False)
