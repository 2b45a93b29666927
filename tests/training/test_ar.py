"""The generator trainer: end to end on a tiny config, the token cache, exact resume, overfitting a fixed batch in
every mode, vocabulary extension for fine-tuning, and the script's error exits."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unitok.data.fashion_mnist import CLASS_NAMES
from unitok.model import UnitokConfig, UnitokForCausalLM
from unitok.model.pretrained import Generator, load_generator, save_generator
from unitok.model.visual import VisualCodec, VisualSpec
from unitok.model.vocab import UnitokVocabulary
from unitok.tokenizers import BaselineTokenizer, BaselineTokenizerConfig
from unitok.training.ar import ar_loss, build_generator, extend_vocabulary, train_ar

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_ar.py"
TINY_LM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # train_ar sets train.threads process-wide
    yield
    torch.set_num_threads(threads)


def tiny_tokenizer() -> BaselineTokenizer:
    torch.manual_seed(0)
    config = BaselineTokenizerConfig(
        quantizer={"type": "fsq", "levels": [4, 3]}, channels=8, channel_mults=[1, 2, 2], num_res_blocks=1, z_channels=8
    )
    return BaselineTokenizer(config).eval()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_cfg(tokenizer_path: Path, root: Path, run: str = "run", max_steps: int = 4, resume: bool = True) -> dict:
    return {
        "tokenizer": str(tokenizer_path),
        "mode": "next-token",
        "data": {"source": "fashion_mnist", "split": "train", "limit": 64},
        "eval_data": {"source": "fashion_mnist", "split": "test", "limit": 64},
        "model": dict(TINY_LM),
        "train": {
            "batch_size": 8,
            "max_steps": max_steps,
            "eval_every": 1000,
            "save_every": 2,
            "threads": 1,
            "warmup_steps": 1,
            "resume": resume,
        },
        "eval": {"num_samples": 10, "num_real": 32, "batch_size": 10, "guidance_scale": 2.0},
        "output_dir": str(root / run),
        "cache_dir": str(root / "cache"),
        "export_dir": str(root / f"export-{run}"),
    }


# --- train_ar end to end ------------------------------------------------------------------------------------------


def test_train_ar_exports_a_loadable_generator_and_caches_the_tokens(tokenizer_path, tmp_path, monkeypatch):
    summary = train_ar(tiny_cfg(tokenizer_path, tmp_path))
    assert summary["step"] == 4 and summary["export_dir"] == str(tmp_path / "export-run")
    assert {"class_acc", "fd", "forward_passes_per_image"} <= set(summary["eval"])
    assert summary["eval"]["forward_passes_per_image"] == 49
    run = tmp_path / "run"
    assert (run / "samples-final.png").is_file() and (run / "last").is_symlink()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and "loss" in records[0] and "final" in records[-1]

    gen = load_generator(tmp_path / "export-run")
    assert (tmp_path / "export-run" / "training.yaml").is_file()
    assert gen.spec.mode == "next-token" and (gen.spec.height, gen.spec.width) == (7, 7)
    assert gen.vocab.class_names == list(CLASS_NAMES) and gen.vocab.num_visual_tokens == 12
    trained = load_file(str(run / "last" / "model.safetensors"))
    for name, tensor in gen.model.state_dict().items():
        if name in trained:  # the export stores float16 by default (export_dtype) and loads as float32
            assert tensor.dtype == torch.float32
            torch.testing.assert_close(tensor, trained[name], rtol=1e-3, atol=1e-5, msg=name)
    tokens = gen.generate_tokens(["sneaker", 0], 2.0, generator=torch.Generator().manual_seed(0)).tokens
    assert tokens.shape == (2, 49) and 0 <= int(tokens.min()) and int(tokens.max()) < 12

    cache = tmp_path / "cache"
    assert [p.name.startswith("tokens-") for p in cache.iterdir()] == [True]

    def no_encoding(*args, **kwargs):
        raise AssertionError("the second run must read the token cache, not encode again")

    monkeypatch.setattr(VisualCodec, "encode", no_encoding)
    again = train_ar(tiny_cfg(tokenizer_path, tmp_path, run="second", max_steps=1))
    assert again["step"] == 1
    assert len(list(cache.iterdir())) == 1


def test_resume_equals_an_uninterrupted_run(tokenizer_path, tmp_path):
    # With one warmup step, steps 1-2 get the same LR whether max_steps is 2 or 4; the resumed run must then
    # continue on the 4-step schedule from step 3 on (the optimizer state still holds the 2-step schedule's LR).
    first = train_ar(tiny_cfg(tokenizer_path, tmp_path, run="resumed", max_steps=2))
    assert first["step"] == 2
    resumed = train_ar(tiny_cfg(tokenizer_path, tmp_path, run="resumed", max_steps=4))
    assert resumed["step"] == 4
    full = train_ar(tiny_cfg(tokenizer_path, tmp_path, run="full", max_steps=4))
    assert sorted(p.name for p in (tmp_path / "resumed").glob("step-*")) == ["step-0000002", "step-0000004"]

    a = load_file(str(tmp_path / "resumed" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "full" / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert resumed["eval"]["fd"] == full["eval"]["fd"]
    start = load_file(str(tmp_path / "resumed" / "step-0000002" / "model.safetensors"))
    assert any(not torch.equal(start[k], b[k]) for k in b)  # steps 3 and 4 did train

    restarted = train_ar(tiny_cfg(tokenizer_path, tmp_path, run="resumed", max_steps=4, resume=False))
    assert restarted["step"] == 4  # resume false: trains again from step 0


# --- the loss in every mode ---------------------------------------------------------------------------------------


def bare_generator(spec: VisualSpec, codes: int = 16, classes=("a", "b", "c", "d")) -> Generator:
    """A generator without a tokenizer: enough for ``ar_loss``, which needs only the layout."""
    vocab = UnitokVocabulary.build([], codes, cond_len=1, class_names=list(classes))
    config = UnitokConfig(vocab_size=vocab.vocab_size, tie_word_embeddings=True, attn_implementation="sdpa", **TINY_LM)
    torch.manual_seed(0)
    return Generator(UnitokForCausalLM(config), vocab, VisualCodec(None, spec))


@pytest.mark.parametrize(
    "spec",
    [
        VisualSpec("next-token", 3, 3),
        VisualSpec("next-block", 4, 4),
        VisualSpec("next-scale", 4, 4, scales=((1, 1), (2, 2), (4, 4))),
    ],
    ids=lambda s: s.mode,
)
def test_ar_loss_overfits_a_fixed_batch(spec):
    gen = bare_generator(spec)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 16, (4, spec.num_tokens), generator=g)
    prefix = gen.vocab.class_prefix_ids(torch.arange(4))
    opt = torch.optim.AdamW(gen.model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = ar_loss(gen, tokens, prefix)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert abs(losses[0] - torch.log(torch.tensor(16.0)).item()) < 0.5  # starts near uniform over the codes
    # Random targets: next-scale must tell the slots of a scale apart by position alone, so it learns slowest.
    assert losses[-1] < 0.75 * losses[0], losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_ar_loss_rejects_tokens_of_the_wrong_length():
    gen = bare_generator(VisualSpec("next-block", 4, 4))
    with pytest.raises(ValueError, match="visual embeddings"):
        ar_loss(gen, torch.zeros(2, 15, dtype=torch.long), gen.vocab.class_prefix_ids(torch.tensor([0, 1])))


# --- fine-tuning: new class names ---------------------------------------------------------------------------------


@pytest.fixture
def base() -> Generator:
    codec = VisualCodec.create(tiny_tokenizer(), "next-block", 28)
    vocab = UnitokVocabulary.build([], codec.codebook_size, cond_len=2, class_names=["shirt", "bag"])
    config = UnitokConfig(vocab_size=vocab.vocab_size, tie_word_embeddings=True, attn_implementation="sdpa", **TINY_LM)
    torch.manual_seed(0)
    return Generator(UnitokForCausalLM(config).eval(), vocab, codec)


def test_extend_vocabulary_keeps_old_ids_and_visual_rows(base):
    old_vocab, old_emb = base.vocab, base.model.get_input_embeddings().weight.detach().clone()
    old_layers = {
        k: v.clone() for k, v in base.model.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k
    }
    new = extend_vocabulary(base, ["shirt", "bag", "ankle boot"], [], None)
    new.model.eval()
    vocab = new.vocab
    assert vocab.class_names == ["shirt", "bag", "ankle boot"] and vocab.cond_len == 2
    for word, i in old_vocab.tokenizer.get_vocab().items():
        assert vocab.token_id(word) == i, word
    assert vocab.text_vocab_size == old_vocab.text_vocab_size + 2  # "ankle", "boot"
    assert vocab.visual_offset == old_vocab.visual_offset + 2 and vocab.num_visual_tokens == 12
    emb = new.model.get_input_embeddings().weight.detach()
    assert emb.shape == (vocab.vocab_size, 32) and new.model.config.vocab_size == vocab.vocab_size
    assert torch.equal(emb[: old_vocab.text_vocab_size], old_emb[: old_vocab.text_vocab_size])
    assert torch.equal(emb[vocab.visual_offset :], old_emb[old_vocab.visual_offset :])
    mean = old_emb[: old_vocab.text_vocab_size].mean(0)
    assert torch.allclose(emb[old_vocab.text_vocab_size : vocab.visual_offset], mean.expand(2, -1))
    for name, tensor in new.model.state_dict().items():
        if name in old_layers:
            assert torch.equal(tensor, old_layers[name]), name
    # Same weights, same old conditions: the same loss on the same visual tokens.
    tokens = torch.randint(0, 12, (2, 49), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        before = ar_loss(base, tokens, old_vocab.class_prefix_ids(labels))
        after = ar_loss(new, tokens, vocab.class_prefix_ids(labels))
    torch.testing.assert_close(after, before)
    new.generate_tokens(["ankle boot"], 2.0, generator=torch.Generator().manual_seed(0))


def test_extend_vocabulary_leaves_the_base_generator_intact(base, tmp_path):
    vocab_size = base.model.config.vocab_size
    extend_vocabulary(base, ["shirt", "bag", "sandal"], [], None)
    assert base.model.config.vocab_size == vocab_size == base.vocab.vocab_size
    save_generator(tmp_path / "base", base)
    assert load_generator(tmp_path / "base").vocab.vocab_size == vocab_size


def test_extend_vocabulary_without_new_words_returns_the_base(base):
    assert extend_vocabulary(base, ["shirt", "bag"], [], None) is base


def test_build_generator_from_a_saved_generator_adds_new_classes(base, tmp_path):
    save_generator(tmp_path / "base", base)
    cfg = {"init_from": str(tmp_path / "base"), "condition": {"class_names": ["shirt", "bag", "sneaker"]}}
    gen = build_generator(cfg, ["ignored"], (28, 28))
    assert gen.vocab.class_names == ["shirt", "bag", "sneaker"] and gen.spec == base.spec
    assert gen.vocab.token_id("shirt") == base.vocab.token_id("shirt")


# --- scripts/train_ar.py ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("train_ar_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_rejects_an_unknown_train_option(script, tmp_path, capsys):
    assert script.main(["--set", "train.bogus=1", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "unknown train options" in err and "bogus" in err
    assert not (tmp_path / "run").exists()


def test_script_rejects_an_unknown_mode(script, tokenizer_path, tmp_path, capsys):
    args = ["--set", "mode=next-pixel", "--set", f"tokenizer={tokenizer_path}", "--set", "data.limit=8"]
    args += ["--set", f"cache_dir={tmp_path / 'cache'}", "--output-dir", str(tmp_path / "run")]
    assert script.main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "unknown prediction mode 'next-pixel'" in err


def test_script_reports_a_missing_config_file(script, tmp_path, capsys):
    assert script.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def _write_folder(root: Path, classes: dict[str, int]) -> Path:
    import numpy as np
    from PIL import Image

    from unitok.data import load_fashion_mnist

    test = load_fashion_mnist("test")
    for k, (name, label) in enumerate(classes.items()):
        folder = root / name
        folder.mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(test.labels == label)[:6]):
            Image.fromarray(test.images[idx]).resize((40, 40)).save(folder / f"{k}-{i}.png")  # any size: resized
    return root


def test_finetune_script_adds_new_classes(tmp_path, tokenizer_path):
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT.with_name("finetune.py"))
    finetune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(finetune)
    base = tmp_path / "base"
    train_ar({**tiny_cfg(tokenizer_path, tmp_path, max_steps=2), "export_dir": str(base)})
    folder = _write_folder(tmp_path / "images", {"rain boot": 9, "tote": 8})
    out = tmp_path / "tuned"
    argv = [
        "--model",
        str(base),
        "--data",
        str(folder),
        "--output-dir",
        str(tmp_path / "ft"),
        "--export",
        str(out),
        "--max-steps",
        "2",
        "--set",
        "eval.num_samples=4",
        "--set",
        "eval.batch_size=4",
        "--set",
        f"cache_dir={tmp_path / 'cache'}",
        "--set",
        "train.batch_size=4",
        "--set",
        "train.threads=1",
    ]
    assert finetune.main(argv) == 0
    tuned = load_generator(out)
    assert tuned.vocab.class_names == ["rain boot", "tote"]
    assert tuned.generate_tokens(["rain boot", "tote"], guidance_scale=2.0).tokens.shape == (2, 49)
    assert finetune.main(["--model", str(tmp_path / "nothing"), "--data", str(folder)]) == 2
