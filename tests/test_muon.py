"""Muon against a plain numpy K2 Algorithm 1, per-expert orthogonalisation, the update RMS
of each update-scale rule, Nesterov against its formula, the Partition rules, our AdamW
against optax's, and the package's names."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
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


def _muon_np_step(w, m, g, lr, wd, stack, mu=0.95):
    """K2 Algorithm 1, Nesterov: M = μM + G; O = NS(μM + G)·0.2·√max(n, m); W -= η(O + λW).

    ``stack`` is the leaf's [batch, fan_in, fan_out] view, written out by hand from PART.
    """
    m = mu * m + g
    d = mu * m + g
    mats = d.reshape(stack)
    o = np.stack([_ns_np(x) * 0.2 * np.sqrt(max(x.shape)) for x in mats])
    return w - lr * (o.reshape(w.shape) + wd * w), m


# Each Muon leaf of _tree as the stack of matrices PART says it is. All three views are
# plain reshapes (no axis is moved): experts [3, 8, 12] are 3 separate 8x12 matrices, the
# per-head leaf [10, 2, 6] is one 10x12 matrix (heads and head_dim fan out), w one 16x24.
STACKS = {"experts": (3, 8, 12), "heads": (1, 10, 12), "w": (1, 16, 24)}


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
                ref[k], mom[k] = _muon_np_step(ref[k], mom[k], grads[k], lr, wd, STACKS[k])
    for k in w0:
        np.testing.assert_allclose(p[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_expert_stack_is_orthogonalised_per_expert():
    """[E, in, out] is E matrices (MaxText issue #4798 orthogonalised them as one)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(4, 16, 8)) * np.array([1, 10, 0.1, 3])[:, None, None],
                    jnp.float32)
    dims = MatrixDims(fan_in=(1,), fan_out=(2,), batch=(0,))
    got = optim.orthogonalize(x, dims, update_scale="jordan")
    want = jnp.stack([optim.polar_factor(x[e]) for e in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    as_one = optim.polar_factor(x.reshape(64, 8)).reshape(4, 16, 8)
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


# Update RMS of each rule for an exactly semi-orthogonal fan_in x fan_out direction, whose
# RMS is 1/sqrt(max(fan_in, fan_out)), written out per shape (not from optim.muon):
# k2: 0.2 everywhere; jordan: 1/sqrt(fan_in); spectral: 1/sqrt(fan_in) when wide,
# sqrt(fan_out)/fan_in when tall.
RULE_RMS = {
    ("k2", (96, 32)): 0.2, ("k2", (32, 96)): 0.2, ("k2", (64, 64)): 0.2,
    ("jordan", (96, 32)): 1 / np.sqrt(96), ("jordan", (32, 96)): 1 / np.sqrt(32),
    ("jordan", (64, 64)): 1 / 8,
    ("spectral", (96, 32)): np.sqrt(32) / 96, ("spectral", (32, 96)): 1 / np.sqrt(32),
    ("spectral", (64, 64)): 1 / 8,
}


@pytest.mark.parametrize("rule, shape", sorted(RULE_RMS))
def test_update_scale_rules_give_their_update_rms(rule, shape):
    """Polar Express with 10 steps is orthogonal to ~1e-7 on a Gaussian matrix, so the
    update's RMS is the rule's stated value for tall, wide and square matrices."""
    x = jnp.asarray(np.random.default_rng(4).normal(size=shape), jnp.float32)
    o = optim.orthogonalize(x, MatrixDims(), steps=10, coeffs="polar_express",
                            update_scale=rule)
    assert float(jnp.sqrt(jnp.mean(o ** 2))) == pytest.approx(RULE_RMS[rule, shape], rel=1e-4)
    with pytest.raises(ValueError, match="update_scale='moonlight'"):
        optim.scale_by_muon(PART.dims, update_scale="moonlight")


@pytest.mark.parametrize("nesterov", [True, False])
def test_nesterov_follows_its_formula(nesterov):
    """Two steps of scale_by_muon against the longhand: M1 = G1, M2 = mu*M1 + G2, then
    NS(mu*M2 + G2) with Nesterov (Moonlight's code) or NS(M2) without (K2 Algorithm 1),
    times 0.2*sqrt(max(fan_in, fan_out)); the two directions differ."""
    rng = np.random.default_rng(5)
    g1, g2 = (rng.normal(size=(16, 24)).astype(np.float32) for _ in range(2))
    mu = 0.9
    tx = optim.scale_by_muon(PART.dims, momentum=mu, nesterov=nesterov)
    p = {"w": jnp.zeros((16, 24), jnp.float32)}
    _, state = tx.update({"w": jnp.asarray(g1)}, tx.init(p))
    out, state = tx.update({"w": jnp.asarray(g2)}, state)
    m2 = mu * g1 + g2
    d = mu * m2 + g2 if nesterov else m2
    want = np.asarray(optim.polar_factor(jnp.asarray(d))) * 0.2 * np.sqrt(24)
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.momentum["w"], m2, rtol=1e-6)
    other = np.asarray(optim.polar_factor(jnp.asarray(m2 if nesterov else mu * m2 + g2)))
    assert not np.allclose(want, other * 0.2 * np.sqrt(24), atol=1e-3)


def test_submodules_and_renamed_functions_are_reachable():
    """No function exported by ``optim`` hides a submodule of the same name."""
    assert isinstance(optim.qk_clip, types.ModuleType)
    assert isinstance(optim.newton_schulz, types.ModuleType)
    assert callable(optim.qk_clip.find_state) and callable(optim.newton_schulz.coefficients)
    assert optim.clip_qk_logits is optim.qk_clip.clip_qk_logits
    assert optim.polar_factor is optim.newton_schulz.polar_factor
