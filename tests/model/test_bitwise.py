"""The bitwise visual head (binary tokenizers, Infinity-style): d binary logits and a bit embedding, no 2^d rows."""

import pytest
import torch

from unitok.decoding.sampling import SamplingConfig
from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.heads import VisualVocab
from unitok.model.pretrained import Generator, load_generator, save_generator
from unitok.model.visual import VisualCodec
from unitok.model.vocab import UnitokVocabulary
from unitok.tokenizers import BinaryTokenizer, BinaryTokenizerConfig
from unitok.training.ar import ar_loss

BITS = 16


@pytest.fixture(scope="module")
def gen() -> Generator:
    torch.manual_seed(0)
    tok = BinaryTokenizer(
        BinaryTokenizerConfig(
            channels=8, channel_mults=[1, 2, 2], z_channels=8, quantizer={"type": "bsq", "bits": BITS}
        )
    ).eval()
    codec = VisualCodec.create(tok, "next-block", 28)
    vocab = UnitokVocabulary.build([], codec.codebook_size, cond_len=2, class_names=["bag", "coat"])
    config = UnitokConfig(
        vocab_size=vocab.text_vocab_size,
        visual_bits=BITS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return Generator(UnitokForCausalLM(config).eval(), vocab, codec)


def test_bits_round_trip_matches_the_tokenizer(gen):
    visual = gen.visual
    ids = torch.randint(0, 1 << BITS, (3, 5))
    assert torch.equal(visual.from_bits(visual.to_bits(ids)), ids)
    quantizer = gen.codec.tokenizer.quantizer
    assert torch.equal(visual.to_bits(ids), quantizer.indices_to_bits(ids))


def test_no_table_of_two_to_the_bits(gen):
    assert gen.model.config.vocab_size == gen.vocab.text_vocab_size
    assert gen.model.bit_head.weight.shape == (BITS, 32)
    assert sum(p.numel() for p in gen.model.parameters()) < 100_000


def test_bitwise_loss_trains_and_generation_is_in_range(gen):
    model = gen.model
    tokens = torch.randint(0, 1 << BITS, (4, 49))
    prefix = gen.vocab.class_prefix_ids(torch.tensor([0, 1, 0, 1]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(40):
        loss = ar_loss(gen, tokens, prefix)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert float(loss) < 0.8 * first and first == pytest.approx(0.693, abs=0.1)  # per-bit CE starts at ln 2
    out = gen.generate_tokens(["bag", "coat"], guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 49) and int(out.tokens.min()) >= 0 and int(out.tokens.max()) < 1 << BITS
    assert out.forward_passes == 7
    greedy = gen.generate_tokens(["bag"], sampling=SamplingConfig(temperature=0))
    assert torch.equal(greedy.tokens, gen.generate_tokens(["bag"], sampling=SamplingConfig(temperature=0)).tokens)
    assert gen.codec.decode(out.tokens).shape == (2, 1, 28, 28)


def test_bitwise_save_load_round_trip(gen, tmp_path):
    save_generator(tmp_path / "g", gen)
    loaded = load_generator(tmp_path / "g")
    assert loaded.visual.bits == BITS
    a = gen.generate_tokens(["coat"], sampling=SamplingConfig(temperature=0)).tokens
    b = loaded.generate_tokens(["coat"], sampling=SamplingConfig(temperature=0)).tokens
    assert torch.equal(a, b)


def test_bad_bitwise_settings():
    with pytest.raises(ValueError, match="visual_bits"):
        UnitokConfig(
            vocab_size=10,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            visual_bits=-1,
        )
    with pytest.raises(ValueError, match="codes"):
        VisualVocab(offset=10, size=100, boi_id=4, bits=8)
    plain = UnitokForCausalLM(
        UnitokConfig(vocab_size=10, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    )
    with pytest.raises(ValueError, match="bitwise"):
        plain.bit_logits(torch.zeros(1, 32))


def test_build_generator_with_bitwise_head(gen, tmp_path):
    from unitok.tokenizers import BaselineTokenizer, BaselineTokenizerConfig
    from unitok.training.ar import build_generator

    gen.codec.tokenizer.save_pretrained(tmp_path / "binary")
    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    cfg = {"tokenizer": str(tmp_path / "binary"), "mode": "next-token", "head": "bitwise", "model": tiny}
    built = build_generator(cfg, ["bag", "coat"], (28, 28))
    assert built.model.config.visual_bits == BITS and built.visual.bits == BITS
    BaselineTokenizer(BaselineTokenizerConfig(channels=8, channel_mults=[1, 2, 2], z_channels=8)).save_pretrained(
        tmp_path / "baseline"
    )
    with pytest.raises(ValueError, match="binary tokenizer"):
        build_generator({**cfg, "tokenizer": str(tmp_path / "baseline")}, ["bag"], (28, 28))
    with pytest.raises(ValueError, match="head"):
        build_generator({**cfg, "head": "octal"}, ["bag"], (28, 28))
