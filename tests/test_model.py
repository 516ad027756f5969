import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from k2jax import presets, sharding
from k2jax.model import Transformer, cross_entropy, rope


def _np(v):
    return np.asarray(v[...], np.float64)


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x_TR, inv, scale=1.0):
    """Interleaved RoPE as complex rotation of pairs (independent of k2jax.model.rope)."""
    t = np.arange(x_TR.shape[0])
    z = (x_TR[:, 0::2] + 1j * x_TR[:, 1::2]) * np.exp(1j * t[:, None] * inv[None]) * scale
    return np.stack([z.real, z.imag], -1).reshape(x_TR.shape)


def _attend(q_TK, k_TK, v_TU, scale):
    """Per-head causal attention with explicit loops; returns (out, max logit over s <= t)."""
    t = q_TK.shape[0]
    out, best = np.zeros((t, v_TU.shape[1])), -np.inf
    for i in range(t):
        logits = np.array([q_TK[i] @ k_TK[j] * scale for j in range(i + 1)])
        best = max(best, logits.max())
        p = np.exp(logits - logits.max())
        out[i] = (p / p.sum()) @ v_TU[: i + 1]
    return out, best


def mla_reference(attn, cfg, x_BTD):
    """DeepSeek-V3 MLA written head by head in numpy (arXiv 2412.19437 eqs. 1-11)."""
    x_BTD = np.asarray(x_BTD, np.float64)
    nope, lora, h = cfg.qk_nope_head_dim, cfg.kv_lora_rank, cfg.num_attention_heads
    inv = rope.inv_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling)
    scale = rope.softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)
    cs = rope.cos_sin_scale(cfg.rope_scaling)
    latent_eps = 1e-6  # DeepSeek-V3 / transformers: the latent norms keep the default eps
    ys, maxes = [], np.full(h, -np.inf)
    for x in x_BTD:
        if cfg.q_lora_rank:
            cq = _rms(x @ _np(attn.q_a), _np(attn.q_a_norm.scale), latent_eps)
            q_all = np.einsum("tq,qhk->thk", cq, _np(attn.q_b))
        else:
            q_all = np.einsum("td,dhk->thk", x, _np(attn.q_proj))
        kv = x @ _np(attn.kv_a)
        ckv = _rms(kv[:, :lora], _np(attn.kv_a_norm.scale), latent_eps)
        kr = _rope(kv[:, lora:], inv, cs)
        y = np.zeros_like(x)
        for head in range(h):
            kvh = ckv @ _np(attn.kv_b)[:, head]
            q = np.concatenate([q_all[:, head, :nope], _rope(q_all[:, head, nope:], inv, cs)], -1)
            k = np.concatenate([kvh[:, :nope], kr], -1)
            out, best = _attend(q, k, kvh[:, nope:], scale)
            maxes[head] = max(maxes[head], best)
            y += out @ _np(attn.o)[head]
        ys.append(y)
    return np.stack(ys), maxes


