import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optim
from k2jax import optimizer, overrides, presets, sharding
from k2jax.model import Transformer
from k2jax.optimizer import qk_layout
from optim.qk_clip import find_state, stats

VARIANTS = {
    "mla": ("tiny",),
    "mla-no-q-lora": ("tiny", "q_lora_rank=None"),
    "mha": ("tiny", "attention=mha"),
    "gqa": ("tiny", "attention=mha", "num_key_value_heads=2"),
}


def _setup(variant, seed=0):
    cfg = presets.preset(*VARIANTS[variant], "initializer_range=0.15")
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(seed), (2, 16), 0, cfg.vocab_size)

    def max_logits(p, inputs_from=None):
        """Per-layer max logits of ``p``'s attention; with ``inputs_from``, each layer is fed
        the input it had under those params (a clip of layer 0 changes layer 1's input, so
        "the same batch" means the same per-layer inputs)."""
        if inputs_from is None:
            return nnx.merge(graphdef, p, rest)(tokens)[1]["attn_max_logits"]
        old, new = nnx.merge(graphdef, inputs_from, rest), nnx.merge(graphdef, p, rest)
        x = jnp.take(old.embed[...], tokens, axis=0)
        out = []
        for old_block, new_block in (
                (old.layer(i), new.layer(i)) for i in range(cfg.num_hidden_layers)):
            out.append(new_block.attn(old_block.attn_norm(x))[1])
            x = old_block(x)[0]
        return jnp.stack(out)

    return cfg, p, max_logits


def _layer_attn(p, cfg, layer: int) -> dict:
    """Layer ``layer``'s attention weights {name: array} from the stacked parameters."""
    k = cfg.first_k_dense_replace
    stack, row = ("dense_layers", layer) if layer < k else ("moe_layers", layer - k)
    return {n: v[...][row] for n, v in p[stack]["attn"].items() if isinstance(v, nnx.Variable)}


def _zero_step(tx, p, s):
    zeros = jax.tree.map(jnp.zeros_like, p)
    u, state = tx.update(zeros, tx.init(p), p, attn_max_logits=s)
    return optax.apply_updates(p, u), state


@pytest.mark.parametrize("kind", ["muon", "adamw"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_clip_caps_max_logits_at_tau_and_leaves_other_heads(variant, kind):
    """Zero gradients and weight decay: the update is the clip alone. On the same batch
    every head's max logit becomes min(S_h, τ), and heads at or below τ keep every bit."""
    cfg, p, max_logits = _setup(variant)
    s = max_logits(p)
    tau = float(jnp.median(s))
    assert bool((s > tau).any()) and bool((s <= tau).any())
    layout = qk_layout(cfg)
    tx = optim.build(kind, 1e-2, weight_decay=0.0, partition=optimizer.partition(),
                     qk_layout=layout, tau=tau)
    new_p, state = _zero_step(tx, p, s)
    np.testing.assert_allclose(max_logits(new_p, inputs_from=p), jnp.minimum(s, tau), rtol=2e-5)

    clipped = np.asarray(s > tau)
    targets = layout.by_path()
    for path, old in optim.paths.flatten(p).items():
        new = dict(optim.paths.flatten(new_p).items())[path]
        t = targets.get(path)
        if t is None:
            np.testing.assert_array_equal(new, old, err_msg=path)
            continue
        assert new.shape[t.head_axis] == cfg.num_attention_heads
        for h in range(cfg.num_attention_heads):
            same = np.array_equal(np.take(np.asarray(new), h, t.head_axis),
                                  np.take(np.asarray(old), h, t.head_axis))
            assert same == (not clipped[t.layer, h]), (path, h)
    clip_state = find_state(state)
    np.testing.assert_array_equal(clip_state.clipped, clipped)
    st = stats(clip_state)
    np.testing.assert_array_equal(st["qk_clip/heads_clipped_per_layer"], clipped.sum(-1))
    assert float(st["qk_clip/min_gamma"]) == pytest.approx(tau / float(s.max()), rel=1e-6)


def test_mla_rope_key_untouched_and_value_slices_untouched():
    cfg, p, max_logits = _setup("mla")
    s = max_logits(p)
    tau = float(s.min()) / 2  # every head clipped
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(cfg), tau=tau, weight_decay=0.0,
                        partition=optimizer.partition())
    new_p, _ = _zero_step(tx, p, s)
    nope = cfg.qk_nope_head_dim
    for layer in range(cfg.num_hidden_layers):
        old, new = _layer_attn(p, cfg, layer), _layer_attn(new_p, cfg, layer)
        np.testing.assert_array_equal(new["kv_a"][...], old["kv_a"][...])  # shared RoPE key
        np.testing.assert_array_equal(new["kv_b"][...][..., nope:], old["kv_b"][...][..., nope:])
        g = np.asarray(tau / s[layer])
        np.testing.assert_allclose(new["q_b"][...][..., nope:], old["q_b"][...][..., nope:]
                                   * g[None, :, None], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(new["q_b"][...][..., :nope], old["q_b"][...][..., :nope]
                                   * np.sqrt(g)[None, :, None], rtol=1e-5, atol=1e-8)


def test_monitor_only_changes_nothing_but_records():
    cfg, p, max_logits = _setup("mla")
    s = max_logits(p)
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(cfg), tau=float(jnp.median(s)),
                        weight_decay=0.0, partition=optimizer.partition(), monitor_only=True)
    new_p, state = _zero_step(tx, p, s)
    for a, b in zip(jax.tree.leaves(new_p), jax.tree.leaves(p)):
        np.testing.assert_array_equal(a, b)
    assert int(find_state(state).clipped.sum()) > 0


def test_monitor_only_equals_plain_muon_with_gradients():
    cfg, p, max_logits = _setup("mla")
    s = max_logits(p)
    grads = jax.tree.map(lambda x: jnp.cos(x * 7.0), p)
    kw = dict(weight_decay=0.1, partition=optimizer.partition())
    u1, _ = (tx := optim.muon(1e-2, **kw)).update(grads, tx.init(p), p)
    tx2 = optim.muonclip(1e-2, qk_layout=qk_layout(cfg), tau=1.0, monitor_only=True, **kw)
    u2, _ = tx2.update(grads, tx2.init(p), p, attn_max_logits=s)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_and_non_positive_logits_never_nan():
    cfg, p, max_logits = _setup("mla")
    s = max_logits(p)
    bad = s.at[0, 0].set(jnp.nan).at[0, 1].set(jnp.inf).at[1, 0].set(-5.0).at[1, 1].set(0.0)
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(cfg), tau=0.5, weight_decay=0.0,
                        partition=optimizer.partition())
    new_p, state = _zero_step(tx, p, bad)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new_p))
    clipped = np.asarray(find_state(state).clipped)
    assert not clipped[0, 0] and not clipped[0, 1] and not clipped[1, 0] and not clipped[1, 1]
    q_old, q_new = _layer_attn(p, cfg, 0)["q_b"][...], _layer_attn(new_p, cfg, 0)["q_b"][...]
    np.testing.assert_array_equal(q_new[:, :2], q_old[:, :2])


