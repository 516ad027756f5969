"""Train state, the jitted sharded step, and evaluation.

One ``jax.jit`` with explicit in/out shardings and donated state does the
whole step: forward (per micro-batch, gradients accumulated) → loss + aux →
gradients → ``tx.update(..., attn_max_logits=S)`` → apply → MoE selection-bias
update → metrics. A step whose loss or gradients are not finite leaves params,
optimizer state and biases untouched and reports ``nonfinite = 1``; the loop
(k2jax/loop.py) counts and stops. Nothing in the step reads files or globals.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim
from k2jax import params as params_lib
from k2jax import sharding
from k2jax.config import Config
from k2jax.model import Transformer, cross_entropy, qk_layout
from k2jax.model.moe import update_selection_bias
from optim.partition import path_str
from optim.qk_clip import find_state
from optim.qk_clip import stats as clip_stats


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: batches consumed (skipped non-finite steps included)
    params: Any  # nnx.State of Params
    rest: Any  # nnx.State of non-trainable variables (routing selection biases)
    opt_state: Any
    rng: jax.Array  # uint32 key data (plain array: checkpointable)


def learning_rate(cfg: Config, peak=None) -> Callable:
    """step -> lr; ``peak`` (default ``optimizer.lr``) may be a traced scalar."""
    o = cfg.optimizer
    return optim.schedule(o.lr if peak is None else peak, total_steps=cfg.train.steps,
                          warmup_steps=min(o.warmup_steps, cfg.train.steps), kind=o.schedule,
                          final_ratio=o.final_lr_ratio, decay_fraction=o.decay_fraction)


def hyperparams(cfg: Config) -> dict[str, jax.Array]:
    """The injected hyperparameters of ``build_optimizer``'s state, from the config."""
    o = cfg.optimizer
    return {"lr": jnp.float32(o.lr), "adam_lr": jnp.float32(o.lr if o.adam_lr is None
                                                            else o.adam_lr)}


def build_optimizer(cfg: Config) -> optax.GradientTransformationExtraArgs:
    """The configured optimizer; QK-Clip is chained when ``optimizer.clip_enabled``.

    The peak learning rates are injected hyperparameters (``optax.inject_hyperparams``):
    f32 scalars in ``opt_state.hyperparams`` (``lr``, ``adam_lr``), not constants in the
    compiled step, so every run of an lr sweep compiles to the same program (with a
    persistent compilation cache, one compile serves them all). On resume the config's
    values replace the checkpoint's (:func:`with_config_lr`).
    """
    o, m = cfg.optimizer, cfg.model

    def make(lr, adam_lr):
        tx = optim.build(
            "adamw" if o.name == "adamw" else "muon", learning_rate(cfg, lr),
            weight_decay=o.weight_decay, b1=o.b1, b2=o.b2, eps=o.eps, momentum=o.momentum,
            nesterov=o.nesterov, ns_steps=o.ns_steps, ns_coeffs=o.ns_coeffs,
            ns_dtype=jnp.dtype(o.ns_dtype), rms_scale=o.rms_scale,
            partition=params_lib.partition(m),
            adam_learning_rate=learning_rate(cfg, adam_lr),
            adam_weight_decay=o.adam_weight_decay,
            qk_layout=qk_layout(m) if o.clip_enabled else None, tau=o.tau,
            monitor_only=o.monitor_only)
        if o.grad_clip_norm:
            tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
        return tx

    return optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(**hyperparams(cfg))


def with_config_lr(state: TrainState, cfg: Config) -> TrainState:
    """``state`` with the peak learning rates of ``cfg``: the config, not a restored
    checkpoint, decides the lr a run uses."""
    hp = {k: jax.device_put(v, state.opt_state.hyperparams[k].sharding)
          for k, v in hyperparams(cfg).items()}
    return state._replace(opt_state=state.opt_state._replace(hyperparams=hp))


