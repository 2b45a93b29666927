"""UnitokForCausalLM: Llama parameter names and logits, 4-D masks, KV cache, generate, save/load."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache, StaticCache

from unitok.model import UnitokConfig, UnitokForCausalLM, UnitokModel

VOCAB = 97


def tiny_config(**overrides) -> UnitokConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,  # larger than Llama's 0.02 so positions and masks visibly move the logits
        attn_implementation="eager",
    )
    return UnitokConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> UnitokForCausalLM:
    torch.manual_seed(seed)
    return UnitokForCausalLM(tiny_config(**overrides)).eval()


def llama_twin(model: UnitokForCausalLM, attn_implementation: str = "eager") -> LlamaForCausalLM:
    c = model.config
    config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        attn_implementation=attn_implementation,
    )
    llama = LlamaForCausalLM(config).eval()
    llama.load_state_dict(model.state_dict())
    return llama


def text_positions(batch: int, length: int, start: int = 0) -> torch.Tensor:
    return (torch.arange(length) + start)[None, None].expand(3, batch, length)  # (3, B, L), t = h = w


def visual_positions(batch: int, length: int) -> torch.Tensor:
    """Fractional (t, h, w) positions, not monotonic: what next-scale prediction feeds."""
    generator = torch.Generator().manual_seed(1)
    return torch.rand(3, batch, length, generator=generator) * 8


def block_causal_mask(block_sizes: list[int], batch: int = 1) -> torch.Tensor:
    """(B, 1, L, L) bool: a token sees every earlier block and its whole own block."""
    block = torch.repeat_interleave(torch.arange(len(block_sizes)), torch.tensor(block_sizes))
    mask = block[:, None] >= block[None, :]
    return mask[None, None].expand(batch, 1, -1, -1)


def test_parameter_names_and_shapes_equal_llama():
    model = tiny_model(head_dim=24)
    llama = llama_twin(model)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in llama.state_dict().items()}
    assert ours == theirs
    assert "model.layers.1.self_attn.q_proj.weight" in ours and "lm_head.weight" in ours


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_text_logits_equal_llama(attn: str):
    model = tiny_model(attn_implementation=attn)
    llama = llama_twin(model, attn)
    ids = torch.randint(0, VOCAB, (2, 11))
    want = llama(ids).logits
    torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(ids, position_ids=text_positions(2, 11)).logits, want, atol=1e-5, rtol=1e-5)
    # Left padding: the 2-D mask path is transformers' own.
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    want = llama(ids, attention_mask=mask, position_ids=positions).logits
    got = model(ids, attention_mask=mask, position_ids=positions[None].expand(3, -1, -1)).logits
    torch.testing.assert_close(got[0, 3:], want[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)


def test_mm_rope_off_equals_llama_whatever_h_and_w():
    model = tiny_model(mm_rope=False)
    llama = llama_twin(model)
    ids = torch.randint(0, VOCAB, (2, 9))
    positions = visual_positions(2, 9)
    positions[0] = torch.arange(9)
    torch.testing.assert_close(model(ids, position_ids=positions).logits, llama(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tiny_model()(ids, position_ids=positions).logits, llama(ids).logits, atol=1e-3)


def test_block_causal_mask_eager_equals_sdpa():
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = block_causal_mask([1, 4, 5], batch=2)
    positions = visual_positions(2, 10)
    logits = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=attn)
        logits[attn] = model(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits["eager"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    eager = tiny_model()
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(
        eager(ids, attention_mask=additive, position_ids=positions).logits, logits["eager"], atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_block_causal_mask_sees_own_block_not_later_ones(attn: str):
    model = tiny_model(attn_implementation=attn)
    ids = torch.randint(0, VOCAB, (1, 10))
    mask = block_causal_mask([1, 4, 5])
    logits = model(ids, attention_mask=mask).logits
    same_block = ids.clone()
    same_block[0, 4] = (ids[0, 4] + 1) % VOCAB  # last token of block 1 (tokens 1-4)
    changed = model(same_block, attention_mask=mask).logits
    assert not torch.allclose(changed[0, 1], logits[0, 1], atol=1e-4)  # token 1 sees token 4 in its block
    torch.testing.assert_close(changed[0, 0], logits[0, 0])  # block 0 does not see block 1
    torch.testing.assert_close(model(ids).logits[0, :1], logits[0, :1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mm", [False, True])
def test_kv_cached_steps_equal_full_forward(mm: bool):
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 9))
    positions = visual_positions(2, 9) if mm else None
    full = model(ids, position_ids=positions).logits
    cache = DynamicCache(config=model.config)
    steps = []
    for i in range(9):
        step_positions = positions[..., i : i + 1] if mm else None
        out = model(ids[:, i : i + 1], position_ids=step_positions, past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_block_mask_with_cache_equals_full_forward(cache_kind: str, attn: str):
    """Next-block decoding: prefill two blocks, then feed the last block with its rows of the mask."""
    model = tiny_model(attn_implementation=attn)
    ids = torch.randint(0, VOCAB, (2, 10))
    positions = visual_positions(2, 10)
    mask = block_causal_mask([1, 4, 5], batch=2)
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    if cache_kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=16)
    first = model(
        ids[:, :5], attention_mask=mask[:, :, :5, :5], position_ids=positions[..., :5], past_key_values=cache
    ).logits
    second = model(
        ids[:, 5:], attention_mask=mask[:, :, 5:, :], position_ids=positions[..., 5:], past_key_values=cache
    ).logits
    torch.testing.assert_close(torch.cat([first, second], dim=1), full, atol=1e-5, rtol=1e-5)


def greedy_reference(model: UnitokForCausalLM, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """The nanoGPT loop: full forward without cache, argmax of the last logits."""
    for _ in range(steps):
        next_id = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    return ids


@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_greedy_equals_manual_loop(cache_implementation: str, attn: str):
    model = tiny_model(attn_implementation=attn)
    ids = torch.randint(0, VOCAB, (2, 5))
    want = greedy_reference(model, ids, steps=6)
    got = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        cache_implementation=cache_implementation,
    )
    assert torch.equal(got, want)


def test_generate_left_padded_batch_equals_llama():
    model = tiny_model()
    llama = llama_twin(model)
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), llama.generate(ids, **kwargs))


def test_save_and_auto_load_round_trip(tmp_path):
    model = tiny_model(head_dim=24, image_token_offset=64)
    ids = torch.randint(0, VOCAB, (1, 8))
    positions = visual_positions(1, 8)
    want = model(ids, position_ids=positions).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert isinstance(loaded, UnitokForCausalLM)
    # The rotary tables are non-persistent: from_pretrained must rebuild them, not leave meta-device garbage.
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert torch.equal(loaded.model.rotary_emb.axis, model.model.rotary_emb.axis)
    assert loaded.config.image_token_offset == 64
    torch.testing.assert_close(loaded(ids, position_ids=positions).logits, want, atol=0, rtol=0)


def test_loss_is_shifted_cross_entropy_and_logits_to_keep():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 7))
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, out.logits[:, -1:])


def test_tied_embeddings_and_base_model():
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.manual_seed(0)
    base = UnitokModel(tiny_config())
    hidden = base(torch.randint(0, VOCAB, (1, 4)), output_hidden_states=True)
    assert hidden.last_hidden_state.shape == (1, 4, 64)
    assert len(hidden.hidden_states) == 3


def test_bad_positions_and_masks_raise():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=torch.zeros(2, 2, 6))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="position_ids must be"):
        model(ids, position_ids=torch.zeros(6))
    with pytest.raises(ValueError, match="4-D attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        model(ids, attention_mask=torch.ones(2, 1, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="2-D padding masks"):
        model(ids, attention_mask=block_causal_mask([2, 4], batch=2))