def test_layout_errors():
    cfg = presets.preset("tiny")
    with pytest.raises(ValueError, match="qk_norm"):
        qk_layout(overrides.apply(cfg, ["qk_norm=true"]))
    other = presets.preset("tiny", "num_hidden_layers=3")
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(other), partition=optimizer.partition())
    p = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"hold layers \[0, 1\], its max logits have 3"):
        tx.init(p)  # same paths, but the stacks are one layer short
    no_q = qk_layout(presets.preset("tiny", "q_lora_rank=None"))
    tx = optim.muonclip(1e-2, qk_layout=no_q, partition=optimizer.partition())
    with pytest.raises(ValueError, match="layout paths not in the parameter tree"):
        tx.init(p)
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(cfg), partition=optimizer.partition())
    with pytest.raises(ValueError, match="attn_max_logits"):
        tx.update(p, tx.init(p), p)


def test_sharded_update_equals_unsharded():
    """Two MuonClip steps with real gradients, params and optimizer state sharded over
    (data 2, fsdp 2, expert 2), equal the single-device steps."""
    cfg = presets.preset("tiny", "initializer_range=0.15")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, cfg.vocab_size)
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(cfg), tau=2.0,
                        partition=optimizer.partition())

    def step(p, opt_state, tokens):
        def loss(p):
            logits, aux = nnx.merge(graphdef, p, rest)(tokens)
            return optax.softmax_cross_entropy_with_integer_labels(
                logits[:, :-1], tokens[:, 1:]).mean(), aux
        (_, aux), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, opt_state = tx.update(g, opt_state, p, attn_max_logits=aux["attn_max_logits"])
        return optax.apply_updates(p, u), opt_state

    def run(p, tokens, jitted):
        s = tx.init(p)
        for _ in range(2):
            p, s = jitted(p, s, tokens)
        return p, s

    p_ref, s_ref = run(p, tokens, jax.jit(step))
    assert int(find_state(s_ref).times_clipped.sum()) > 0

    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
    p_shard = sharding.variable_shardings(p, mesh)
    p_s = jax.device_put(p, p_shard)
    t_s = jax.device_put(tokens, sharding.batch_sharding(mesh, size=4))
    p_out, s_out = run(p_s, t_s, jax.jit(step))
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(p_out))
    # Newton-Schulz amplifies float32 reduction-order differences along small singular
    # directions, so the tolerance is set against the update size (lr·0.2·2 steps = 4e-3).
    for a, b in zip(jax.tree.leaves(p_out), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=4e-5)
    np.testing.assert_array_equal(find_state(s_out).times_clipped,
                                  find_state(s_ref).times_clipped)