def _init_fn(cfg: Config, tx):
    def init(key, hparams):
        model = Transformer(cfg.model, rngs=nnx.Rngs(params=key))
        _, p, rest = nnx.split(model, nnx.Param, ...)
        # lrs as arguments, not constants: every run of an lr sweep shares one init program
        opt_state = tx.init(p)._replace(hyperparams=hparams)
        return TrainState(jnp.zeros((), jnp.int32), p, rest, opt_state,
                          jax.random.key_data(jax.random.fold_in(key, 1)))
    return init


def state_shardings(abstract: TrainState, mesh) -> TrainState:
    """Params and biases by their logical axes; every optimizer-state leaf that mirrors a
    parameter (same path suffix and shape: Adam moments, Muon momentum) like that
    parameter; the rest (counts, QK-Clip statistics) replicated."""
    p_sh = sharding.state_shardings(abstract.params, mesh)
    by_path = {path_str(kp): (x.shape, s) for (kp, x), s in zip(
        jax.tree_util.tree_flatten_with_path(abstract.params)[0], jax.tree.leaves(p_sh))}
    replicated = NamedSharding(mesh, P())

    def opt_leaf(kp, x):
        parts = path_str(kp).split(".")
        for i in range(len(parts)):
            hit = by_path.get(".".join(parts[i:]))
            if hit is not None and hit[0] == x.shape:
                return hit[1]
        return replicated

    return TrainState(
        replicated, p_sh, sharding.state_shardings(abstract.rest, mesh),
        jax.tree_util.tree_map_with_path(opt_leaf, abstract.opt_state), replicated)


def init_state(cfg: Config, tx, mesh) -> tuple[TrainState, TrainState, Any]:
    """(state, its shardings, graphdef): parameters created directly in their shards."""
    init = _init_fn(cfg, tx)
    key = jax.random.key(cfg.train.seed)
    abstract = jax.eval_shape(init, key, hyperparams(cfg))
    shardings = state_shardings(abstract, mesh)
    state = jax.jit(init, out_shardings=shardings)(key, hyperparams(cfg))
    graphdef = nnx.graphdef(params_lib.abstract_model(cfg.model))
    return state, shardings, graphdef


def init_from_hf(state: TrainState, shardings: TrainState, cfg: Config, mesh) -> TrainState:
    """``state`` with the parameters and routing biases of the Hugging Face checkpoint
    ``cfg.train.init_from`` (k2jax.hf), each built straight into its shards. The
    optimizer state (zeros, counts) does not depend on parameter values and stays; the
    random parameters are freed first, so the device never holds two copies."""
    from k2jax import hf

    hf.check(cfg.train.init_from, cfg.model)
    for x in jax.tree.leaves((state.params, state.rest)):
        x.delete()
    _, model = hf.load(cfg.train.init_from, mesh=mesh,
                       **{f: getattr(cfg.model, f) for f in hf.TRAINING_FIELDS})
    _, p, rest = nnx.split(model, nnx.Param, ...)
    return state._replace(params=jax.device_put(p, shardings.params),
                          rest=jax.device_put(rest, shardings.rest))


def abstract_state(cfg: Config, tx, mesh) -> TrainState:
    """ShapeDtypeStructs with shardings: what a checkpoint restores into."""
    abstract = jax.eval_shape(_init_fn(cfg, tx), jax.random.key(cfg.train.seed),
                              hyperparams(cfg))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, state_shardings(abstract, mesh))


def _update_biases(rest, load_LE, cfg: Config, ok):
    """DeepSeek-V3's aux-loss-free balancing, once per step from this step's load."""
    first = cfg.model.first_k_dense_replace

    def one(kp, b):
        path = path_str(kp)
        if not path.endswith("moe.selection_bias"):
            return b
        layer = int(path.split(".")[1]) - first
        new = update_selection_bias(b, load_LE[layer], cfg.model.router_bias_update_rate)
        return jnp.where(ok, new, b)

    return jax.tree_util.tree_map_with_path(one, rest)


def _group_rms(updates, labels) -> dict[str, jax.Array]:
    sums: dict[str, Any] = {}
    for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)):
        s, n = sums.get(label, (0.0, 0))
        sums[label] = (s + jnp.sum(jnp.square(u.astype(jnp.float32))), n + u.size)
    return {f"train/update_rms/{k}": jnp.sqrt(s / n) for k, (s, n) in sums.items()}


