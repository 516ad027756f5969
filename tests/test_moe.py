import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import overrides, presets
from k2jax.model import moe


def _weights(e=8, d=16, f=12, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (e, d, f)) / 4, jax.random.normal(k[1], (e, d, f)) / 4,
            jax.random.normal(k[2], (e, f, d)) / 4)


def _skewed_routing(n=50, e=8, k=3, seed=1):
    """Routing where expert 0 takes most tokens: groups far above and below the block size."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, e))
    logits[:, 0] += 3.0
    idx = np.argsort(-logits, axis=1)[:, :k]
    w = rng.uniform(0.1, 1.0, size=(n, k))
    return jnp.asarray(idx, jnp.int32), jnp.asarray(w, jnp.float32)


@pytest.mark.parametrize("impl, block", [("blocked", 0), ("blocked", 4), ("blocked", 64),
                                         ("ragged", 0)])
def test_dropless_equals_dense_reference(impl, block):
    ws = _weights()
    idx, w = _skewed_routing()
    x = jax.random.normal(jax.random.key(2), (50, 16))

    def run(fn):
        return lambda x, w, ws: fn(x, idx, w, *ws)

    fn = (lambda x, i, w, *ws: moe.experts_blocked(x, i, w, *ws, block=block)) \
        if impl == "blocked" else moe.experts_ragged
    want = moe.experts_dense(x, idx, w, *ws)
    got = fn(x, idx, w, *ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # gradients w.r.t. tokens, routing weights and every expert agree too
    loss = lambda f: lambda x, w, ws: jnp.sum(jnp.sin(run(f)(x, w, ws)))  # noqa: E731
    g_want = jax.grad(loss(moe.experts_dense), argnums=(0, 1, 2))(x, w, ws)
    g_got = jax.grad(loss(fn), argnums=(0, 1, 2))(x, w, ws)
    for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_blocked_is_exact_when_every_token_picks_one_expert():
    """Worst case for a capacity-based MoE: all tokens on expert 3. Nothing is dropped."""
    ws = _weights()
    idx = jnp.full((40, 2), 3, jnp.int32).at[:, 1].set(5)
    w = jnp.ones((40, 2))
    x = jax.random.normal(jax.random.key(0), (40, 16))
    np.testing.assert_allclose(moe.experts_blocked(x, idx, w, *ws, block=8),
                               moe.experts_dense(x, idx, w, *ws), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["blocked", "ragged"])
def test_moe_module_matches_dense_impl(impl):
    cfg = presets.preset("tiny", "n_routed_experts=8", "num_experts_per_tok=3")
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
    ref = moe.MoE(overrides.apply(cfg, ["moe_impl=dense"]), rngs=nnx.Rngs(0))
    got = moe.MoE(overrides.apply(cfg, [f"moe_impl={impl}"]), rngs=nnx.Rngs(0))
    (y0, s0), (y1, s1) = ref(x), got(x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s1["load"], s0["load"])
    assert float(s1["load"].sum()) == 2 * 9 * 3


def test_routing_weights_follow_deepseek_v3():
    cfg = presets.preset("tiny", "n_routed_experts=8", "num_experts_per_tok=2",
                        "routed_scaling_factor=2.5")
    logits = jnp.asarray([[0.0, 1.0, -1.0, 2.0, 0.5, -2.0, 0.0, 0.1]])
    bias = jnp.zeros(8).at[2].set(10.0)  # bias picks expert 2 but does not weight it
    idx, w, scores = moe.route(logits, bias, cfg)
    assert set(np.asarray(idx[0]).tolist()) == {2, 3}
    s = jax.nn.sigmoid(logits[0])
    want = {2: s[2] / (s[2] + s[3]) * 2.5, 3: s[3] / (s[2] + s[3]) * 2.5}
    for i, wi in zip(np.asarray(idx[0]), np.asarray(w[0])):
        assert wi == pytest.approx(float(want[int(i)]), rel=1e-6)


def test_group_limited_routing_only_picks_allowed_groups():
    """n_group=4, topk_group=2: experts come only from the two groups with the best
    top-2 sums, even when a lone high-scoring expert sits in another group."""
    cfg = presets.preset("tiny", "n_routed_experts=16", "num_experts_per_tok=4", "n_group=4",
                        "topk_group=2")
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 16))
    logits[:, 0] = 6.0  # group 0 has one star expert but a weak partner
    logits[:, 1] = -6.0
    idx, _, _ = moe.route(jnp.asarray(logits), jnp.zeros(16), cfg)
    s = 1 / (1 + np.exp(-logits))
    top2 = np.sort(s.reshape(200, 4, 4), axis=-1)[..., -2:].sum(-1)
    allowed = np.argsort(-top2, axis=1)[:, :2]
    groups = np.asarray(idx) // 4
    assert all(set(g) <= set(a) for g, a in zip(groups, allowed))
    # and within the allowed groups it takes the best experts
    for n in range(200):
        cand = np.concatenate([np.arange(4 * g, 4 * g + 4) for g in allowed[n]])
        best = cand[np.argsort(-s[n, cand])[:4]]
        assert set(np.asarray(idx[n])) == set(best)
    assert (groups == 0).sum() < (groups == 0).size  # the star expert is not always taken


def test_selection_bias_moves_toward_balance():
    load = jnp.asarray([8.0, 2.0, 5.0, 5.0])
    b = moe.update_selection_bias(jnp.zeros(4), load, 0.01)
    np.testing.assert_allclose(b, [-0.01, 0.01, 0.0, 0.0])


def test_balance_loss_is_one_when_uniform():
    """Σ f_i P_i = 1 for perfectly uniform routing and scores (DeepSeek-V3 eq. 17-19)."""
    e, t = 4, 8
    idx = jnp.asarray([[[i % e, (i + 1) % e] for i in range(t)]])
    scores = jnp.full((1, t, e), 0.5)
    assert float(moe.balance_loss(scores, idx, e)) == pytest.approx(1.0)
    skewed = jnp.asarray([[[0, 1]] * t])
    scores = jnp.zeros((1, t, e)).at[..., :2].set(1.0)
    assert float(moe.balance_loss(scores, skewed, e)) == pytest.approx(2.0)


def test_block_size_auto():
    assert moe.auto_block_size(8192, 64) == 64
    assert moe.auto_block_size(10, 8) == 8
    assert moe.auto_block_size(10**7, 8) == 256


@pytest.mark.parametrize("impl", ["blocked", "ragged", "dense"])
def test_padding_rows_contribute_nothing(impl):
    """Expert id E marks a padding row (expert parallelism's receive buffer): its output
    and every gradient through it are zero, and the other rows are as without it."""
    ws = _weights()
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 8, size=(24, 1))
    pad = np.zeros(24, bool)
    pad[[0, 5, 6, 23]] = True
    idx[pad] = 8
    x = jax.random.normal(jax.random.key(4), (24, 16))
    fn = {"blocked": lambda *a: moe.experts_blocked(*a, block=4),
          "ragged": moe.experts_ragged, "dense": moe.experts_dense}[impl]
    ones = jnp.ones((24, 1))

    def loss(x, ws, keep):
        return jnp.sum(jnp.sin(fn(x, jnp.asarray(idx[keep]), ones[keep], *ws)))

    y = fn(x, jnp.asarray(idx), ones, *ws)
    assert not np.any(np.asarray(y)[pad])
    np.testing.assert_allclose(np.asarray(y)[~pad],
                               moe.experts_dense(x[~pad], jnp.asarray(idx[~pad]), ones[~pad],
                                                 *ws), rtol=1e-5, atol=1e-5)
    gx, gw = jax.grad(lambda x, ws: loss(x, ws, slice(None)), argnums=(0, 1))(x, ws)
    assert not np.any(np.asarray(gx)[pad])
    want = jax.grad(lambda ws: loss(x[~pad], ws, ~pad))(ws)
    for a, b in zip(gw, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
