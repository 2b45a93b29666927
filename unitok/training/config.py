"""Training configs: a YAML file, then ``--set key.sub=value`` overrides (values parsed as YAML scalars)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(cfg: dict, assignment: str) -> dict:
    """``"train.lr=3e-4"`` -> cfg["train"]["lr"] = 0.0003 (the value is parsed as YAML)."""
    if "=" not in assignment:
        raise ValueError(f"an override looks like key.sub=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"empty key in override {assignment!r}")
    value = _parse_scalar(raw)
    out = copy.deepcopy(cfg)
    node = out
    for part in parts[:-1]:
        if not isinstance(node.setdefault(part, {}), dict):
            raise ValueError(f"cannot set {key}: {part} is not a section")
        node = node[part]
    node[parts[-1]] = value
    return out


def _parse_scalar(raw: str) -> Any:
    """YAML, except that YAML 1.1 reads "3e-4" as a string; numbers like that become floats."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None, overrides: list[str] | None = None, defaults: dict | None = None) -> dict:
    cfg: dict[str, Any] = copy.deepcopy(defaults or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"cannot parse {path}: {err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"{path} must hold a mapping at the top level")
        cfg = deep_merge(cfg, loaded)
    for assignment in overrides or []:
        cfg = apply_override(cfg, assignment)
    return cfg