def mha_reference(attn, cfg, x_BTD):
    x_BTD = np.asarray(x_BTD, np.float64)
    h, g = cfg.num_attention_heads, cfg.num_attention_heads // cfg.kv_heads
    inv = rope.inv_frequencies(cfg.mha_head_dim, cfg.rope_theta, cfg.rope_scaling)
    scale = rope.softmax_scale(cfg.qk_head_dim, cfg.rope_scaling)
    cs = rope.cos_sin_scale(cfg.rope_scaling)
    ys, maxes = [], np.full(h, -np.inf)
    for x in x_BTD:
        y = np.zeros_like(x)
        for head in range(h):
            q = _rope(x @ _np(attn.q_proj)[:, head], inv, cs)
            k = _rope(x @ _np(attn.k_proj)[:, head // g], inv, cs)
            out, best = _attend(q, k, x @ _np(attn.v_proj)[:, head // g], scale)
            maxes[head] = max(maxes[head], best)
            y += out @ _np(attn.o)[head]
        ys.append(y)
    return np.stack(ys), maxes


VARIANTS = {
    "mla": ("tiny",),
    "mla-no-q-lora": ("tiny", "q_lora_rank=None"),
    "mla-yarn": ("tiny", "rope_scaling.factor=8",
                 "rope_scaling.original_max_position_embeddings=4"),
    "mha": ("tiny", "attention=mha"),
    "gqa": ("tiny", "attention=mha", "num_key_value_heads=2"),
    "gqa-yarn": ("tiny", "attention=mha", "num_key_value_heads=2", "rope_scaling.factor=4",
                 "rope_scaling.original_max_position_embeddings=4"),
}


def _cfg(variant, *extra):
    name, *overrides = VARIANTS[variant]
    return presets.preset(name, *overrides, *extra)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_attention_and_max_logits_match_naive_reference(variant):
    """Every layer's attention output, and aux["attn_max_logits"], against the head-by-head
    numpy reference run on that layer's actual input."""
    cfg = _cfg(variant, "initializer_range=0.2")  # large weights: logits far from zero
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, cfg.vocab_size)
    _, aux = model(tokens)
    ref = mla_reference if cfg.attention == "mla" else mha_reference
    x = jnp.take(model.embed[...], tokens, axis=0)
    for layer in range(cfg.num_hidden_layers):
        block = model.layer(layer)
        h = block.attn_norm(x)
        y, max_logit = block.attn(h)
        y_ref, max_ref = ref(block.attn, cfg, h)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(max_logit, max_ref, rtol=1e-5)
        np.testing.assert_allclose(aux["attn_max_logits"][layer], max_ref, rtol=1e-5)
        x, _, _ = block(x)
    assert aux["attn_max_logits"].shape == (cfg.num_hidden_layers, cfg.num_attention_heads)
    assert aux["attn_max_logits"].dtype == jnp.float32
    assert float(aux["attn_max_logits"].max()) > 1.0


@pytest.mark.parametrize("variant", ["mla", "mha", "gqa"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_causality(variant, qk_norm):
    """Changing token t+1 leaves the logits at positions <= t unchanged."""
    cfg = _cfg(variant, f"qk_norm={qk_norm}")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    logits, _ = model(tokens)
    t = 5
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
    logits2, _ = model(changed)
    np.testing.assert_array_equal(logits[:, : t + 1], logits2[:, : t + 1])
    assert not np.allclose(logits[:, t + 1:], logits2[:, t + 1:])


def test_output_contract_and_dtypes():
    cfg = presets.preset("tiny", "dtype=bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(jnp.zeros((3, 5), jnp.int32))
    assert logits.shape == (3, 5, cfg.vocab_size) and logits.dtype == jnp.float32
    assert aux["expert_load"].shape == (cfg.num_moe_layers, cfg.n_routed_experts)
    np.testing.assert_array_equal(aux["expert_load"].sum(-1), 15 * cfg.num_experts_per_tok)
    assert model.embed.dtype == jnp.float32  # params stay float32 under bf16 compute


def test_tied_embeddings_share_the_matrix():
    cfg = presets.preset("tiny", "tie_word_embeddings=true")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert not hasattr(model, "lm_head")
    logits, _ = model(jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, cfg.vocab_size)


def test_every_param_has_logical_axes():
    for variant in VARIANTS:
        model = Transformer(_cfg(variant, "qk_norm=true"), rngs=nnx.Rngs(0))
        for path, var in nnx.to_flat_state(nnx.state(model)):
            axes = var.get_metadata().get("axes")
            assert axes is not None and len(axes) == var.ndim, (variant, path)
            for name in axes:
                assert name is None or name in sharding.RULES, (path, name)


def test_cross_entropy_and_z_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 11)) * 3
    targets = rng.integers(0, 11, size=(2, 3))
    lz = np.log(np.exp(logits).sum(-1))
    nll = lz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    loss, parts = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), z_loss=1e-2)
    assert float(parts["ce"]) == pytest.approx(nll.mean(), rel=1e-5)
    assert float(loss) == pytest.approx(nll.mean() + 1e-2 * (lz ** 2).mean(), rel=1e-5)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=2, expert=2, tensor=1),
                                        dict(data=1, fsdp=2, expert=2, tensor=2)])
@pytest.mark.parametrize("variant", ["mla", "gqa"])
def test_sharded_forward_equals_single_device(mesh_shape, variant):
    assert jax.device_count() == 8
    cfg = _cfg(variant)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (4, 16), 0, cfg.vocab_size)
    logits_ref, aux_ref = jax.jit(lambda t: model(t))(tokens)

    mesh = sharding.make_mesh(**mesh_shape)
    graphdef, state = nnx.split(model)
    shardings = sharding.variable_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    tokens_s = jax.device_put(tokens, sharding.batch_sharding(mesh, size=4))

    @jax.jit
    def fwd(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    logits, aux = fwd(state, tokens_s)
    sharded_leaves = [v for v in jax.tree.leaves(state) if len(v.sharding.device_set) == 8
                      and not v.sharding.is_fully_replicated]
    assert sharded_leaves, "nothing was actually sharded"
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5)
    for key in aux:
        np.testing.assert_allclose(aux[key], aux_ref[key], rtol=1e-5, atol=1e-5)


