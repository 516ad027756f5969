"""Train state, the jitted sharded step, and evaluation.

One ``jax.jit`` with explicit in/out shardings and donated state does the whole
step, composed of the top-level functions below:

    micro_batch_grads   forward + backward per micro-batch, gradients and statistics summed
    guarded_update      tx.update(..., attn_max_logits=S) → apply, unless non-finite
    update_biases       MoE selection biases from this step's expert load
    step_metrics        what the host loop logs

A step whose loss or gradients are not finite leaves params, optimizer state and
biases untouched and reports ``nonfinite = 1``; the loop (k2jax/loop.py) counts
and stops. Nothing in the step reads files or globals.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import hf, sharding
from k2jax import optimizer as optimizer_lib
from k2jax.config import Config
from k2jax.model import Transformer, cross_entropy
from k2jax.model.layers import SelectionBias
from k2jax.model.moe import update_selection_bias
from k2jax.params import abstract_model
from optim.qk_clip import find_state
from optim.qk_clip import stats as clip_stats


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: batches consumed (skipped non-finite steps included)
    params: Any  # nnx.State of Params
    rest: Any  # nnx.State of non-trainable variables (routing selection biases)
    opt_state: Any
    rng: jax.Array  # uint32 key data (plain array: checkpointable)


# ---------------------------------------------------------------------------
# state: created in its shards, restored, or started from a Hugging Face checkpoint


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
    """Params and biases by their logical axes, optimizer-state leaves like the parameter
    they mirror (k2jax.sharding.mirrored_shardings), the rest replicated."""
    p_sh = sharding.variable_shardings(abstract.params, mesh)
    replicated = NamedSharding(mesh, P())
    return TrainState(
        replicated, p_sh, sharding.variable_shardings(abstract.rest, mesh),
        sharding.mirrored_shardings(abstract.opt_state, abstract.params, p_sh, mesh),
        replicated)


def init_state(cfg: Config, tx, mesh) -> tuple[TrainState, TrainState, Any]:
    """(state, its shardings, graphdef): parameters created directly in their shards."""
    init = _init_fn(cfg, tx)
    key = jax.random.key(cfg.train.seed)
    hparams = optimizer_lib.hyperparams(cfg)
    shardings = state_shardings(jax.eval_shape(init, key, hparams), mesh)
    state = jax.jit(init, out_shardings=shardings)(key, hparams)
    return state, shardings, nnx.graphdef(abstract_model(cfg.model))


def abstract_state(cfg: Config, tx, mesh) -> TrainState:
    """ShapeDtypeStructs with shardings: what a checkpoint restores into."""
    abstract = jax.eval_shape(_init_fn(cfg, tx), jax.random.key(cfg.train.seed),
                              optimizer_lib.hyperparams(cfg))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, state_shardings(abstract, mesh))


def init_from_hf(state: TrainState, shardings: TrainState, cfg: Config, mesh) -> TrainState:
    """``state`` with the parameters and routing biases of the Hugging Face checkpoint
    ``cfg.train.init_from`` (k2jax.hf), each built straight into its shards. The
    optimizer state (zeros, counts) does not depend on parameter values and stays; the
    random parameters are freed first, so the device never holds two copies."""
    hf.check(cfg.train.init_from, cfg.model)
    for x in jax.tree.leaves((state.params, state.rest)):
        x.delete()
    _, model = hf.load(cfg.train.init_from, mesh=mesh,
                       **{f: getattr(cfg.model, f) for f in hf.TRAINING_FIELDS})
    _, p, rest = nnx.split(model, nnx.Param, ...)
    return state._replace(params=jax.device_put(p, shardings.params),
                          rest=jax.device_put(rest, shardings.rest))


# ---------------------------------------------------------------------------
# the step


def loss_fn(params, rest, batch, *, graphdef, cfg: Config, constrain):
    """(loss + balance loss, (loss parts, model aux)) of one micro-batch."""
    model = nnx.merge(graphdef, params, rest)
    logits_BTV, aux = model(batch["inputs"], constrain=constrain)
    loss, parts = cross_entropy(logits_BTV, batch["targets"], z_loss=cfg.train.z_loss)
    return loss + aux["balance_loss"], (parts, aux)


def micro_batch_grads(state: TrainState, batch, loss: Callable, cfg: Config):
    """Mean gradients over ``train.micro_batches`` micro-batches (a scan: one compiled
    forward/backward), with mean losses, the elementwise max of the per-head max logits
    and the summed expert loads."""
    micro, m = cfg.train.micro_batches, cfg.model
    b = batch["inputs"].shape[0]
    split = jax.tree.map(lambda x: x.reshape(b // micro, micro, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def accumulate(carry, mb):
        (total, (parts, aux)), g = jax.value_and_grad(loss, has_aux=True)(
            state.params, state.rest, mb)
        g_acc, stats = carry
        g_acc = jax.tree.map(lambda a, x: a + x / micro, g_acc, g)
        stats = {"loss": stats["loss"] + total / micro, "ce": stats["ce"] + parts["ce"] / micro,
                 "z": stats["z"] + parts["z_loss"] / micro,
                 "max_logits": jnp.maximum(stats["max_logits"], aux["attn_max_logits"]),
                 "load": stats["load"] + aux["expert_load"]}
        return (g_acc, stats), None

    zeros = {"loss": 0.0, "ce": 0.0, "z": 0.0,
             "max_logits": jnp.full((m.num_hidden_layers, m.num_attention_heads), -jnp.inf),
             "load": jnp.zeros((m.num_moe_layers, m.n_routed_experts))}
    g0 = jax.tree.map(jnp.zeros_like, state.params)
    (grads, stats), _ = jax.lax.scan(accumulate, (g0, zeros), split)
    return grads, stats


def guarded_update(state: TrainState, grads, stats, tx):
    """(params, opt_state, updates, ok, grad_norm): the optimizer step, QK-Clip fed by
    this step's max logits; where the loss or gradient norm is not finite (``ok`` false)
    the old params and optimizer state are kept."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(stats["loss"]) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   attn_max_logits=stats["max_logits"])
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, c: jnp.where(ok, a, c), new, old)  # noqa
    return (keep(new_params, state.params), keep(opt_state, state.opt_state), updates, ok,
            grad_norm)


