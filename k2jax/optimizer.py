"""How the optimizer sees the model: the Muon partition, the QK-Clip layout, the lr schedule.

``optim/`` is model-agnostic and ``k2jax/model`` knows nothing of optimizers;
this module joins them. The views are derived from parameter paths
(``moe_layers.attn.q_b``: a stack [L, Q, H, K] of layers) in exactly one place each
and checked over the whole tree by the tests: which leaves Muon owns and which decay
(both from the path patterns below: a layer stack is L matrices to Muon, an expert
stack L·E), and where QK-Clip finds each layer's query/key slices by layer axis, head
axis and column range.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

import optim
from k2jax import params, sharding
from k2jax.config import Config, ModelConfig, OptimizerConfig
from optim.distributed_ns import Placement
from optim.partition import ADAMW, MatrixDims, Partition
from optim.paths import flatten, path_str
from optim.qk_clip import ClipTarget, QKLayout

# The leaves that are not hidden matrices, by path: the embedding [V, D], the LM head
# [D, V], each MoE router [L, D, E] and every RMSNorm scale. The model has no biases (the
# router's selection bias is not a parameter).
EMBED, LM_HEAD, ROUTER, NORM = r"embed", r"lm_head", r".*\.moe\.router", r".*norm\.scale"

# A stacked [L, in, out] matrix (k2jax.model.transformer: every layer leaf has a leading
# layer axis): L separate in x out matrices.
LAYER_MATRIX = MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))

# How each hidden matrix is a batch of matrices to Muon (Kimi K2 §2.1 / Moonlight §2:
# Muon for hidden matrices): each layer's matrices separately. Every model leaf must
# match a rule; an unmatched one is an error.
MATRIX_RULES = (
    # routed experts [L, E, in, out]: L·E separate matrices. The batch is ordered expert
    # first, so the merged batch axis keeps the expert split as its major part
    # (optim.distributed_ns reshards it without a shuffle).
    (r".*\.moe\.(w_gate|w_up|w_down)", MatrixDims(fan_in=(2,), fan_out=(3,), batch=(1, 0))),
    # per-head projections [L, in, heads, head_dim]: one in x (heads*head_dim) per layer
    (r".*\.attn\.(q_b|q_proj|k_proj|v_proj|kv_b)", MatrixDims(fan_in=(1,), fan_out=(2, 3),
                                                           batch=(0,))),
    # output projection [L, heads, head_dim, D]: one (heads*head_dim) x D per layer
    (r".*\.attn\.o", MatrixDims(fan_in=(1, 2), fan_out=(3,), batch=(0,))),
    (r".*\.attn\.(q_a|kv_a)", LAYER_MATRIX),
    (r".*\.(mlp|shared)\.(gate|up|down)", LAYER_MATRIX),
)


def partition(cfg: OptimizerConfig | None = None) -> Partition:
    """The Muon / AdamW partition: hidden matrices to Muon, norms to AdamW, and the router,
    embedding and LM head to AdamW (Kimi K2, Moonlight) unless ``optimizer.muon_router``,
    ``muon_embeddings`` or ``muon_lm_head`` gives them to Muon, each as one fan_in x
    fan_out matrix (the embedding's fan-in is the one-hot vocabulary)."""
    o = cfg or OptimizerConfig()
    chosen = ((EMBED, o.muon_embeddings, MatrixDims()), (LM_HEAD, o.muon_lm_head, MatrixDims()),
              (ROUTER, o.muon_router, LAYER_MATRIX))
    rules = tuple((pattern, dims if muon else ADAMW) for pattern, muon, dims in chosen)
    return Partition(rules=(*rules, (NORM, ADAMW), *MATRIX_RULES))


def decay_mask(cfg: OptimizerConfig) -> Callable | None:
    """params -> bool tree of the leaves that take weight decay (in either group), or None
    when every leaf does (the default: an unmasked add_decayed_weights, state unchanged).
    ``optimizer.decay_norms=false`` spares the RMSNorm scales, ``decay_embeddings=false``
    the embedding and LM head."""
    spared = (([] if cfg.decay_norms else [NORM])
              + ([] if cfg.decay_embeddings else [EMBED, LM_HEAD]))
    if not spared:
        return None
    return lambda tree: jax.tree_util.tree_map_with_path(
        lambda kp, _: not any(re.fullmatch(p, path_str(kp)) for p in spared), tree)


def qk_layout(cfg: ModelConfig, alpha: float = 0.5) -> QKLayout:
    """Where QK-Clip finds each layer's per-head query/key slices (see optim.qk_clip), with
    the split ``alpha`` (``optimizer.qk_clip_alpha``) of γ between query and key.

    MLA: q_b (or q_proj) [.., H, nope+rope]: no-RoPE part ×γ^α, RoPE part ×γ;
    kv_b [.., H, nope+v]: no-RoPE key part ×γ^(1−α), values untouched; the shared RoPE
    key in kv_a untouched. MHA: q_proj ×γ^α, k_proj ×γ^(1−α). GQA: q_proj ×γ, keys
    untouched. Every head's logit q·k scales by exactly γ.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"qk_layout: alpha={alpha} must be in [0, 1]")
    if cfg.qk_norm:
        raise ValueError("qk_layout: qk_norm=True normalises q and k, so scaling their "
                         "weights cannot clip logits; use QK-Clip or qk_norm, not both")
    targets = []
    k, n = cfg.first_k_dense_replace, cfg.num_hidden_layers
    for stack, first, size in (("dense_layers", 0, k), ("moe_layers", k, n - k)):
        if not size:
            continue
        pre = f"{stack}.attn."
        at = lambda name, slices: ClipTarget(pre + name, first, 2, slices, layer_axis=0)  # noqa
        if cfg.attention == "mla":
            nope, rdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
            q_name = "q_b" if cfg.q_lora_rank else "q_proj"
            targets.append(at(q_name, ((0, nope, alpha), (nope, nope + rdim, 1.0))))
            targets.append(at("kv_b", ((0, nope, 1 - alpha),)))
        elif cfg.kv_heads == cfg.num_attention_heads:
            hd = cfg.mha_head_dim
            targets.append(at("q_proj", ((0, hd, alpha),)))
            targets.append(at("k_proj", ((0, hd, 1 - alpha),)))
        else:
            targets.append(at("q_proj", ((0, cfg.mha_head_dim, 1.0),)))
    return QKLayout(cfg.num_hidden_layers, cfg.num_attention_heads, tuple(targets))


def learning_rate(cfg: Config, peak=None) -> Callable:
    """step -> lr; ``peak`` (default ``optimizer.lr``) may be a traced scalar."""
    o = cfg.optimizer
    return optim.schedule(o.lr if peak is None else peak, total_steps=cfg.train.steps,
                          warmup_steps=min(o.warmup_steps, cfg.train.steps), kind=o.schedule,
                          final_ratio=o.final_lr_ratio, decay_fraction=o.decay_fraction)


def hyperparams(cfg: Config) -> dict[str, jax.Array]:
    """The injected hyperparameters of :func:`build_optimizer`'s state, from the config:
    the peak lr, and the AdamW group's (``adam_lr_ratio`` x lr under Muon; lr under AdamW,
    where every leaf is in that group)."""
    o = cfg.optimizer
    ratio = o.adam_lr_ratio if o.name == "muon" else 1.0
    return {"lr": jnp.float32(o.lr), "adam_lr": jnp.float32(o.lr * ratio)}


def applied_lr(cfg: Config, opt_state) -> jax.Array:
    """The lr that ``opt_state``'s next update applies: the schedule at the optimizer's own
    update count. The non-finite guard (k2jax.train.guarded_update) keeps the old optimizer
    state on a skipped step, so this count, unlike ``TrainState.step``, counts only the
    updates that were applied."""
    return learning_rate(cfg, opt_state.hyperparams["lr"])(opt_state.count)


def placement(cfg: ModelConfig, mesh) -> Placement:
    """Where Muon's Newton–Schulz runs on ``mesh``: whole matrices per device, each update
    returned to its parameter's sharding (from the logical axes, k2jax.sharding)."""
    _, p, _ = nnx.split(params.abstract_model(cfg), nnx.Param, ...)
    return Placement(mesh, flatten(sharding.variable_shardings(p, mesh),
                                   is_leaf=lambda x: isinstance(x, NamedSharding)))


def build_optimizer(cfg: Config, mesh=None) -> optax.GradientTransformationExtraArgs:
    """The configured optimizer; QK-Clip is chained when ``optimizer.qk_clip``.

    Given the ``mesh``, Newton–Schulz is split across it (:func:`placement`); without one
    it runs where GSPMD puts it (one device, or tests of the unsharded optimizer).

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
            ns_dtype=jnp.dtype(o.ns_dtype), update_scale=o.update_scale, rms_scale=o.rms_scale,
            partition=partition(o), adam_learning_rate=learning_rate(cfg, adam_lr),
            adam_weight_decay=o.adam_weight_decay, decay_mask=decay_mask(o),
            mu_dtype=jnp.dtype(o.mu_dtype),
            qk_layout=qk_layout(m, o.qk_clip_alpha) if o.qk_clip else None, tau=o.tau,
            monitor_only=o.monitor_only,
            placement=None if mesh is None or o.name != "muon" else placement(m, mesh))
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
