"""UnitokPipeline, `unitok generate` and `unitok bench generation` on tiny generators saved to a temp folder."""

import json

import pytest
import torch

from unitok.cli import main
from unitok.model.configuration import UnitokConfig
from unitok.model.modeling import UnitokForCausalLM
from unitok.model.pretrained import Generator, save_generator
from unitok.model.visual import VisualCodec
from unitok.model.vocab import UnitokVocabulary
from unitok.pipeline import UnitokPipeline
from unitok.tokenizers import BaselineTokenizer, BaselineTokenizerConfig

CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def _tiny_generator(mode: str, num_frames: int = 1) -> Generator:
    torch.manual_seed(0)
    tok = BaselineTokenizer(
        BaselineTokenizerConfig(
            channels=8, channel_mults=[1, 2, 2], z_channels=8, quantizer={"type": "fsq", "levels": [5, 3]}
        )
    ).eval()
    size = 28 if num_frames == 1 else 32
    codec = VisualCodec.create(tok, mode, size, num_frames, block="frame" if num_frames > 1 else "auto")
    vocab = UnitokVocabulary.build([], codec.codebook_size, cond_len=5, class_names=CLASSES)
    config = UnitokConfig(
        vocab_size=vocab.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=vocab.prefix_len + codec.spec.num_tokens + 8,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return Generator(UnitokForCausalLM(config).eval(), vocab, codec)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    save_generator(root / "gen-next-token", _tiny_generator("next-token"))
    save_generator(root / "gen-next-block", _tiny_generator("next-block"), weights_dtype=torch.float16)
    save_generator(root / "gen-video-next-block", _tiny_generator("next-block", num_frames=3))
    return root


def test_pipeline_generates_images_per_mode(checkpoints):
    pipe = UnitokPipeline.from_pretrained(checkpoints)
    assert ("next-token", False) in pipe.available and ("next-block", True) in pipe.available
    out = pipe("sneaker", num_images=3, mode="next-token", seed=1)
    assert len(out.images) == 3 and out.images[0].size == (28, 28) and out.forward_passes == 49
    block = pipe(["bag", 0], num_images=2, mode="next-block", seed=1)
    assert block.forward_passes == 7 and block.tokens.shape == (2, 49)
    again = pipe(["bag", 0], num_images=2, mode="next-block", seed=1)
    assert torch.equal(block.tokens, again.tokens)  # seeded


def test_pipeline_video_returns_frames(checkpoints):
    pipe = UnitokPipeline.from_pretrained(checkpoints)
    out = pipe("coat", num_images=2, video=True, seed=0)
    assert len(out.videos) == 2 and len(out.videos[0]) == 3 and out.videos[0][0].size == (32, 32)
    assert out.forward_passes == 3  # one forward per frame


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "spaceship"}, "never saw"),
        ({"prompt": ""}, "non-empty"),
        ({"prompt": "sneaker " * 6}, "condition slot"),
        ({"prompt": 12}, "class index"),
        ({"prompt": "bag", "num_images": 0}, "num_images"),
        ({"prompt": "bag", "guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": "bag", "top_p": 0.0}, "top_p"),
        ({"prompt": "bag", "mode": "next-scale"}, "available"),
        ({"prompt": "bag", "mode": "next-pixel"}, "unknown mode"),
        ({"prompt": ["bag", "coat"], "num_images": 3}, "prompts"),
    ],
)
def test_pipeline_bad_input(checkpoints, kwargs, message):
    pipe = UnitokPipeline.from_pretrained(checkpoints)
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_pipeline_rejects_missing_and_mismatched(tmp_path, checkpoints):
    with pytest.raises(FileNotFoundError):
        UnitokPipeline.from_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no generator"):
        UnitokPipeline.from_pretrained(tmp_path / "empty")