def make_train_step(cfg: Config, graphdef, tx, mesh, shardings: TrainState,
                    grad_hook: Callable | None = None):
    """jitted ``step(state, batch) -> (state, metrics)``; ``grad_hook(grads, step)`` (tests:
    fault injection) may rewrite the gradients inside the step."""
    micro = cfg.train.micro_batches
    act = NamedSharding(mesh, P(sharding.RULES["batch"], None, None))

    def loss_fn(p, rest, batch):
        model = nnx.merge(graphdef, p, rest)
        logits, aux = model(batch["inputs"], constrain=lambda x: jax.lax.with_sharding_constraint(
            x, act))
        loss, parts = cross_entropy(logits, batch["targets"], z_loss=cfg.train.z_loss)
        return loss + aux["balance_loss"], (parts, aux)

    def step(state: TrainState, batch):
        labels = params_lib.partition(cfg.model).labels(state.params)
        b = batch["inputs"].shape[0]
        split = jax.tree.map(lambda x: x.reshape(b // micro, micro, *x.shape[1:]).swapaxes(0, 1),
                             batch)

        def accumulate(carry, mb):
            (loss, (parts, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.rest, mb)
            g_acc, stats = carry
            g_acc = jax.tree.map(lambda a, x: a + x / micro, g_acc, g)
            stats = {"loss": stats["loss"] + loss / micro, "ce": stats["ce"] + parts["ce"] / micro,
                     "z": stats["z"] + parts["z_loss"] / micro,
                     "max_logits": jnp.maximum(stats["max_logits"], aux["attn_max_logits"]),
                     "load": stats["load"] + aux["expert_load"]}
            return (g_acc, stats), None

        m = cfg.model
        zeros = {"loss": 0.0, "ce": 0.0, "z": 0.0,
                 "max_logits": jnp.full((m.num_hidden_layers, m.num_attention_heads), -jnp.inf),
                 "load": jnp.zeros((m.num_moe_layers, m.n_routed_experts))}
        g0 = jax.tree.map(jnp.zeros_like, state.params)
        (grads, stats), _ = jax.lax.scan(accumulate, (g0, zeros), split)
        if grad_hook is not None:
            grads = grad_hook(grads, state.step)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(stats["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       attn_max_logits=stats["max_logits"])
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(ok, a, c), new, old)  # noqa
        new_state = TrainState(
            state.step + 1, keep(new_params, state.params),
            _update_biases(state.rest, stats["load"], cfg, ok), keep(opt_state, state.opt_state),
            state.rng)
        load = stats["load"]
        imbalance = load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)
        metrics = {
            "train/loss": stats["loss"], "train/ce": stats["ce"], "train/z_loss": stats["z"],
            "train/lr": learning_rate(
                cfg, state.opt_state.hyperparams["lr"])(state.step), "train/grad_norm": grad_norm,
            "train/nonfinite": 1 - ok.astype(jnp.int32),
            "attn/max_logits": stats["max_logits"], "moe/load_imbalance": imbalance,
            **_group_rms(updates, labels),
        }
        clip = find_state(opt_state)
        if clip is not None:
            metrics.update(clip_stats(clip))
        return new_state, metrics

    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(step, in_shardings=(shardings, {"inputs": batch_sh, "targets": batch_sh}),
                   out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(cfg: Config, graphdef, mesh, shardings: TrainState):
    """jitted ``eval(params, rest, batch) -> mean cross-entropy``."""

    def ev(p, rest, batch):
        logits, _ = nnx.merge(graphdef, p, rest)(batch["inputs"])
        return cross_entropy(logits, batch["targets"])[1]["ce"]

    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(ev, in_shardings=(shardings.params, shardings.rest,
                                     {"inputs": batch_sh, "targets": batch_sh}))


def global_batch(local: dict, mesh) -> dict:
    """This process's rows -> one global array per key, sharded over (data, fsdp)."""
    sh = sharding.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
