"""A saved generator's transformer loads with trust_remote_code=True in a process where ``import unitok`` fails."""

import json
import subprocess
import sys
import textwrap

import torch

from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.remote import export_remote_code


def test_remote_code_loads_without_unitok(tmp_path):
    torch.manual_seed(0)
    config = UnitokConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        visual_bits=4,
    )
    model = UnitokForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "m")
    export_remote_code(tmp_path / "m")
    assert "auto_map" in json.loads((tmp_path / "m" / "config.json").read_text())
    ids = torch.arange(12)[None] % 40
    positions = torch.stack([torch.arange(12.0)[None], torch.arange(12.0)[None] / 2, torch.arange(12.0)[None] / 3])
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions).logits
    torch.save({"ids": ids, "positions": positions, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "unitok" or name.startswith("unitok."):
                    raise ImportError("unitok is blocked in this process")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "m")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "unitok" not in sys.modules
        with torch.no_grad():
            got = model(input_ids=io["ids"], position_ids=io["positions"]).logits
        torch.testing.assert_close(got, io["expected"])
        print("ok")
    """)
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_export_needs_a_saved_model(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError):
        export_remote_code(tmp_path)
