import dataclasses
import json

import pytest

from k2jax import config
from k2jax.config import ConfigError, ModelConfig

FIXTURES = "tests/fixtures"


@pytest.mark.parametrize("name", sorted(config.PRESETS))
def test_presets_build(name):
    assert isinstance(config.preset(name), ModelConfig)


@pytest.mark.parametrize("name", ["kimi-k2", "deepseek-v3"])
def test_from_hf_equals_preset(name):
    """The published config.json files (tests/fixtures, copied from public sources, see
    scripts/hf_param_counts.py) read back as our presets, field for field."""
    from_hf = config.from_hf(f"{FIXTURES}/hf_config_{name}.json", dtype="bfloat16")
    assert from_hf == config.preset(name)


def test_from_hf_dict_and_dir(tmp_path):
    d = json.load(open(f"{FIXTURES}/hf_config_kimi-k2.json"))
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert config.from_hf(d) == config.from_hf(tmp_path)


@pytest.mark.parametrize("patch, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"some_new_key": 1}, "some_new_key"),
    ({"num_experts_per_tok": 999}, "num_experts_per_tok"),
    ({"rope_interleave": False}, "rope_interleave"),
    ({"topk_method": "greedy"}, "topk_method"),
])
def test_from_hf_rejects(patch, field):
    d = json.load(open(f"{FIXTURES}/hf_config_deepseek-v3.json"))
    d.update(patch)
    with pytest.raises(ConfigError, match=field):
        config.from_hf(d)


def test_from_hf_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        config.from_hf(tmp_path)


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention="mha", num_attention_heads=5), "num_attention_heads"),
    (dict(attention="mha", num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=4, topk_group=5), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=5), "topk_group"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(attention="gqa"), "attention"),
    (dict(dtype="float16"), "dtype"),
    (dict(moe_impl="capacity"), "moe_impl"),
])
def test_invalid_config_names_field(kwargs, field):
    with pytest.raises(ConfigError, match=rf"^{field}="):
        ModelConfig(**kwargs)


def test_unknown_field_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'num_hidden_layers'"):
        config.preset("tiny", "num_hidden_layer=3")
    with pytest.raises(ConfigError, match="did you mean 'rope_scaling.factor'"):
        config.preset("tiny", "rope_scaling.fctor=3")
    with pytest.raises(ConfigError, match="unknown preset"):
        config.preset("tinyy")
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        config.from_dict(ModelConfig, {"bogus": 1})


def test_overrides_parse_by_type():
    cfg = config.preset("tiny", "num_hidden_layers=3", "q_lora_rank=None", "qk_norm=true",
                        "routed_scaling_factor=1.5", "rope_scaling.factor=8", "attention=mha")
    assert (cfg.num_hidden_layers, cfg.q_lora_rank, cfg.qk_norm) == (3, None, True)
    assert cfg.routed_scaling_factor == 1.5 and cfg.attention == "mha"
    assert cfg.rope_scaling == config.YarnConfig(factor=8.0)
    with pytest.raises(ConfigError, match="num_hidden_layers='x': expected int"):
        config.preset("tiny", "num_hidden_layers=x")
    with pytest.raises(ConfigError, match="expected key=value"):
        config.preset("tiny", "num_hidden_layers")
    with pytest.raises(ConfigError, match="^n_group=3"):
        config.preset("tiny", "n_group=3")


def test_round_trip_dict():
    cfg = config.preset("kimi-k2")
    assert config.from_dict(ModelConfig, json.loads(json.dumps(config.to_dict(cfg)))) == cfg
    assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen
