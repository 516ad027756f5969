"""config.json <-> ModelConfig (k2jax/hf/config.py): the published configs read back as
our presets, a missing key means what it means to transformers, and whatever k2jax
does not implement is refused by name."""

import json
import os

import pytest

from k2jax import hf, presets
from k2jax.config import ConfigError
from k2jax.hf import HFError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("name", ["kimi-k2", "deepseek-v3"])
def test_from_hf_equals_preset(name):
    """The published config.json files (tests/fixtures, copied from public sources, see
    scripts/hf_param_counts.py) read back as our presets, field for field."""
    # the k2jax-only fields the pod presets set (k2jax/presets.py), given as overrides
    from_hf = hf.config_from_hf(f"{FIXTURES}/hf_config_{name}.json", dtype="bfloat16",
                                remat="full")
    assert from_hf == presets.preset(name)


def test_from_hf_dict_and_dir(tmp_path):
    d = json.load(open(f"{FIXTURES}/hf_config_kimi-k2.json"))
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert hf.config_from_hf(d) == hf.config_from_hf(tmp_path)


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
        hf.config_from_hf(d)


def test_from_hf_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        hf.config_from_hf(tmp_path)


def test_config_keys_mean_what_they_mean_to_transformers():
    d = json.load(open(os.path.join(FIXTURES, "hf_tiny_k2", "config.json")))
    minimal = {k: v for k, v in d.items() if k not in ("n_group", "first_k_dense_replace")}
    cfg = hf.config_from_hf({**minimal, "n_routed_experts": 16})
    assert (cfg.n_group, cfg.first_k_dense_replace) == (8, 3)  # DeepseekV3Config defaults
    plain = {k: v for k, v in d.items() if k != "rope_parameters"}
    assert hf.config_from_hf(plain).rope_theta == 10000.0
    bad = {**d, "rope_parameters": {**d["rope_parameters"], "attention_factor": 0.5}}
    with pytest.raises(ConfigError, match="attention_factor=0.5"):
        hf.config_from_hf(bad)


def test_to_hf_round_trips_and_refuses_what_transformers_lacks():
    k2 = presets.preset("kimi-k2")
    assert hf.config_from_hf(hf.config_to_hf(k2), dtype="bfloat16", remat="full") == k2
    with pytest.raises(HFError, match="max_position_embeddings=4096 must equal"):
        hf.config_to_hf(presets.preset("small", "rope_scaling.factor=4"))
    with pytest.raises(HFError, match="MLA"):
        hf.config_to_hf(presets.preset("tiny", "attention=mha"))