def update_biases(rest, load_LE, rate: float, ok):
    """DeepSeek-V3's aux-loss-free balancing, once per step from this step's load.

    The selection biases are the only ``SelectionBias`` variables: one [L_moe, E] stack
    (k2jax.model.transformer), whose rows are the MoE layers in order, as are
    ``load_LE``'s."""
    is_bias = lambda x: isinstance(x, SelectionBias)  # noqa: E731
    leaves, treedef = jax.tree.flatten(rest, is_leaf=is_bias)
    rows = sum(x.shape[0] for x in leaves if is_bias(x))
    if rows != load_LE.shape[0]:
        raise ValueError(f"{rows} selection-bias rows for {load_LE.shape[0]} MoE layers")
    new, start = [], 0
    for x in leaves:
        if is_bias(x):
            load = load_LE[start:start + x.shape[0]]
            x = x.replace(jnp.where(ok, update_selection_bias(x[...], load, rate), x[...]))
            start += x.shape[0]
        new.append(x)
    return jax.tree.unflatten(treedef, new)


def _group_rms(updates, labels) -> dict[str, jax.Array]:
    """RMS of each group's updates. The element count is a Python float: at Kimi K2's
    width the AdamW group alone (embedding + head) has 2.35e9 > 2³¹ elements, which a
    Python int would overflow as a JAX int32."""
    sums: dict[str, Any] = {}
    for u, label in zip(jax.tree.leaves(updates), jax.tree.leaves(labels)):
        s, n = sums.get(label, (0.0, 0.0))
        sums[label] = (s + jnp.sum(jnp.square(u.astype(jnp.float32))), n + float(u.size))
    return {f"train/update_rms/{k}": jnp.sqrt(s / n) for k, (s, n) in sums.items()}


