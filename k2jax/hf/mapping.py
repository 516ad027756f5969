"""Which checkpoint tensor fills which k2jax variable, and how their layouts differ.

Names and layouts are transformers' ``DeepseekV3ForCausalLM`` checkpoint format
(also Kimi K2's and DeepSeek-V3's published weights): torch ``Linear`` weights are
[out, in] and become k2jax's [in..., out...] by a transpose and a reshape
(q_b_proj → q_b [q_lora, H, nope+rope], o_proj → o [H, v, D], ...). k2jax stores
layers stacked (``model.layers.{i}`` of a MoE layer is row i − k of the
``moe_layers`` stack) and experts ``mlp.experts.{j}.{gate,up,down}_proj`` stacked
into [L, E, ...], so a spec names its tensor's ``index`` into the stack;
``mlp.gate.e_score_correction_bias`` is the routing selection bias. RoPE needs no
permutation: k2jax rotates interleaved pairs, as those checkpoints'
``rope_interleave: true`` does. Kept apart from file I/O so loading, saving and
checking share one table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from k2jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Spec:
    """One checkpoint tensor: where it lives in k2jax and how its layout differs."""

    hf: str  # checkpoint name
    path: str  # k2jax variable path, e.g. "moe_layers.moe.w_gate"
    n_in: int | None  # leading dims (after ``index``) that form torch's "in"; None: same
    index: tuple[int, ...] = ()  # into a stacked variable: (layer,) or (layer, expert)


def tensor_specs(cfg: ModelConfig) -> list[Spec]:
    """Every tensor of ``cfg``'s checkpoint, in transformers' order."""
    specs = [Spec("model.embed_tokens.weight", "embed", None)]
    k = cfg.first_k_dense_replace
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", ("dense_layers." if i < k else "moe_layers.")
        at = (i,) if i < k else (i - k,)
        layer = lambda hf, path, n_in, p=p, q=q, at=at: Spec(p + hf, q + path, n_in, at)  # noqa
        specs += [layer("input_layernorm.weight", "attn_norm.scale", None),
                  layer("post_attention_layernorm.weight", "ffn_norm.scale", None)]
        if cfg.q_lora_rank:
            specs += [layer("self_attn.q_a_proj.weight", "attn.q_a", 1),
                      layer("self_attn.q_a_layernorm.weight", "attn.q_a_norm.scale", None),
                      layer("self_attn.q_b_proj.weight", "attn.q_b", 1)]
        else:
            specs.append(layer("self_attn.q_proj.weight", "attn.q_proj", 1))
        specs += [layer("self_attn.kv_a_proj_with_mqa.weight", "attn.kv_a", 1),
                  layer("self_attn.kv_a_layernorm.weight", "attn.kv_a_norm.scale", None),
                  layer("self_attn.kv_b_proj.weight", "attn.kv_b", 1),
                  layer("self_attn.o_proj.weight", "attn.o", 2)]
        if i < k:
            specs += [layer(f"mlp.{n}_proj.weight", f"mlp.{n}", 1) for n in ("gate", "up", "down")]
            continue
        specs += [layer("mlp.gate.weight", "moe.router", 1),
                  layer("mlp.gate.e_score_correction_bias", "moe.selection_bias", None)]
        for j in range(cfg.n_routed_experts):
            specs += [Spec(f"{p}mlp.experts.{j}.{n}_proj.weight", f"{q}moe.w_{n}", 1, (*at, j))
                      for n in ("gate", "up", "down")]
        if cfg.n_shared_experts:
            specs += [layer(f"mlp.shared_experts.{n}_proj.weight", f"moe.shared.{n}", 1)
                      for n in ("gate", "up", "down")]
    specs.append(Spec("model.norm.weight", "norm.scale", None))
    if not cfg.tie_word_embeddings:
        specs.append(Spec("lm_head.weight", "lm_head", 1))
    return specs


def hf_shape(spec: Spec, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of ``spec``'s tensor, given its k2jax variable's ``shape``."""
    shape = shape[len(spec.index):]
    if spec.n_in is None:
        return shape
    return math.prod(shape[spec.n_in:]), math.prod(shape[:spec.n_in])


def to_k2jax(x: np.ndarray, spec: Spec, shape: tuple[int, ...]) -> np.ndarray:
    """Checkpoint tensor -> k2jax layout (its ``index``'s slice of a stacked variable)."""
    shape = shape[len(spec.index):]
    return x if spec.n_in is None else x.T.reshape(shape)


def to_hf(x: np.ndarray, spec: Spec) -> np.ndarray:
    """k2jax layout (its ``index``'s slice of a stacked variable) -> checkpoint tensor."""
    if spec.n_in is None:
        return x
    return x.reshape(math.prod(x.shape[:spec.n_in]), -1).T


def skipped(name: str, cfg: ModelConfig, mtp_layers: int) -> bool:
    """Checkpoint tensors k2jax does not model: the multi-token-prediction layers that
    follow the decoder (``num_nextn_predict_layers``; transformers skips them too) and
    cached RoPE tables."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    parts = name.split(".")
    return (len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and cfg.num_hidden_layers <= int(parts[2]) < cfg.num_hidden_layers + mtp_layers)