def test_clip_on_sharded_weights_gathers_nothing():
    """The clip is a per-head elementwise scale: compiled on parameters sharded over heads
    (tensor) and rows (fsdp), it has no all-gather and keeps every sharding."""
    cfg = presets.preset("tiny")
    p = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    shardings = sharding.variable_shardings(p, mesh)
    p = jax.device_put(p, shardings)
    s = jnp.full((cfg.num_hidden_layers, cfg.num_attention_heads), 3.0).at[0, 1].set(50.0)
    clip = jax.jit(lambda p, s: optim.clip_params(p, s, qk_layout(cfg), tau=10.0))
    hlo = clip.lower(p, s).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    out = clip(p, s)
    q_b = out["dense_layers"]["attn"]["q_b"]
    assert q_b.sharding.is_equivalent_to(p["dense_layers"]["attn"]["q_b"].sharding, q_b.ndim)
    assert not q_b.sharding.is_fully_replicated


@pytest.mark.parametrize("alpha", [0.5, 0.25])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_layer_forward_max_logits_become_min_s_tau(variant, alpha):
    """The literal claim on a one-layer model, where nothing downstream of the clipped
    attention feeds back: the plain forward's aux["attn_max_logits"] is min(S, τ), for
    any split α of γ between query and key."""
    cfg = presets.preset(*VARIANTS[variant], "initializer_range=0.15", "num_hidden_layers=1")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, p, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.vocab_size)
    fwd = lambda p: nnx.merge(graphdef, p, rest)(tokens)[1]["attn_max_logits"]  # noqa: E731
    s = fwd(p)
    tau = float(jnp.median(s))
    tx = optim.muonclip(1e-2, qk_layout=qk_layout(cfg, alpha), tau=tau, weight_decay=0.0,
                        partition=optimizer.partition())
    new_p, _ = _zero_step(tx, p, s)
    np.testing.assert_allclose(fwd(new_p), jnp.minimum(s, tau), rtol=2e-5)


def _head_logits(w, cfg, inputs):
    """[H, N, N] logits q_h·k_h written out in numpy from the weights w (flat paths) of
    layer 0, on fixed random inputs to the projections (the query and key latents, and
    the shared RoPE key). RoPE rotates q and k by the same orthogonal map, so it is left
    out: it changes no scale."""
    a = {k.removeprefix("dense_layers.attn."): np.asarray(v[0], np.float64)
         for k, v in w.items()}
    if cfg.attention == "mha":
        q, k = (np.einsum("nd,dhk->hnk", inputs["x"], a[n]) for n in ("q_proj", "k_proj"))
        return q @ k.transpose(0, 2, 1)
    nope = cfg.qk_nope_head_dim
    q = np.einsum("nq,qhk->hnk", inputs["c_q"], a["q_b"])
    k_nope = np.einsum("nc,chk->hnk", inputs["c_kv"], a["kv_b"][..., :nope])
    return (q[..., :nope] @ k_nope.transpose(0, 2, 1)
            + q[..., nope:] @ inputs["k_rope"].T[None])


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("variant", ["mla", "mha"])
def test_alpha_splits_gamma_and_the_logit_scales_by_gamma(variant, alpha):
    """Every head of layer 0 clipped: its query slice scales by γ^α and its key slice by
    γ^(1−α), and its logits q·k (a numpy longhand) by exactly γ."""
    cfg, p, max_logits = _setup(variant)
    s = max_logits(p)
    tau = float(s.min()) / 2
    gamma = np.asarray(tau / s[0], np.float64)
    new_p = optim.clip_params(p, s, qk_layout(cfg, alpha), tau)
    old, new = (optim.paths.flatten(t) for t in (p, new_p))
    q_name, k_name = ("q_proj", "k_proj") if variant == "mha" else ("q_b", "kv_b")
    dq = cfg.mha_head_dim if variant == "mha" else cfg.qk_nope_head_dim
    for name, power in ((q_name, alpha), (k_name, 1 - alpha)):
        key = f"dense_layers.attn.{name}"  # layer 0: row 0 of the dense stack
        np.testing.assert_allclose(new[key][0, ..., :dq], old[key][0, ..., :dq]
                                   * (gamma ** power)[None, :, None], rtol=1e-5, atol=1e-8)
    rng = np.random.default_rng(0)
    inputs = {"x": rng.normal(size=(6, cfg.hidden_size)),
              "c_q": rng.normal(size=(6, cfg.q_lora_rank)),
              "c_kv": rng.normal(size=(6, cfg.kv_lora_rank)),
              "k_rope": rng.normal(size=(6, cfg.qk_rope_head_dim))}
    layer0 = lambda flat: {k: v for k, v in flat.items()  # noqa: E731
                           if k.startswith("dense_layers.attn.")}
    before, after = _head_logits(layer0(old), cfg, inputs), _head_logits(layer0(new), cfg, inputs)
    np.testing.assert_allclose(after, before * gamma[:, None, None], rtol=1e-5, atol=1e-9)