def step_metrics(state: TrainState, stats, updates, opt_state, ok, grad_norm,
                 cfg: Config) -> dict[str, jax.Array]:
    """The step's device metrics; the host loop (k2jax/loop.py) names them per layer."""
    load_LE = stats["load"]
    labels = optimizer_lib.partition(cfg.optimizer).labels(state.params)
    metrics = {
        "train/loss": stats["loss"], "train/ce": stats["ce"], "train/z_loss": stats["z"],
        "train/lr": optimizer_lib.applied_lr(cfg, state.opt_state),  # skips do not advance it
        "train/grad_norm": grad_norm, "train/nonfinite": 1 - ok.astype(jnp.int32),
        "attn/max_logits": stats["max_logits"],
        "moe/load_imbalance": load_LE.max(-1) / jnp.maximum(load_LE.mean(-1), 1e-9),
        **_group_rms(updates, labels),
    }
    clip = find_state(opt_state)
    if clip is not None:
        metrics.update(clip_stats(clip))
    return metrics


def train_step(state: TrainState, batch, *, cfg: Config, graphdef, tx, constrain,
               grad_hook: Callable | None = None):
    """One optimizer step on one global batch -> (new state, metrics)."""
    loss = functools.partial(loss_fn, graphdef=graphdef, cfg=cfg, constrain=constrain)
    grads, stats = micro_batch_grads(state, batch, loss, cfg)
    if grad_hook is not None:
        grads = grad_hook(grads, state.step)
    params, opt_state, updates, ok, grad_norm = guarded_update(state, grads, stats, tx)
    rest = update_biases(state.rest, stats["load"], cfg.model.router_bias_update_rate, ok)
    new_state = TrainState(state.step + 1, params, rest, opt_state, state.rng)
    return new_state, step_metrics(state, stats, updates, opt_state, ok, grad_norm, cfg)


def make_train_step(cfg: Config, graphdef, tx, mesh, shardings: TrainState,
                    grad_hook: Callable | None = None):
    """jitted ``step(state, batch) -> (state, metrics)``; ``grad_hook(grads, step)`` (tests:
    fault injection) may rewrite the gradients inside the step. Traced under ``mesh``
    (k2jax.sharding.under_mesh), so the MoE layers dispatch expert-parallel on it."""
    size = cfg.data.global_batch_size
    act = sharding.batch_sharding(mesh, 3, size=size // cfg.train.micro_batches)
    step = functools.partial(
        train_step, cfg=cfg, graphdef=graphdef, tx=tx, grad_hook=grad_hook,
        constrain=lambda x: jax.lax.with_sharding_constraint(x, act))
    batch_sh = sharding.batch_sharding(mesh, size=size)
    return jax.jit(sharding.under_mesh(step, mesh),
                   in_shardings=(shardings, {"inputs": batch_sh, "targets": batch_sh}),
                   out_shardings=(shardings, None), donate_argnums=0)


def make_eval_step(cfg: Config, graphdef, mesh, shardings: TrainState):
    """jitted ``eval(params, rest, batch) -> mean cross-entropy``, traced under ``mesh``."""

    def ev(p, rest, batch):
        logits_BTV, _ = nnx.merge(graphdef, p, rest)(batch["inputs"])
        return cross_entropy(logits_BTV, batch["targets"])[1]["ce"]

    batch_sh = sharding.batch_sharding(mesh, size=cfg.data.global_batch_size)
    return jax.jit(sharding.under_mesh(ev, mesh),
                   in_shardings=(shardings.params, shardings.rest,
                                 {"inputs": batch_sh, "targets": batch_sh}))


def global_batch(local: dict, mesh) -> dict:
    """This process's rows -> one global array per key, sharded over the batch axes
    (k2jax.sharding.batch_sharding) that divide the global row count."""
    rows = next(iter(local.values())).shape[0] * jax.process_count()
    sh = sharding.batch_sharding(mesh, size=rows)
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in local.items()}
