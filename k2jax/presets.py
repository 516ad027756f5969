"""Named model shapes: the published Kimi K2 and DeepSeek-V3, CPU-scale models, a scaling ladder.

``preset("small", "n_routed_experts=32")`` is a :class:`ModelConfig`;
``load("small", ["optimizer.lr=1e-2"])`` a whole run :class:`Config` from a
preset name or a ``config.json``. ``python -m experiments.params`` prints every
preset's total and active parameter counts.
"""

from __future__ import annotations

import os
import typing

from k2jax import overrides
from k2jax.config import Config, ConfigError, ModelConfig, YarnConfig, from_file, suggest

# Published shapes. Kimi K2: tech report (arXiv 2507.20534) Table 2 and the
# released config.json; DeepSeek-V3: arXiv 2412.19437 §4.2 and its config.json.
_KIMI_K2 = dict(
    vocab_size=163840, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=64,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
    v_head_dim=128, n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8,
    first_k_dense_replace=1, routed_scaling_factor=2.827, n_group=1, topk_group=1,
    norm_topk_prob=True, rope_theta=50000.0, max_position_embeddings=131072,
    rope_scaling=YarnConfig(factor=32.0, original_max_position_embeddings=4096,
                            beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    rms_norm_eps=1e-6, initializer_range=0.02, aux_loss_alpha=0.001, dtype="bfloat16",
    remat="full",  # execution at pod scale: recompute each layer in the backward pass
)
_DEEPSEEK_V3 = dict(
    _KIMI_K2, vocab_size=129280, num_attention_heads=128, n_routed_experts=256,
    first_k_dense_replace=3, routed_scaling_factor=2.5, n_group=8, topk_group=4,
    rope_theta=10000.0, max_position_embeddings=163840, aux_loss_alpha=0.0,
    rope_scaling=YarnConfig(factor=40.0, original_max_position_embeddings=4096,
                            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
)


def _ladder(d: int, layers: int) -> dict:
    """A scaling-ladder rung with K2's ratios: head dims 32/16/32, heads = d/32,
    ffn ~2.5d dense and d experts' width, 32 experts top-4 + 1 shared."""
    heads = max(2, d // 32)
    return dict(
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=3 * d, moe_intermediate_size=d, q_lora_rank=d // 2,
        kv_lora_rank=max(32, d // 4), qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_routed_experts=32, num_experts_per_tok=4,
    )


PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, q_lora_rank=32,
                 kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2),
    "small": dict(),  # the ModelConfig defaults: ~3M total, <1M active
    "ladder-d64": _ladder(64, 2),
    "ladder-d128": _ladder(128, 4),
    "ladder-d192": _ladder(192, 6),
    "ladder-d256": _ladder(256, 8),
    "ladder-d384": _ladder(384, 10),
    "kimi-k2": _KIMI_K2,
    "deepseek-v3": _DEEPSEEK_V3,
}


def preset(name: str, *changes: str) -> ModelConfig:
    """The named preset, with optional ``key=value`` overrides applied."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (have {', '.join(PRESETS)})"
                          f"{suggest(name, PRESETS)}")
    return overrides.apply(ModelConfig(**PRESETS[name]), changes)


def load(preset_or_file: str | os.PathLike, changes: typing.Iterable[str] = ()) -> Config:
    """A run config from a model preset name or a config JSON file, then dotted overrides
    (``model.hidden_size=256``, ``optimizer.lr=1e-2``, ``data.seq_len=256``)."""
    name = os.fspath(preset_or_file)
    if name in PRESETS:
        cfg = Config(model=preset(name))
    elif os.path.isfile(name):
        cfg = from_file(name)
    else:
        raise ConfigError(f"--config {name!r} is neither a preset ({', '.join(PRESETS)}) "
                          f"nor a file{suggest(name, PRESETS)}")
    return overrides.apply(cfg, changes)
