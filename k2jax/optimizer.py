"""How the optimizer sees the model: the Muon partition, the QK-Clip layout, the lr schedule.

``optim/`` is model-agnostic and ``k2jax/model`` knows nothing of optimizers;
this module joins them. Both views are derived from parameter paths
(``layers.3.attn.q_b``) in exactly one place each and checked over the whole
tree by the tests: an expert stack is E matrices to Muon, and QK-Clip finds
each head's query/key slices by layer, head axis and column range.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import optim
from k2jax.config import Config, ModelConfig
from optim.partition import ADAMW, MatrixDims, Partition
from optim.qk_clip import ClipTarget, QKLayout

# Which parameters Muon owns and how each is a batch of matrices (Kimi K2 §2.1 /
# Moonlight §2: Muon for hidden matrices; AdamW for embeddings, head, norms, router).
# Every model leaf must match a rule; an unmatched one is an error.
MUON_RULES = Partition(rules=(
    (r"embed|lm_head", ADAMW),
    (r".*\.moe\.router", ADAMW),
    (r".*norm\.scale", ADAMW),
    # routed experts [E, in, out]: E separate matrices
    (r".*\.moe\.(w_gate|w_up|w_down)", MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))),
    # per-head projections [in, heads, head_dim]: one in x (heads*head_dim) matrix
    (r".*\.attn\.(q_b|q_proj|k_proj|v_proj|kv_b)", MatrixDims(fan_in=(0,), fan_out=(1, 2))),
    # output projection [heads, head_dim, D]: one (heads*head_dim) x D matrix
    (r".*\.attn\.o", MatrixDims(fan_in=(0, 1), fan_out=(2,))),
    (r".*\.attn\.(q_a|kv_a)", MatrixDims()),
    (r".*\.(mlp|shared)\.(gate|up|down)", MatrixDims()),
))


def partition(cfg: ModelConfig | None = None) -> Partition:
    """The Muon / AdamW partition of the model's parameters (config-independent today)."""
    del cfg
    return MUON_RULES


def qk_layout(cfg: ModelConfig) -> QKLayout:
    """Where QK-Clip finds each layer's per-head query/key slices (see optim.qk_clip).

    MLA: q_b (or q_proj) [.., H, nope+rope]: no-RoPE part ×√γ, RoPE part ×γ;
    kv_b [.., H, nope+v]: no-RoPE key part ×√γ, values untouched; the shared RoPE
    key in kv_a untouched. MHA: q_proj and k_proj ×√γ. GQA: q_proj ×γ, keys untouched.
    """
    if cfg.qk_norm:
        raise ValueError("qk_layout: qk_norm=True normalises q and k, so scaling their "
                         "weights cannot clip logits; use QK-Clip or qk_norm, not both")
    targets = []
    for layer in range(cfg.num_hidden_layers):
        pre = f"layers.{layer}.attn."
        if cfg.attention == "mla":
            nope, rdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
            q_name = "q_b" if cfg.q_lora_rank else "q_proj"
            targets.append(ClipTarget(pre + q_name, layer, 1,
                                      ((0, nope, 0.5), (nope, nope + rdim, 1.0))))
            targets.append(ClipTarget(pre + "kv_b", layer, 1, ((0, nope, 0.5),)))
        elif cfg.kv_heads == cfg.num_attention_heads:
            hd = cfg.mha_head_dim
            targets.append(ClipTarget(pre + "q_proj", layer, 1, ((0, hd, 0.5),)))
            targets.append(ClipTarget(pre + "k_proj", layer, 1, ((0, hd, 0.5),)))
        else:
            targets.append(ClipTarget(pre + "q_proj", layer, 1, ((0, cfg.mha_head_dim, 1.0),)))
    return QKLayout(cfg.num_hidden_layers, cfg.num_attention_heads, tuple(targets))


def learning_rate(cfg: Config, peak=None) -> Callable:
    """step -> lr; ``peak`` (default ``optimizer.lr``) may be a traced scalar."""
    o = cfg.optimizer
    return optim.schedule(o.lr if peak is None else peak, total_steps=cfg.train.steps,
                          warmup_steps=min(o.warmup_steps, cfg.train.steps), kind=o.schedule,
                          final_ratio=o.final_lr_ratio, decay_fraction=o.decay_fraction)


def hyperparams(cfg: Config) -> dict[str, jax.Array]:
    """The injected hyperparameters of :func:`build_optimizer`'s state, from the config."""
    o = cfg.optimizer
    return {"lr": jnp.float32(o.lr), "adam_lr": jnp.float32(o.lr if o.adam_lr is None
                                                            else o.adam_lr)}


def build_optimizer(cfg: Config) -> optax.GradientTransformationExtraArgs:
    """The configured optimizer; QK-Clip is chained when ``optimizer.qk_clip``.

    The peak learning rates are injected hyperparameters (``optax.inject_hyperparams``):
    f32 scalars in ``opt_state.hyperparams`` (``lr``, ``adam_lr``), not constants in the
    compiled step, so every run of an lr sweep compiles to the same program (with a
    persistent compilation cache, one compile serves them all). On resume the config's
    values replace the checkpoint's (:func:`with_config_lr`).
    """
    o, m = cfg.optimizer, cfg.model

    def make(lr, adam_lr):
        tx = optim.build(
            o.name, learning_rate(cfg, lr),
            weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, momentum=o.momentum,
            nesterov=o.nesterov, ns_steps=o.ns_steps, ns_coeffs=o.ns_coeffs,
            ns_dtype=jnp.dtype(o.ns_dtype), rms_scale=o.rms_scale, partition=partition(m),
            adam_learning_rate=learning_rate(cfg, adam_lr),
            adam_weight_decay=o.adam_weight_decay,
            qk_layout=qk_layout(m) if o.qk_clip else None, tau=o.tau,
            monitor_only=o.monitor_only)
        if o.grad_clip_norm:
            tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
        return tx

    return optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(**hyperparams(cfg))


def with_config_lr(opt_state, cfg: Config):
    """``opt_state`` with the peak learning rates of ``cfg``: the config, not a restored
    checkpoint, decides the lr a run uses."""
    hp = {k: jax.device_put(v, opt_state.hyperparams[k].sharding)
          for k, v in hyperparams(cfg).items()}
    return opt_state._replace(hyperparams=hp)