def test_cli_generate_writes_grid_and_gif(tmp_path, checkpoints, capsys):
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--model",
                str(checkpoints),
                "--mode",
                "next-token",
                "--prompt",
                "bag",
                "--prompt",
                "coat",
                "--num-images",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "next-token.png").is_file()
    assert (
        main(
            [
                "generate",
                "--model",
                str(checkpoints),
                "--video",
                "--prompt",
                "bag",
                "--num-images",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "bag-0.gif").is_file()
    assert main(["generate", "--model", str(checkpoints), "--prompt", "spaceship", "--out", str(out)]) == 2
    assert "never saw" in capsys.readouterr().err


def test_cli_generate_with_a_speculative_decoder_and_a_guidance_schedule(tmp_path, checkpoints, capsys):
    out = tmp_path / "out"
    base = ["generate", "--model", str(checkpoints), "--mode", "next-token", "--prompt", "bag", "--out", str(out)]
    schedule = ["--guidance-ramp", "linear", "--guidance-interval", "0.1", "0.9"]
    assert main([*base, "--num-images", "2", "--decoder", "sjd", "--window", "4", "--init", "random", *schedule]) == 0
    assert (out / "next-token.png").is_file()
    assert main([*base, "--decoder", "relaxed", "--window", "0"]) == 2
    assert "window must be a positive int" in capsys.readouterr().err
    assert main([*base, "--guidance-interval", "0.9", "0.1"]) == 2
    assert "guidance interval" in capsys.readouterr().err


def test_bench_generation_json(tmp_path, checkpoints):
    path = tmp_path / "gen.json"
    args = [
        "bench",
        "generation",
        "--checkpoints",
        str(checkpoints),
        "--n",
        "20",
        "--num-real",
        "50",
        "--video-n",
        "4",
        "--batch-size",
        "10",
        "--json",
        str(path),
    ]
    assert main(args) == 0
    result = json.loads(path.read_text())
    assert result["real_floor_fd"] >= 0
    token, block = result["modes"]["next-token"], result["modes"]["next-block"]
    for entry in (token, block):
        assert {"checkpoint", "fd", "class_acc", "forward_passes_per_image", "seconds_per_image"} <= set(entry)
        assert entry["guidance_scale"] == 2.0 and entry["temperature"] == 1.0  # the generator's recommended settings
    assert token["forward_passes_per_image"] == 49 and block["forward_passes_per_image"] == 7
    assert block["forward_pass_reduction"] == 7
    video = result["video"]["next-block"]
    assert video["forward_passes_per_clip"] == 3 and "fd_motion" in video


def test_pipeline_decoder_choice(checkpoints):
    pipe = UnitokPipeline.from_pretrained(checkpoints)
    greedy = {"temperature": 0.0, "seed": 0, "mode": "next-token"}
    ar = pipe(["bag", "coat"], num_images=2, **greedy)
    sjd = pipe(["bag", "coat"], num_images=2, decoder="sjd", window=8, **greedy)
    assert torch.equal(ar.tokens, sjd.tokens) and sjd.forward_passes <= ar.forward_passes
    with pytest.raises(ValueError, match="unknown decoder"):
        pipe("bag", decoder="telepathy")
    with pytest.raises(ValueError, match="next-token"):
        pipe("bag", mode="next-block", decoder="sjd")


def test_pipeline_lossy_decoders_use_the_tokenizer_codes(checkpoints):
    pipe = UnitokPipeline.from_pretrained(checkpoints)
    for decoder, options in (("relaxed", {"delta": 0.1}), ("grouped", {"group_size": 3})):
        out = pipe("bag", num_images=2, mode="next-token", decoder=decoder, seed=0, **options)
        assert out.tokens.shape == (2, 49) and out.forward_passes <= 49


def test_pipeline_draft_decoder(checkpoints, tmp_path):
    pipe = UnitokPipeline.from_pretrained(checkpoints)
    greedy = {"temperature": 0.0, "seed": 0, "mode": "next-token"}
    ar = pipe(["bag", "coat"], num_images=2, **greedy)
    drafted = pipe(
        ["bag", "coat"],
        num_images=2,
        decoder="draft",
        draft_model=str(checkpoints / "gen-next-token"),
        gamma=3,
        **greedy,
    )
    assert torch.equal(ar.tokens, drafted.tokens)
    with pytest.raises(ValueError, match="draft_model"):
        pipe("bag", mode="next-token", decoder="draft")
    with pytest.raises(ValueError, match="not trained on this model"):
        pipe("bag", mode="next-token", decoder="draft", draft_model=str(checkpoints / "gen-next-block"))


def test_bench_decoding_json(tmp_path, checkpoints):
    import shutil

    shutil.copytree(checkpoints / "gen-next-token", tmp_path / "gen-next-token")
    shutil.copytree(checkpoints / "gen-next-token", tmp_path / "gen-draft")  # any same-vocabulary model drafts
    path = tmp_path / "dec.json"
    assert (
        main(
            [
                "bench",
                "decoding",
                "--checkpoints",
                str(tmp_path),
                "--n",
                "4",
                "--window",
                "8",
                "--lossy-window",
                "6",
                "--dist-samples",
                "3000",
                "--json",
                str(path),
            ]
        )
        == 0
    )
    result = json.loads(path.read_text())
    assert result["baseline"]["forward_passes_per_image"] == 49
    for table in (result, result["batch16"]):
        assert set(table["methods"]) == {"sjd", "grouped", "relaxed", "draft"}
        for entry in table["methods"].values():
            assert {
                "forward_passes_per_image",
                "seconds_per_image",
                "speedup_steps",
                "speedup_wall",
                "fd",
                "lossless",
            } <= set(entry)
    assert result["methods"]["sjd"]["lossless"] and not result["methods"]["relaxed"]["lossless"]
    assert result["methods"]["sjd"]["options"]["window"] == 8 and result["methods"]["relaxed"]["options"]["window"] == 6
    assert result["methods"]["draft"]["speedup_steps"] > 1  # a draft identical to the target is always accepted
    assert result["distribution_test"]["sjd_pvalue"] > 0.01 and result["distribution_test"]["draft_pvalue"] > 0.01
