"""The jitted step: one program per lr sweep, the non-finite guard, selection biases in
layer order, parameters from a Hugging Face checkpoint."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_runs import tiny

import optim
from experiments.train import load_config
from k2jax import hf, loop, optimizer, presets, train
from k2jax.model import Transformer
from k2jax.model.moe import update_selection_bias


def _lowered(cfg):
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg)
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings)
    batch = {"inputs": np.zeros((8, 32), np.int32), "targets": np.ones((8, 32), np.int32)}
    batch = train.global_batch(batch, mesh)
    init = jax.jit(train._init_fn(cfg, tx)).lower(jax.random.key(0), optimizer.hyperparams(cfg))
    return init.as_text(), step.lower(state, batch).as_text(), step(state, batch)


def test_lr_sweep_compiles_one_program():
    """The peak lr is state, not a constant: every lr of a sweep lowers to the same init
    and step (one compile with the persistent cache), and each still trains at its own lr."""
    a = _lowered(tiny("optimizer.lr=0.01"))
    b = _lowered(tiny("optimizer.lr=0.03"))
    assert a[0] == b[0] and a[1] == b[1]
    (sa, ma), (sb, mb) = a[2], b[2]
    lr = lambda peak: float(optim.schedule(  # noqa: E731
        peak, total_steps=1000, warmup_steps=2)(0))
    assert float(ma["train/lr"]) == pytest.approx(lr(0.01)) and float(mb["train/lr"]) == (
        pytest.approx(lr(0.03)))
    assert float(sb.opt_state.hyperparams["lr"]) == pytest.approx(0.03)
    da = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(sa.params)]
    db = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(sb.params)]
    assert da != db


def test_nonfinite_gradients_are_skipped_and_counted():
    cfg = tiny("train.steps=5")
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg)
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    before = jax.tree.map(np.asarray, (state.params, state.rest, state.opt_state))
    poison = lambda g, step: jax.tree.map(lambda x: x * jnp.nan, g)  # noqa: E731
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings, grad_hook=poison)
    batch = {"inputs": jnp.zeros((8, 32), jnp.int32), "targets": jnp.ones((8, 32), jnp.int32)}
    state, m = step(state, train.global_batch(jax.device_get(batch), mesh))
    assert int(m["train/nonfinite"]) == 1 and int(state.step) == 1
    after = jax.tree.map(np.asarray, (state.params, state.rest, state.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)


def test_logged_lr_is_the_lr_applied_after_a_skipped_step():
    """Step 1's gradients are NaN, so it is skipped and the optimizer's count stays at 1:
    steps 2 and 3 apply (and log) the warm-up at 1 and 2, not at their step numbers."""
    cfg = tiny("train.steps=8", "optimizer.warmup_steps=4")
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg)
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    poison = lambda g, step: jax.tree.map(lambda x: jnp.where(step == 1, x * jnp.nan, x), g)  # noqa: E731
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings, grad_hook=poison)
    batch = train.global_batch({"inputs": np.zeros((8, 32), np.int32),
                                "targets": np.ones((8, 32), np.int32)}, mesh)
    logged = []
    for _ in range(4):
        state, m = step(state, batch)
        logged.append((int(m["train/nonfinite"]), float(m["train/lr"])))
    want = [0.01 * (k + 1) / 4 for k in (0, 1, 1, 2)]  # linear warm-up over 4 steps
    assert [n for n, _ in logged] == [0, 1, 0, 0] and int(state.opt_state.count) == 3
    assert [lr for _, lr in logged] == pytest.approx(want, rel=1e-6)


def test_selection_biases_follow_layer_order():
    """Twelve layers (so "10" < "2" as strings): MoE layer i's bias moves by row i of the
    load, found by order, with the guard's ``ok`` respected."""
    cfg = presets.preset("tiny", "num_hidden_layers=12", "first_k_dense_replace=2")
    _, _, rest = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
    load_LE = jax.random.uniform(jax.random.key(1), (10, cfg.n_routed_experts)) * 100
    new = train.update_biases(rest, load_LE, 0.1, jnp.bool_(True))
    for i in range(10):
        got = np.asarray(new["moe_layers"]["moe"]["selection_bias"][...][i])
        want = update_selection_bias(jnp.zeros(cfg.n_routed_experts), load_LE[i], 0.1)
        np.testing.assert_array_equal(got, want)
    kept = train.update_biases(rest, load_LE, 0.1, jnp.bool_(False))
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(kept))
    with pytest.raises(ValueError, match="10 selection-bias rows for 9 MoE layers"):
        train.update_biases(rest, load_LE[:9], 0.1, jnp.bool_(True))


def test_training_starts_from_a_hugging_face_checkpoint(tmp_path):
    """The architecture from config.json (experiments.train's ``--config HF_DIR``), the
    weights loaded into their shards; a config that differs from the checkpoint fails."""
    fixture = "tests/fixtures/hf_tiny_k2"
    cfg = load_config(fixture, ["mesh.fsdp=2", "mesh.expert=2", "data.seq_len=16",
                                "data.global_batch_size=4", "train.steps=3",
                                "optimizer.qk_clip=true", "train.eval_batches=1"])
    assert cfg.train.init_from == os.path.abspath(fixture)
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg)
    state, shardings, _ = train.init_state(cfg, tx, mesh)
    state = train.init_from_hf(state, shardings, cfg, mesh)
    _, model = hf.load(fixture)
    want = jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1:])
    got = jax.tree.leaves((state.params, state.rest))
    assert len(want) == len(got)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    out = loop.run(cfg, str(tmp_path), progress=False)  # and training goes on from there
    assert out["step"] == 3 and np.isfinite(out["last"]["train/loss"])
    with pytest.raises(hf.HFError, match="model.hidden_size=48"):
        train.init_from_hf(state, shardings, load_config(fixture, ["model.hidden_size=48"]),
                           mesh)


def test_the_step_traces_at_kimi_k2_width():
    """Counts and sizes that pass 2³¹ at K2 scale stay out of int32: the AdamW group alone
    (embedding + head) has 2,354,371,584 elements, which once overflowed ``_group_rms``.
    Two layers (one dense, one MoE) at full width, traced only: nothing is allocated."""
    cfg = presets.load("kimi-k2", ["model.num_hidden_layers=2", "mesh.fsdp=1",
                                   "data.global_batch_size=2", "data.seq_len=16"])
    mesh = loop.make_mesh(cfg)
    tx = optimizer.build_optimizer(cfg)
    abstract = train.abstract_state(cfg, tx, mesh)
    graphdef = nnx.graphdef(train.abstract_model(cfg.model))
    step = train.make_train_step(cfg, graphdef, tx, mesh, train.state_shardings(abstract, mesh))
    batch = {k: jax.ShapeDtypeStruct((2, 16), jnp.int32) for k in ("inputs", "targets")}
    _, metrics = jax.eval_shape(step, abstract, batch)
    assert metrics["train/update_rms/adamw"].dtype == jnp.float32
    big = jax.ShapeDtypeStruct((3, 2**30), jnp.bfloat16)
    rms = jax.eval_shape(lambda u: train._group_rms({"a": u}, {"a": "adamw"}), big)
    assert rms["train/update_rms/adamw"].shape == ()
