import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optim
from k2jax import config, params
from optim import ADAMW, MatrixDims, Partition
from optim.newton_schulz import coefficients

PART = Partition(rules=(
    (r"experts", MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))),
    (r"heads", MatrixDims(fan_in=(0,), fan_out=(1, 2))),
    (r"w", MatrixDims()),
    (r"emb|b", ADAMW),
))


def _tree(rng):
    return {"w": rng.normal(size=(16, 24)), "experts": rng.normal(size=(3, 8, 12)),
            "heads": rng.normal(size=(10, 2, 6)), "b": rng.normal(size=(24,)),
            "emb": rng.normal(size=(10, 16))}


def _ns_np(m):
    table, _ = coefficients("jordan", 5)
    tall = m.shape[0] > m.shape[1]
    x = m.T if tall else m
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in table:
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


def _muon_np_step(w, m, g, lr, wd, mu=0.95, views=None):
    """K2 Algorithm 1, Nesterov: M = μM + G; O = NS(μM + G)·0.2·√max(n, m); W -= η(O + λW)."""
    m = mu * m + g
    d = mu * m + g
    mats = views(d)
    o = np.stack([_ns_np(x) * 0.2 * np.sqrt(max(x.shape)) for x in mats])
    return w - lr * (views(o, inverse=w.shape) + wd * w), m


def _views(key):
    def f(x, inverse=None):
        if key == "experts":
            return x if inverse else x
        if key == "heads":
            return x.reshape(inverse) if inverse else x.reshape(1, 10, 12)
        return x.reshape(inverse) if inverse else x[None]
    return f


def _adamw_np_step(w, m, v, g, t, lr, wd, b1=0.9, b2=0.95, eps=1e-8):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return w - lr * (mhat / (np.sqrt(vhat) + eps) + wd * w), m, v


def test_muon_equals_numpy_k2_algorithm_1():
    rng = np.random.default_rng(0)
    w0 = _tree(rng)
    lr, wd = 0.02, 0.1
    tx = optim.muon(lr, weight_decay=wd, partition=PART)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), w0)
    state = tx.init(p)
    ref = {k: v.copy() for k, v in w0.items()}
    mom = {k: np.zeros_like(v) for k, v in w0.items()}
    vel = {k: np.zeros_like(v) for k, v in w0.items()}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for t in range(1, 5):
        grads = {k: rng.normal(size=v.shape) for k, v in w0.items()}
        u, state = step(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state, p)
        p = optax.apply_updates(p, u)
        for k in w0:
            if k in ("emb", "b"):
                ref[k], mom[k], vel[k] = _adamw_np_step(ref[k], mom[k], vel[k], grads[k], t, lr, wd)
            else:
                ref[k], mom[k] = _muon_np_step(ref[k], mom[k], grads[k], lr, wd, views=_views(k))
    for k in w0:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_expert_stack_is_orthogonalised_per_expert():
    """[E, in, out] is E matrices (MaxText issue #4798 orthogonalised them as one)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 16, 8)) * np.array([1, 10, 0.1, 3])[:, None, None],
                    jnp.float32)
    dims = MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))
    got = optim.orthogonalize(x, dims, rms_scale=None)
    want = jnp.stack([optim.newton_schulz(x[e]) for e in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    as_one = optim.newton_schulz(x.reshape(64, 8)).reshape(4, 16, 8)
    assert not np.allclose(got, as_one, atol=1e-2)
    for e in range(4):  # each expert's update is itself near-orthogonal, whatever its scale
        s = np.linalg.svd(np.asarray(got[e]), compute_uv=False)
        assert 0.67 < s.min() and s.max() < 1.21


def test_update_rms_matches_moonlight_scaling():
    """0.2·√max(A, B) scaling gives an update RMS near 0.2 for any shape (Moonlight §2.2)."""
    rng = np.random.default_rng(2)
    for shape in [(64, 256), (256, 64), (128, 128)]:
        o = optim.orthogonalize(jnp.asarray(rng.normal(size=shape), jnp.float32), MatrixDims())
        assert 0.15 < float(jnp.sqrt(jnp.mean(o ** 2))) < 0.25


def _expected_kind(path: str, shape) -> str:
    """What the docs promise, written independently of the partition's regexes."""
    name = path.split(".")[-1]
    parent = path.split(".")[-2] if "." in path else ""
    if path in ("embed", "lm_head") or name == "router" or name == "scale":
        return "adamw"
    if parent == "moe" and name in ("w_gate", "w_up", "w_down"):
        return f"muon-experts-{shape[0]}"
    return "muon"