def _swiglu_np(x, gate, up, down):
    a = x @ gate
    return (a / (1 + np.exp(-a)) * (x @ up)) @ down


def moe_reference(moe, cfg, x_TD):
    """DeepSeek-V3 MoE (arXiv 2412.19437 eqs. 12-16) token by token in numpy."""
    scores = 1 / (1 + np.exp(-(x_TD @ _np(moe.router))))
    choice = scores + _np(moe.selection_bias)
    per = cfg.n_routed_experts // cfg.n_group
    out = np.zeros_like(x_TD)
    for t, x in enumerate(x_TD):
        groups = np.sort(choice[t].reshape(cfg.n_group, per), axis=1)[:, -2:].sum(1)
        allowed = np.argsort(-groups)[: cfg.topk_group]
        cand = np.concatenate([np.arange(g * per, (g + 1) * per) for g in allowed])
        top = cand[np.argsort(-choice[t, cand])[: cfg.num_experts_per_tok]]
        w = scores[t, top] / scores[t, top].sum() * cfg.routed_scaling_factor
        for e, we in zip(top, w):
            out[t] += we * _swiglu_np(x, _np(moe.w_gate)[e], _np(moe.w_up)[e], _np(moe.w_down)[e])
    if cfg.n_shared_experts:
        out += _swiglu_np(x_TD, _np(moe.shared.gate), _np(moe.shared.up), _np(moe.shared.down))
    return out


def transformer_reference(model, cfg, tokens):
    """The whole decoder in numpy: embedding, pre-norm residual blocks, final norm, head."""
    eps = cfg.rms_norm_eps
    x = _np(model.embed)[np.asarray(tokens)]
    for block in map(model.layer, range(cfg.num_hidden_layers)):
        x = x + mla_reference(block.attn, cfg, _rms(x, _np(block.attn_norm.scale), eps))[0]
        h = _rms(x, _np(block.ffn_norm.scale), eps)
        if hasattr(block, "mlp"):
            x = x + _swiglu_np(h, _np(block.mlp.gate), _np(block.mlp.up), _np(block.mlp.down))
        else:
            x = x + np.stack([moe_reference(block.moe, cfg, hb) for hb in h])
    return _rms(x, _np(model.norm.scale), eps) @ _np(model.lm_head)


@pytest.mark.parametrize("extra", [(), ("n_routed_experts=8", "n_group=4", "topk_group=2",
                                        "num_experts_per_tok=3", "num_hidden_layers=3")])
def test_transformer_matches_numpy_reference(extra):
    """Wiring: residuals, norms, dense and MoE layers, routing with a non-zero selection
    bias, shared expert, final norm and head, against a plain numpy forward."""
    cfg = presets.preset("tiny", "initializer_range=0.1", *extra)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    bias = model.moe_layers.moe.selection_bias
    bias[...] = jnp.asarray(rng.normal(size=bias.shape) * 0.05, jnp.float32)
    for stack in (model.dense_layers, model.moe_layers):
        for norm in (stack.attn_norm, stack.ffn_norm):
            norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.scale.shape), jnp.float32)
    tokens = jax.random.randint(jax.random.key(1), (2, 6), 0, cfg.vocab_size)
    logits, _ = model(tokens)
    np.testing.assert_allclose(logits, transformer_reference(model, cfg, tokens),
                               rtol=1e-4, atol=1e-4)


def test_masked_targets_never_nan():
    logits = jnp.zeros((1, 3, 5))
    targets = jnp.asarray([[1, -100, 7]])
    loss, parts = cross_entropy(logits, targets, z_loss=1e-4, mask_BT=targets >= 0)
    assert np.isfinite(float(loss)) and float(parts["ce"]) == pytest.approx(np.log(5))


def test_router_stays_float32():
    model = Transformer(presets.preset("tiny", "param_dtype=bfloat16"), rngs=nnx.Rngs(0))
    assert model.moe_layers.moe.router.dtype == jnp.float32
    assert model.moe_layers.moe.w_up.dtype == jnp.bfloat16
