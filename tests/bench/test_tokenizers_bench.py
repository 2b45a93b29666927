"""``unitok bench tokenizers`` on tiny untrained tokenizers of all five kinds: every field the issue names is
written, the requirement checks are computed from the numbers (and fail for untrained models), and binary
quantizers report group-codebook usage."""

import json
import math

import pytest
import torch

from unitok.bench import tokenizers as bench
from unitok.cli import main
from unitok.tokenizers import TOKENIZERS

TINY = {
    "baseline": {
        "channels": 8,
        "channel_mults": [1, 1, 1],
        "z_channels": 8,
        "quantizer": {"type": "fsq", "levels": [5, 5]},
    },
    "binary": {"channels": 8, "channel_mults": [1, 1, 1], "z_channels": 8, "quantizer": {"type": "bsq", "bits": 16}},
    "multiscale": {
        "scales": [1, 3, 7],
        "channels": 8,
        "channel_mults": [1, 1, 1],
        "z_channels": 8,
        "quantizer": {"type": "vq", "codebook_size": 32, "dim": 4},
    },
    "flex1d": {
        "num_tokens": 4,
        "hidden_size": 16,
        "num_encoder_layers": 1,
        "num_decoder_layers": 1,
        "num_attention_heads": 2,
        "conv_channels": 0,
        "quantizer": {"type": "fsq", "levels": [5, 5]},
    },
    "video": {"channels": 8, "channel_mults": [1], "spatial_factor": 2, "quantizer": {"type": "fsq", "levels": [5, 5]}},
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    for kind, folder in bench.BUNDLED.items():
        cls = TOKENIZERS[kind]
        cls(cls.config_class(**TINY[kind])).save_pretrained(root / folder)
    return root


@pytest.fixture(scope="module")
def result(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("out") / "tok.json"
    assert main(["bench", "tokenizers", "--n", "5000", "--checkpoints", str(checkpoints), "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_every_kind_reports_every_field(result, checkpoints):
    toks = result["tokenizers"]
    assert {e["kind"] for e in toks.values()} == set(bench.BUNDLED)
    fields = {"kind", "checkpoint", "psnr", "ssim", "codebook_usage", "tokens_per_image", "bits_per_image"}
    for name, entry in toks.items():
        assert fields | {"encode_per_s", "decode_per_s"} <= set(entry), name
        assert entry["checkpoint"] == str(checkpoints / bench.BUNDLED[name])
        assert 0 <= entry["codebook_usage"] <= 1 and entry["encode_per_s"] > 0 and entry["decode_per_s"] > 0
    assert toks["baseline"]["tokens_per_image"] == 49
    assert toks["baseline"]["bits_per_image"] == pytest.approx(49 * math.log2(25))
    assert toks["binary"]["bits_per_image"] == 49 * 16
    assert toks["video"]["temporal_compression"] == 2 and toks["video"]["frames_per_latent_frame"] == 9 / 5
    assert toks["video"]["tokens_per_clip"] == 5 * 32 * 32


def test_flex1d_curve_covers_every_prefix_length(result):
    assert list(result["flex1d_psnr_by_tokens"]) == ["1", "2", "4"]


def test_requirements_are_judged_from_the_numbers(result):
    checks = result["requirements"]
    assert checks["all_five_kinds"] is True
    assert checks["baseline_psnr_ge_24"] is False  # untrained
    assert checks["video_temporal_compression_ge_2"] is True  # 1 + 2n frames -> 1 + n latent frames
    assert checks["video_psnr_ge_24"] is False
    assert checks["all"] is False


def test_binary_usage_is_over_group_codebooks(result):
    entry = result["tokenizers"]["binary"]
    assert len(entry["codebook_usage_by_group"]) == 2  # 16 bits in groups of 8
    assert entry["codebook_usage"] == pytest.approx(sum(entry["codebook_usage_by_group"]) / 2)
    assert entry["full_code_usage"] <= entry["full_code_usage_ceiling"] == min(1.0, 5000 * 49 / 2**16)


def test_missing_checkpoints_are_listed(tmp_path):
    out = bench.run(type("Args", (), {"n": 5000, "checkpoints": str(tmp_path)})())
    assert out["tokenizers"] == {} and len(out["missing_checkpoints"]) == 5
    assert out["requirements"]["all_five_kinds"] is False


def test_bad_n_is_refused(checkpoints):
    assert main(["bench", "tokenizers", "--n", "100", "--checkpoints", str(checkpoints)]) == 2
