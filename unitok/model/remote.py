"""Make a saved transformer loadable with ``trust_remote_code=True`` where unitok is not installed.

``export_remote_code(folder)`` copies the three source files that define the model (configuration, MM-RoPE,
modeling) into the folder with their ``unitok.model.*`` imports rewritten as relative ones, and adds the
``auto_map`` that transformers' dynamic modules read. The copies are the same code the package runs, so both
loaders build the same model (tested by comparing logits in a process where ``import unitok`` fails).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_SOURCES = {
    "configuration": "configuration_unitok.py",
    "mm_rope": "mm_rope_unitok.py",
    "modeling": "modeling_unitok.py",
}
AUTO_MAP = {
    "AutoConfig": "configuration_unitok.UnitokConfig",
    "AutoModel": "modeling_unitok.UnitokModel",
    "AutoModelForCausalLM": "modeling_unitok.UnitokForCausalLM",
}
_IMPORT = re.compile(r"^from unitok\.model\.(\w+) import", re.MULTILINE)


def _rewrite(source: str) -> str:
    def relative(match: re.Match) -> str:
        module = match.group(1)
        if module not in _SOURCES:
            raise ValueError(f"the model source imports unitok.model.{module}, which is not exported for remote code")
        return f"from .{_SOURCES[module][:-3]} import"

    return _IMPORT.sub(relative, source)


def export_remote_code(folder: str | Path) -> None:
    """Write the model's source files and ``auto_map`` into a saved model folder (``config.json`` must exist)."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no saved model at {folder}: {config_file} is missing")
    package = Path(__file__).resolve().parent
    for module, name in _SOURCES.items():
        (folder / name).write_text(_rewrite((package / f"{module}.py").read_text()))
    config = json.loads(config_file.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
