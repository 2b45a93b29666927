"""What the vLLM path reads from a generator folder, and its MM-RoPE table against the HF rotary embedding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unitok.model.pretrained import load_generator
from unitok.serving.vllm_spec import ImageSpec

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
NEXT_TOKEN = CHECKPOINTS / "gen-next-token"

needs_checkpoints = pytest.mark.skipif(not (NEXT_TOKEN / "config.json").is_file(), reason="no bundled generators")


@needs_checkpoints
def test_spec_matches_the_generator():
    gen = load_generator(NEXT_TOKEN)
    spec = ImageSpec.from_pretrained(NEXT_TOKEN)
    layout = gen.layout()
    assert spec.prefix_len == layout.prefix_len and spec.num_visual == layout.num_visual
    assert spec.null_prefix_ids == tuple(gen.vocab.prefix_ids([None])[0].tolist())
    assert (spec.visual_offset, spec.num_visual_tokens, spec.boi_id) == (
        gen.visual.offset,
        gen.visual.size,
        gen.visual.boi_id,
    )
    assert spec.guidance_scale == gen.sampling_defaults()["guidance_scale"]
    assert ImageSpec.from_pretrained(NEXT_TOKEN, guidance_scale=1.5).guidance_scale == 1.5
    assert torch.equal(spec.rope_positions(layout.length), layout.positions.t())
    beyond = spec.rope_positions(layout.length + 3)[layout.length :]  # past the image: 1-D text positions
    assert torch.equal(beyond, torch.arange(layout.length, layout.length + 3).float()[:, None].expand(-1, 3))
    prefix = gen.vocab.prefix_ids(["sneaker"])[0].tolist()
    assert spec.prompt(prefix) == [*prefix, gen.visual.boi_id]
    assert spec.max_model_len == len(spec.prompt(prefix)) + spec.num_visual


@needs_checkpoints
def test_spec_refuses_what_vllm_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="next-token"):
        ImageSpec.from_pretrained(CHECKPOINTS / "gen-next-scale")
    with pytest.raises(ValueError, match="next-token"):
        ImageSpec.from_pretrained(CHECKPOINTS / "gen-next-block")
    with pytest.raises(ValueError, match="guidance_scale"):
        ImageSpec.from_pretrained(NEXT_TOKEN, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="missing"):
        ImageSpec.from_pretrained(tmp_path)
    spec = ImageSpec.from_pretrained(NEXT_TOKEN)
    with pytest.raises(ValueError, match="prefix has"):
        spec.prompt([spec.null_prefix_ids[0]])
    with pytest.raises(ValueError, match="BOS"):
        spec.prompt([spec.boi_id, *spec.null_prefix_ids[1:]])


@pytest.mark.vllm
@needs_checkpoints
def test_rotary_table_equals_hf_mm_rope():
    """Row p of vLLM's cos/sin table is exactly HF's MM-RoPE at sequence index p (then vLLM's neox kernel applies it
    the way transformers' ``apply_rotary_pos_emb`` does)."""
    pytest.importorskip("vllm", exc_type=ImportError)
    from vllm.config import VllmConfig, set_current_vllm_config

    from unitok.serving.vllm_model import MMRotaryEmbedding

    gen = load_generator(NEXT_TOKEN)
    config, layout = gen.model.config, gen.layout()
    spec = ImageSpec.from_pretrained(NEXT_TOKEN)
    with set_current_vllm_config(VllmConfig()):  # vLLM's custom ops read it when built
        rotary = MMRotaryEmbedding(
            config.head_dim,
            config.rope_theta,
            config.mm_rope_pattern,
            spec.rope_positions(layout.length),
            torch.float32,
        )
    x = torch.zeros(1, layout.length, config.head_dim)
    cos, sin = gen.model.model.rotary_emb(x, layout.positions[:, None])  # (1, L, head_dim), rotate-half layout
    half = config.head_dim // 2
    assert torch.equal(rotary.cos_sin_cache[:, :half], cos[0, :, :half])
    assert torch.equal(rotary.cos_sin_cache[:, half:], sin[0, :, :half])

    q = torch.randn(layout.length, 2 * config.head_dim)  # two heads
    k = torch.randn(layout.length, config.head_dim)
    q_rot, k_rot = rotary.forward_native(torch.arange(layout.length), q.clone(), k.clone())
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q_hf, k_hf = apply_rotary_pos_emb(
        q.view(1, layout.length, 2, -1).transpose(1, 2), k.view(1, layout.length, 1, -1).transpose(1, 2), cos, sin
    )
    torch.testing.assert_close(q_rot, q_hf.transpose(1, 2).reshape(layout.length, -1))
    torch.testing.assert_close(k_rot, k_hf.transpose(1, 2).reshape(layout.length, -1))


@needs_checkpoints
@pytest.mark.vllm
def test_engine_names_tokens_outside_the_visual_vocabulary():
    """The engine's own check on vLLM's output says which sample, step and id left the visual vocabulary."""
    pytest.importorskip("vllm")
    import asyncio
    from types import SimpleNamespace

    from unitok.serving.vllm_engine import VllmImageEngine

    spec = ImageSpec.from_pretrained(NEXT_TOKEN)
    good = [spec.visual_offset + i for i in range(spec.num_visual)]
    bad = good[:3] + [0] + good[4:]

    class FakeLLM:
        errored = False

        async def generate(self, prompt, params, request_id):
            outputs = [SimpleNamespace(index=1, token_ids=bad), SimpleNamespace(index=0, token_ids=good)]
            yield SimpleNamespace(outputs=outputs)

    engine = VllmImageEngine(FakeLLM(), spec, str(NEXT_TOKEN))
    with pytest.raises(RuntimeError, match=r"n=2, seed=6: 1 of .*\(sample, step, id\): \[\(1, 3, 0\)\]"):
        asyncio.run(engine.sample(list(spec.null_prefix_ids), n=2, seed=6))
