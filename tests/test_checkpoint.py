"""Checkpointer: bit-exact round trips, retention, iterator resume, resharding, clear errors."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax.checkpoint import Checkpointer, CheckpointError, PreemptionGuard


def _train_state(seed=0):
    k = jax.random.key(seed)
    params = {"dense": {"w": jax.random.normal(k, (8, 4)), "b": jnp.arange(4.0)},
              "embed": jax.random.normal(jax.random.fold_in(k, 1), (16, 8), jnp.bfloat16)}
    tx = optax.adamw(1e-2)
    opt = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt = tx.update(grads, opt, params)  # non-trivial mu / nu / count
    return {"params": params, "opt": opt, "step": jnp.int32(7),
            "rng": jax.random.key_data(jax.random.key(3))}


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def test_round_trip_is_bit_identical(tmp_path):
    state = _train_state()
    with Checkpointer(tmp_path / "ckpt", save_every=1, keep=3) as ckpt:
        assert ckpt.save(10, state)
        ckpt.wait()
        restored, step = ckpt.restore(_abstract(state))
    _assert_identical(restored, state)
    with Checkpointer(tmp_path / "ckpt", save_every=1, keep=3) as ckpt:  # a resumed run
        restored, step = ckpt.restore(_abstract(state))
    assert step == 10
    _assert_identical(restored, state)
    assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
    assert restored["rng"].dtype == jnp.uint32


def test_masked_nodes_and_nnx_state_round_trip(tmp_path):
    params = {"w": jnp.ones((4, 3)), "b": jnp.arange(3.0)}
    tx = optax.partition({"adam": optax.adamw(1e-3), "sgd": optax.sgd(1e-2, momentum=0.9)},
                         {"w": "adam", "b": "sgd"})
    _, model_state = nnx.split(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    state = {"model": model_state, "opt": tx.init(params)}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state)
        abstract = jax.eval_shape(lambda: state)
        abstract = jax.tree.map(lambda a, x: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                   sharding=x.sharding),
                                abstract, state)
        restored, _ = ckpt.restore(abstract)
    assert isinstance(restored["model"], nnx.State)
    assert isinstance(restored["opt"].inner_states["adam"].inner_state[0].mu["b"],
                      optax.MaskedNode)
    _assert_identical(restored, state)
    # Stored under plain names, not NNX Variable internals.
    md = ocp.StandardCheckpointer().metadata(tmp_path / "1" / "state").item_metadata
    assert set(md["model"]) == {"kernel", "bias"}


def test_keep_and_save_every(tmp_path):
    state = {"x": jnp.zeros(3)}
    with Checkpointer(tmp_path, save_every=5, keep=2) as ckpt:
        saved = [s for s in range(1, 21) if ckpt.save(s, state)]
        assert saved == [5, 10, 15, 20]
        assert ckpt.save(23, state, force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [20, 23] and ckpt.latest_step() == 23
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [20, 23]


def _iterator():
    ds = grain.MapDataset.range(1000).shuffle(seed=1).map(lambda i: i * 10).batch(4)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def test_data_iterator_resumes(tmp_path):
    it = _iterator()
    for _ in range(5):
        next(it)
    state = {"x": jnp.ones(2)}
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        ckpt.save(5, state, it)
        expected = [next(it) for _ in range(3)]  # advances while the save may be in flight
        ckpt.wait()
        files = os.listdir(tmp_path / "5" / "data")
        assert f"process_0-of-{jax.process_count()}.json" in files
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:  # a resumed run
        fresh = _iterator()
        _, step = ckpt.restore(_abstract(state), fresh)
    assert step == 5
    for want in expected:
        np.testing.assert_array_equal(next(fresh), want)


def test_restore_reshards(tmp_path):
    devices = np.array(jax.devices()[:8])
    row = NamedSharding(Mesh(devices, ("x",)), P("x"))
    x = jax.device_put(jnp.arange(64, dtype=jnp.float32).reshape(16, 4), row)
    state = {"w": x, "step": jnp.int32(1)}
    with Checkpointer(tmp_path, save_every=1, keep=1) as ckpt:
        ckpt.save(1, state)
        mesh2 = Mesh(devices.reshape(2, 4), ("y", "x"))
        for spec in (P(None, "x"), P("y", "x"), P()):
            sharding = NamedSharding(mesh2, spec)
            target = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=sharding),
                      "step": jax.ShapeDtypeStruct((), jnp.int32)}
            restored, _ = ckpt.restore(target)
            assert restored["w"].sharding == sharding
            np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(x))
            assert int(restored["step"]) == 1


def test_errors(tmp_path):
    state = _train_state()
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ckpt.restore(_abstract(state))
        ckpt.save(4, state)
    with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
        with pytest.raises(CheckpointError, match="refusing to overwrite"):
            ckpt.save(4, state, force=True)
        with pytest.raises(CheckpointError, match="refusing to overwrite"):
            ckpt.save(3, state)
        with pytest.raises(CheckpointError, match="no checkpoint for step 9"):
            ckpt.restore(_abstract(state), step=9)
        missing = _abstract({**state, "params": {"dense": state["params"]["dense"]}})
        with pytest.raises(CheckpointError, match="'params/embed' is only in the checkpoint"):
            ckpt.restore(missing)
        extra = _abstract({**state, "ema": jnp.zeros(2)})
        with pytest.raises(CheckpointError, match="'ema' is only in the requested state"):
            ckpt.restore(extra)
        wrong = _abstract(state)
        wrong["params"]["dense"]["w"] = jax.ShapeDtypeStruct((8, 5), jnp.float32)
        with pytest.raises(CheckpointError, match=r"'params/dense/w' is float32\[8, 4\] in"):
            ckpt.restore(wrong)
        with pytest.raises(CheckpointError, match="no data-iterator state"):
            ckpt.restore(_abstract(state), _iterator())


def test_preemption_guard():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested
    assert signal.getsignal(signal.SIGTERM) is before
