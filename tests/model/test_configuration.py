"""UnitokConfig: Llama field names, validation with ValueError, JSON round trip keeping extra fields."""

import json

import pytest

from unitok.model import LUMOS_MM_ROPE_PATTERN, UnitokConfig


def test_defaults_are_small_llama_fields():
    config = UnitokConfig()
    assert config.model_type == "unitok"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 8, 4)
    assert config.num_key_value_heads == 2
    assert config.head_dim == 64
    assert config.mm_rope is True
    assert config.mm_rope_pattern == list(LUMOS_MM_ROPE_PATTERN)
    assert (config.attention_bias, config.mlp_bias, config.attention_dropout) == (False, False, 0.0)
    assert config.hidden_act == "silu"
    assert UnitokConfig(num_key_value_heads=None).num_key_value_heads == 4


def test_json_round_trip_keeps_extra_fields(tmp_path):
    config = UnitokConfig(hidden_size=64, num_attention_heads=2, head_dim=48, image_token_offset=512)
    json.loads(config.to_json_string())
    config.save_pretrained(tmp_path)
    loaded = UnitokConfig.from_pretrained(tmp_path)
    assert loaded.image_token_offset == 512
    assert loaded.head_dim == 48
    drop = {"transformers_version"}
    assert {k: v for k, v in loaded.to_dict().items() if k not in drop} == {
        k: v for k, v in config.to_dict().items() if k not in drop
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hidden_size": 65}, "divisible by num_attention_heads"),
        ({"num_key_value_heads": 3}, "divisible by num_key_value_heads"),
        ({"head_dim": 7}, "even"),
        ({"hidden_size": 0}, "positive"),
        ({"mm_rope_pattern": [0, 1, 3]}, "axis ids"),
        ({"mm_rope_pattern": []}, "axis ids"),
        ({"attention_dropout": 1.5}, "attention_dropout"),
        ({"rope_theta": 1.0}, "rope_theta"),
    ],
)
def test_bad_config_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UnitokConfig(**kwargs)


def test_any_even_head_dim_is_allowed():
    assert UnitokConfig(hidden_size=60, num_attention_heads=6, num_key_value_heads=3).head_dim == 10
