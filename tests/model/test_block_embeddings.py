"""VAR-style block (level) embeddings: the block decoder and the training loss add the same embedding per slot."""

import pytest
import torch

from unitok.decoding.block import decode_blocks
from unitok.decoding.sampling import SamplingConfig
from unitok.decoding.sjd import decode_sjd
from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.heads import VisualVocab
from unitok.model.modes import NextScaleMode, NextTokenMode, TokenGrid

TEXT, CODES, P = 10, 16, 3
VISUAL = VisualVocab(offset=TEXT, size=CODES, boi_id=4)


def _model(blocks: int) -> UnitokForCausalLM:
    torch.manual_seed(0)
    config = UnitokConfig(
        vocab_size=TEXT + CODES,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
        initializer_range=0.5,
        num_block_embeddings=blocks,
    )
    model = UnitokForCausalLM(config).eval()
    if model.model.block_embed is not None:
        torch.nn.init.normal_(model.model.block_embed.weight, std=1.0)
    return model


@torch.no_grad()
def _naive_greedy(model, layout, prefix):
    """Full uncached forwards with teacher forcing, block by block, block embeddings added per slot."""
    embed = model.get_input_embeddings()
    tokens = torch.zeros(prefix.shape[0], layout.num_visual, dtype=torch.long)
    for b in range(layout.num_blocks):
        inputs = layout.inputs_embeds(embed(prefix), VISUAL.embed(model, tokens), VISUAL.start(model))
        vis = VISUAL.add_block_embedding(model, inputs[:, P:], layout.block_ids[P:])
        inputs = torch.cat([inputs[:, :P], vis], 1)
        out = model(
            inputs_embeds=inputs,
            position_ids=layout.positions[:, None],
            attention_mask=layout.attention_mask(0, layout.length, prefix.shape[0]),
        )
        s = layout.block_slice(b)
        tokens[:, s] = out.logits[:, P + s.start : P + s.stop, TEXT:].argmax(-1)
    return tokens


def test_block_embeddings_change_outputs_and_cached_decoding_matches_full_forward():
    layout = NextScaleMode().layout(TokenGrid(1, 4, 4, scales=((1, 1), (2, 2), (4, 4))), P)
    prefix = torch.tensor([[2, 7, 0], [2, 8, 9]])
    model = _model(3)
    greedy = SamplingConfig(temperature=0)
    out = decode_blocks(model, layout, prefix, VISUAL, sampling=greedy)
    assert torch.equal(out.tokens, _naive_greedy(model, layout, prefix))
    model.model.block_embed = None  # the same weights without block embeddings decode differently
    assert not torch.equal(decode_blocks(model, layout, prefix, VISUAL, sampling=greedy).tokens, out.tokens)


def test_block_embedding_errors():
    with pytest.raises(ValueError, match="num_block_embeddings"):
        UnitokConfig(
            vocab_size=10,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_block_embeddings=-1,
        )
    layout = NextScaleMode().layout(TokenGrid(1, 4, 4, scales=((1, 1), (2, 2), (4, 4))), P)
    with pytest.raises(ValueError, match="block embeddings"):
        decode_blocks(_model(2), layout, torch.tensor([[2, 7, 0]]), VISUAL)
    token_layout = NextTokenMode().layout(TokenGrid(1, 2, 2), P)
    with pytest.raises(ValueError, match="block decoder"):
        decode_sjd(_model(4), token_layout, torch.tensor([[2, 7, 0]]), VISUAL)