@pytest.mark.parametrize("preset", ["kimi-k2", "tiny"])
def test_partition_over_the_full_tree(preset):
    cfg = config.preset(preset)
    state = nnx.state(params.abstract_model(cfg), nnx.Param)
    part = params.partition(cfg)
    n = {"adamw": 0, "muon": 0}
    for path, leaf in optim.partition.leaves_with_paths(state):
        got = part.assign(path, leaf.shape)
        want = _expected_kind(path, leaf.shape)
        if want == "adamw":
            assert got == ADAMW, path
        else:
            assert isinstance(got, MatrixDims), path
            b, fi, fo = got.matrix_shape(leaf.shape)
            assert b == (cfg.n_routed_experts if want.startswith("muon-experts") else 1), path
            assert fi * fo * b == np.prod(leaf.shape)
        n["adamw" if got == ADAMW else "muon"] += 1
    layers = cfg.num_hidden_layers
    assert n["muon"] == 5 * layers + 3 * layers + 3 * cfg.num_moe_layers  # attn, ffn, experts
    text = part.describe(state)
    assert re.search(r"layers\.1\.moe\.w_up\s+\(\d+, \d+, \d+\)\s+muon\s+\d+ x \[", text)
    assert "router" in str(part) or "moe" in str(part)


def test_partition_rejects_unknown_and_nd_leaves():
    with pytest.raises(ValueError, match="no partition rule"):
        Partition(rules=((r"a", ADAMW),)).assign("b", (2, 2))
    with pytest.raises(ValueError, match="add a MatrixDims rule"):
        optim.DEFAULT.assign("layers.0.experts", (4, 8, 8))
    with pytest.raises(ValueError, match="does not cover"):
        Partition(rules=((r"a", MatrixDims(fan_in=(0,), fan_out=(1,))),)).assign("a", (2, 3, 4))


def test_adamw_is_optax_adamw():
    rng = np.random.default_rng(3)
    p = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
    g = {"a": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)}
    ours, ref = optim.adamw(1e-2, weight_decay=0.1), optax.adamw(1e-2, 0.9, 0.95, 1e-8,
                                                                 weight_decay=0.1)
    u1, _ = ours.update(g, ours.init(p), p)
    u2, _ = ref.update(g, ref.init(p), p)
    np.testing.assert_allclose(u1["a"], u2["a"], rtol=1e-6)


def test_schedules():
    s = optim.schedule(1.0, total_steps=100, warmup_steps=10, kind="wsd", final_ratio=0.1,
                       decay_fraction=0.2)
    assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
    assert float(s(50)) == 1.0 and float(s(80)) == 1.0
    assert float(s(90)) == pytest.approx(0.55) and float(s(100)) == pytest.approx(0.1)
    c = optim.schedule(1.0, total_steps=110, warmup_steps=10, kind="cosine", final_ratio=0.0)
    assert float(c(60)) == pytest.approx(0.5) and float(c(110)) == pytest.approx(0.0, abs=1e-6)
    assert float(optim.schedule(2.0, total_steps=5, kind="constant")(3)) == 2.0
    with pytest.raises(ValueError, match="kind"):
        optim.schedule(1.0, total_steps=5, kind="linear")
    tx = optim.muon(optim.schedule(1e-2, total_steps=10, warmup_steps=5), partition=PART)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), _tree(np.random.default_rng(0)))
    tx.update(p, tx.init(p), p)
