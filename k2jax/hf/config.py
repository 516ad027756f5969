"""config.json of Hugging Face DeepseekV3 / Kimi-K2 checkpoints <-> :class:`ModelConfig`.

Published configs (legacy ``rope_theta`` + ``rope_scaling``) and transformers 5's
(``rope_parameters``) both read; a key a config.json leaves out means what it means
to transformers (``DeepseekV3Config``'s defaults), never k2jax's own default.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from k2jax.config import ConfigError, ModelConfig, YarnConfig


class HFError(ConfigError):
    """A Hugging Face checkpoint cannot be read or does not match its config (a
    ConfigError too: the checkpoint is what configures the model)."""


MODEL_TYPES = ("deepseek_v3", "kimi_k2")
# Keys of a config.json that carry nothing k2jax models (tokens, runtime, bookkeeping).
_IGNORED = {
    "architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id",
    "torch_dtype", "dtype", "transformers_version", "use_cache", "pretraining_tp",
    "attention_dropout", "num_nextn_predict_layers", "seq_aux", "ep_size",
    "quantization_config", "model_type", "rope_interleave", "moe_layer_freq",
    "hidden_act", "scoring_func", "topk_method", "attention_bias", "head_dim",
    "qk_head_dim", "num_key_value_heads", "tie_word_embeddings", "rope_scaling",
    "rope_parameters", "id2label", "label2id", "output_attentions",
    "output_hidden_states", "output_router_logits", "return_dict", "num_mtp_layers",
}
# transformers' DeepseekV3Config defaults (v5.24), for keys a config.json leaves out:
# a missing key means what it means to transformers, not k2jax's own default.
_HF_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
}
# Values k2jax requires, since the model implements only these.
_REQUIRED = {
    "hidden_act": "silu", "scoring_func": "sigmoid", "moe_layer_freq": 1,
    "attention_bias": False, "rope_interleave": True, "topk_method": "noaux_tc",
}
_YARN_FIELDS = {f.name for f in dataclasses.fields(YarnConfig)}


def read_json(path: str, what: str) -> dict:
    """A JSON file as a dict; a missing or malformed file is a ConfigError naming ``what``."""
    if not os.path.isfile(path):
        raise ConfigError(f"{what}: no {os.path.basename(path)} at {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: {path} is not valid JSON ({e})") from None


def _rope(config: dict) -> tuple[float, YarnConfig | None]:
    """(rope_theta, YaRN) from the legacy ``rope_theta`` + ``rope_scaling`` keys (the
    published configs) or transformers 5's ``rope_parameters``. A key k2jax does not
    implement (e.g. ``attention_factor``) is an error, not silently dropped."""
    rs = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta", rs.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    kind = rs.get("rope_type", rs.get("type", "default"))
    known = {"rope_type", "type", "rope_theta"} | (_YARN_FIELDS if kind == "yarn" else set())
    bad = [f"{k}={v!r}" for k, v in rs.items() if k not in known or v is None]
    if kind not in ("default", "yarn") or bad:
        raise ConfigError(f"config_from_hf: rope_scaling {', '.join(bad) or f'type {kind!r}'} "
                          f"is not supported (need 'yarn' with "
                          f"{', '.join(sorted(_YARN_FIELDS))})")
    if kind == "default":
        return theta, None
    return theta, YarnConfig(**{k: v for k, v in rs.items() if k in _YARN_FIELDS})


def config_from_hf(config: dict | str | os.PathLike, **overrides: Any) -> ModelConfig:
    """A :class:`ModelConfig` from a DeepseekV3 / Kimi-K2 ``config.json`` (the dict, the
    file, or its directory). ``overrides`` set k2jax-only fields (e.g. ``dtype``,
    ``moe_impl``). Multi-token-prediction layers are not modelled, as transformers'
    ``DeepseekV3ForCausalLM`` does not build them either."""
    if not isinstance(config, dict):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        config = read_json(path, "from_hf")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config_from_hf: unsupported model_type {model_type!r} "
                          f"(supported: {', '.join(MODEL_TYPES)})")
    for key, want in _REQUIRED.items():
        if key in config and config[key] != want:
            raise ConfigError(f"config_from_hf: {key}={config[key]!r} is not supported "
                              f"(need {want!r})")
    if config.get("num_key_value_heads", config.get("num_attention_heads")) != config.get(
            "num_attention_heads"):
        raise ConfigError("config_from_hf: num_key_value_heads must equal "
                          "num_attention_heads for MLA")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs: dict[str, Any] = {k: v for k, v in _HF_DEFAULTS.items() if k != "rope_theta"}
    for key, value in config.items():
        if key in _IGNORED or key.startswith("_"):
            continue
        if key not in names:
            raise ConfigError(f"config_from_hf: unknown config.json key {key!r}")
        kwargs[key] = value
    kwargs["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    kwargs["rope_theta"], kwargs["rope_scaling"] = _rope(config)
    kwargs["dtype"] = "float32"
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


# ModelConfig fields a checkpoint does not determine: dispatch, dtypes, balancing, init.
# hf.load lets the caller set only these; the rest must come from config.json.
TRAINING_FIELDS = ("router_bias_update_rate", "aux_loss_alpha", "moe_impl", "moe_block_size",
                   "dtype", "param_dtype", "initializer_range", "scan_layers", "remat",
                   "attention_impl", "attention_block_q", "attention_block_kv")

# Fields of ModelConfig that are k2jax's (training, dispatch, numerics), not the architecture.
_K2JAX_ONLY = {"attention", "num_key_value_heads", "head_dim", "qk_norm", "rope_scaling",
               "router_bias_update_rate", "moe_impl", "moe_block_size", "dtype",
               "param_dtype", "scan_layers", "remat", "attention_impl", "attention_block_q",
               "attention_block_kv"}


def config_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` of ``cfg`` in the published configs' (legacy) form, which
    transformers 4 and 5 both read. Raises HFError for what the HF architecture lacks."""
    if cfg.attention != "mla" or cfg.qk_norm:
        raise HFError("save: DeepseekV3ForCausalLM has MLA attention without qk_norm; this "
                      f"model has attention={cfg.attention!r}, qk_norm={cfg.qk_norm}")
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"],
                           "model_type": "deepseek_v3"}
    out.update({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if f.name not in _K2JAX_ONLY})
    rs = cfg.rope_scaling
    if rs is not None and cfg.max_position_embeddings != rs.factor * (
            rs.original_max_position_embeddings):
        # some transformers versions re-derive the factor from these two
        raise HFError(f"save: max_position_embeddings={cfg.max_position_embeddings} must equal "
                      f"rope_scaling.factor × original_max_position_embeddings = "
                      f"{rs.factor * rs.original_max_position_embeddings:g} for transformers")
    out["rope_scaling"] = None if rs is None else {
        "type": "yarn", "rope_type": "yarn",
        **{k: v for k, v in dataclasses.asdict(rs).items() if v or not k.startswith("mscale")}}
    out.update(_REQUIRED, num_key_value_heads=cfg.num_attention_heads,
               num_nextn_predict_layers=0, torch_dtype=cfg.param_dtype)
    return out
