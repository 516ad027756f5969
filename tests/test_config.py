"""Configs (k2jax/config.py), presets (k2jax/presets.py) and dotted overrides
(k2jax/overrides.py): every bad value is refused with a message naming its field."""

import dataclasses
import json
import re

import pytest

from k2jax import config, overrides, presets
from k2jax.config import Config, ConfigError, ModelConfig, OptimizerConfig


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_build(name):
    assert isinstance(presets.preset(name), ModelConfig)


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
        presets.preset("tiny", "num_hidden_layer=3")
    with pytest.raises(ConfigError, match="did you mean 'rope_scaling.factor'"):
        presets.preset("tiny", "rope_scaling.fctor=3")
    with pytest.raises(ConfigError, match="unknown preset"):
        presets.preset("tinyy")
    with pytest.raises(ConfigError, match="unknown config key 'bogus'"):
        config.from_dict(ModelConfig, {"bogus": 1})


def test_overrides_parse_by_type():
    cfg = presets.preset("tiny", "num_hidden_layers=3", "q_lora_rank=None", "qk_norm=true",
                         "routed_scaling_factor=1.5", "rope_scaling.factor=8", "attention=mha")
    assert (cfg.num_hidden_layers, cfg.q_lora_rank, cfg.qk_norm) == (3, None, True)
    assert cfg.routed_scaling_factor == 1.5 and cfg.attention == "mha"
    assert cfg.rope_scaling == config.YarnConfig(factor=8.0)
    with pytest.raises(ConfigError, match="num_hidden_layers='x': expected int"):
        presets.preset("tiny", "num_hidden_layers=x")
    with pytest.raises(ConfigError, match="expected key=value"):
        presets.preset("tiny", "num_hidden_layers")
    with pytest.raises(ConfigError, match="^n_group=3"):
        presets.preset("tiny", "n_group=3")


def test_round_trip_dict():
    cfg = presets.preset("kimi-k2")
    assert config.from_dict(ModelConfig, json.loads(json.dumps(config.to_dict(cfg)))) == cfg
    assert dataclasses.is_dataclass(cfg) and cfg.__dataclass_params__.frozen


def test_load_from_preset_or_file(tmp_path):
    cfg = presets.load("tiny", ["optimizer.lr=1e-2", "model.num_hidden_layers=3"])
    assert cfg.model == presets.preset("tiny", "num_hidden_layers=3")
    assert cfg.optimizer.lr == 1e-2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict(cfg)))
    assert presets.load(path) == cfg
    assert presets.load(path, ["data.seq_len=64"]).data.seq_len == 64
    with pytest.raises(ConfigError, match="neither a preset.*did you mean 'tiny'"):
        presets.load("tinyy")


def test_old_spelling_names_the_new_one():
    """MuonClip became two switches; the old one-word name says how to write it now."""
    new = re.escape("optimizer.name=muon optimizer.qk_clip=true")
    with pytest.raises(ConfigError, match=new):
        overrides.apply(Config(), ["optimizer.name=muonclip"])
    with pytest.raises(ConfigError, match=new):
        config.from_dict(Config, {"optimizer": {"name": "muonclip"}})
    assert OptimizerConfig().qk_clip is False
    cfg = overrides.apply(Config(), ["optimizer.name=muon", "optimizer.qk_clip=true"])
    assert (cfg.optimizer.name, cfg.optimizer.qk_clip) == ("muon", True)


def test_bad_literal_names_its_choices():
    choices = re.escape("optimizer.name='sgd': must be one of 'adamw', 'muon'")
    with pytest.raises(ConfigError, match=choices):
        overrides.apply(Config(), ["optimizer.name=sgd"])
    with pytest.raises(ConfigError, match=choices):
        config.from_dict(Config, {"optimizer": {"name": "sgd"}})
    with pytest.raises(ConfigError, match=re.escape("'stdlib', 'text', 'shards'")):
        config.from_dict(Config, {"data": {"source": "web"}})


@pytest.mark.parametrize("values, message", [
    ({"optimizer": {"lr": "fast"}}, "optimizer.lr='fast': must be a number"),
    ({"train": {"steps": True}}, "train.steps=True: must be an integer"),
    ({"train": {"init_from": 3}}, "train.init_from=3: must be a string"),
    ({"optimizer": {"name": ["muon"]}}, "optimizer.name=['muon']: must be one of"),
])
def test_json_values_of_the_wrong_type_name_the_field(values, message):
    """A config.json is not parsed by field type, so every field checks its own."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.from_dict(Config, values)


@pytest.mark.parametrize("values, message", [
    ({"train": {"steps": 10.5}}, "train.steps=10.5: must be an integer"),
    ({"optimizer": {"qk_clip": None}}, "now spelled optimizer.qk_clip=false"),
    ({"model": {"rope_scaling": {"factor": "8"}}}, "rope_scaling.factor='8': must be a number"),
    ({"data": {"source": "text", "paths": "a.txt"}}, "data.paths='a.txt': must be a list"),
])
def test_json_types_are_strict_where_a_float_or_string_would_pass_silently(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.from_dict(Config, values)


def test_retired_adam_lr_loads_at_its_old_default_and_names_its_successor(tmp_path):
    """A config.json written before adam_lr became adam_lr_ratio holds "adam_lr": null,
    which meant what ratio 1 means: it still loads. Any other value, in a file or an
    override, is one error naming the new key."""
    values = config.to_dict(Config())
    values["optimizer"] = {k: v for k, v in values["optimizer"].items()
                           if k != "adam_lr_ratio"} | {"adam_lr": None}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    assert config.from_file(path) == Config()
    with pytest.raises(ConfigError, match=re.escape("'optimizer.adam_lr' is gone: use "
                                                    "optimizer.adam_lr_ratio")):
        config.from_dict(Config, {"optimizer": {"adam_lr": 0.01}})
    with pytest.raises(ConfigError, match="optimizer.adam_lr_ratio"):
        overrides.apply(Config(), ["optimizer.adam_lr=0.01"])


@pytest.mark.parametrize("override, message", [
    ("qk_clip_alpha=1.5", "optimizer.qk_clip_alpha=1.5: must be in [0, 1]"),
    ("qk_clip_alpha=-0.1", "optimizer.qk_clip_alpha=-0.1: must be in [0, 1]"),
    ("adam_lr_ratio=0", "optimizer.adam_lr_ratio=0.0: must be positive"),
    ("rms_scale=-1", "optimizer.rms_scale=-1.0: must be positive"),
    ("update_scale=muP", "optimizer.update_scale='muP': must be one of 'k2', 'jordan'"),
    ("mu_dtype=float16", "optimizer.mu_dtype='float16': must be one of"),
    ("decay_norms=maybe", "optimizer.decay_norms='maybe': expected bool"),
    ("b2=1", "optimizer.b2=1.0: must be in [0, 1)"),
])
def test_optimizer_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        overrides.apply(Config(), [f"optimizer.{override}"])
