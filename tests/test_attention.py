"""Chunked (flash-style) attention against the reference path: outputs, per-head max
logits and gradients, padding and masking, and the compiler's memory figure."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import VARIANTS as MODEL_VARIANTS

from k2jax import presets
from k2jax.model import Transformer, cross_entropy, flash
from k2jax.model.attention import causal_attention, make_attention

VARIANTS = {  # test_model's, plus the cases only the attention paths need
    **MODEL_VARIANTS,
    "mla-qk-norm": ("tiny", "qk_norm=true"),
    "mla-yarn-mscale": ("tiny", "rope_scaling.factor=32", "rope_scaling.mscale=1",
                        "rope_scaling.mscale_all_dim=1",
                        "rope_scaling.original_max_position_embeddings=4"),
}


def _cfg(variant, *extra):
    name, *overrides = VARIANTS[variant]
    return presets.preset(name, *overrides, "initializer_range=0.2", *extra)


def _assert_close(actual, expected, tol=1e-5, what=""):
    """max |actual - expected| <= tol · max |expected|: float32 error is relative to scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    err, scale = np.abs(actual - expected).max(), max(np.abs(expected).max(), 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs magnitude {scale:.3g}"


def _module_loss(graphdef, state, x_BTD, w_BTD):
    y_BTD, max_logit_H = nnx.merge(graphdef, state)(x_BTD)
    return jnp.sum(y_BTD * w_BTD), (y_BTD, max_logit_H)


def _run_module(cfg, x_BTD, w_BTD):
    """(loss, y, max_logit, grads w.r.t. params, grad w.r.t. x) of one attention module."""
    graphdef, state = nnx.split(make_attention(cfg, rngs=nnx.Rngs(0)))
    grad_fn = jax.value_and_grad(_module_loss, argnums=(1, 2), has_aux=True)
    (loss, (y, max_logit)), (g_state, g_x) = jax.jit(grad_fn, static_argnums=0)(
        graphdef, state, x_BTD, w_BTD)
    return loss, y, max_logit, g_state, g_x


# Every variant with block_q > block_kv; MLA and GQA also with block_kv > T (it shrinks to
# T) and with equal blocks.
CASES = ([(v, (4, 3)) for v in sorted(VARIANTS)]
         + [(v, b) for v in ("mla", "gqa") for b in ((8, 16), (5, 5))])


@pytest.mark.parametrize(("variant", "blocks"), CASES,
                         ids=[f"{v}-q{b[0]}-kv{b[1]}" for v, b in CASES])
def test_chunked_module_matches_reference(variant, blocks):
    """Same parameters, both paths: output, max logits, gradients w.r.t. every parameter and
    the input. T = 13 divides by no block size, and block_q != block_kv."""
    block_q, block_kv = blocks
    ref_cfg = _cfg(variant, "attention_impl=reference")
    chunked_cfg = _cfg(variant, "attention_impl=chunked", f"attention_block_q={block_q}",
                       f"attention_block_kv={block_kv}")
    kx, kw = jax.random.split(jax.random.key(1))
    x_BTD = jax.random.normal(kx, (2, 13, ref_cfg.hidden_size))
    w_BTD = jax.random.normal(kw, x_BTD.shape)
    ref = _run_module(ref_cfg, x_BTD, w_BTD)
    got = _run_module(chunked_cfg, x_BTD, w_BTD)
    assert float(ref[2].max()) > 1.0  # peaked softmax: the online rescaling matters
    for name, a, b in zip(["loss", "output", "max logit"], got[:3], ref[:3]):
        _assert_close(a, b, what=name)
    flat_ref = dict(nnx.to_flat_state(ref[3]))
    for path, g in nnx.to_flat_state(got[3]):
        _assert_close(g[...], flat_ref[path][...], what=f"grad {path}")
    _assert_close(got[4], ref[4], what="grad x")


def test_chunked_transformer_matches_reference():
    """The whole model with attention_impl switched (same parameters): logits, aux max
    logits of every layer and the loss gradient."""
    cfg = presets.preset("tiny", "initializer_range=0.1", "attention_impl=reference")
    chunked = presets.preset("tiny", "initializer_range=0.1", "attention_impl=chunked",
                             "attention_block_q=8", "attention_block_kv=4")
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef_c, _ = nnx.split(Transformer(chunked, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(2), (2, 19), 0, cfg.vocab_size)

    def loss(gd, state):
        logits, aux = nnx.merge(gd, state)(tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])[0], (logits, aux["attn_max_logits"])

    run = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (l_ref, (lg_ref, m_ref)), g_ref = run(graphdef, state)
    (l_got, (lg_got, m_got)), g_got = run(graphdef_c, state)
    _assert_close(l_got, l_ref, what="loss")
    _assert_close(lg_got, lg_ref, what="logits")
    _assert_close(m_got, m_ref, what="max logits")
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_got), nnx.to_flat_state(g_ref)):
        _assert_close(a[...], b[...], what=f"grad {path}")


def _reference(q_BTHK, k_BSHK, v_BSHU, scale):
    logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                             preferred_element_type=jnp.float32)
    return causal_attention(logits_BHTS * scale, v_BSHU, q_BTHK.dtype)


def test_max_logit_ignores_future_and_padded_positions():
    """Every causal logit is negative, so a padded key or query (zeros: logit 0) would win
    the max, and so would the masked future pairs, which are large and positive."""
    b, t, h = 2, 11, 2
    rng = np.random.default_rng(0)
    a_BTH, c_BTH = rng.uniform(0.5, 2, (b, t, h)), rng.uniform(0.5, 2, (b, t, h))
    big, e1, e2 = 5, np.eye(3)[0], np.eye(3)[1]
    # q_t = a_t e1 ± e2, k_s = -c_s e1 except k_big = 100 e2: q_t · k_big > 0 only if t < big.
    sign_T = np.where(np.arange(t) < big, 1.0, -1.0)
    q_BTHK = a_BTH[..., None] * e1 + sign_T[None, :, None, None] * e2
    k_BSHK = -c_BTH[..., None] * e1
    k_BSHK[:, big] = 100 * e2
    logits_BHTS = np.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK)
    causal_TS = np.tril(np.ones((t, t), bool))
    expected_H = np.where(causal_TS, logits_BHTS, -np.inf).max(axis=(0, 2, 3))
    assert (expected_H < 0).all() and logits_BHTS.max() > 50
    v_BSHU = rng.normal(size=(b, t, h, 4))
    args = [jnp.asarray(x, jnp.float32) for x in (q_BTHK, k_BSHK, v_BSHU)]
    for block_q, block_kv in [(4, 3), (3, 8), (16, 16)]:
        out, max_H = flash.flash_attention(*args, scale=1.0, block_q=block_q, block_kv=block_kv)
        np.testing.assert_allclose(max_H, expected_H, rtol=1e-6)
        _assert_close(out, _reference(*args, 1.0)[0], what="output")
    np.testing.assert_allclose(_reference(*args, 1.0)[1], expected_H, rtol=1e-6)


def test_max_logit_has_no_gradient():
    q, k, v = (jax.random.normal(key, (1, 6, 2, 4)) for key in jax.random.split(
        jax.random.key(0), 3))
    g = jax.grad(lambda q: flash.flash_attention(q, k, v, scale=0.5, block_q=4,
                                                 block_kv=2)[1].sum())(q)
    np.testing.assert_array_equal(g, 0.0)


def test_bfloat16_close_to_reference():
    """bf16 compute: both paths round differently (per tile vs whole row), so loosely."""
    keys = jax.random.split(jax.random.key(3), 3)
    q, k, v = (jax.random.normal(key, (2, 37, 2, 16), jnp.bfloat16) for key in keys)
    out, max_H = flash.flash_attention(q, k, v, scale=0.25, block_q=16, block_kv=8)
    out_ref, max_ref = _reference(q, k, v, 0.25)
    assert out.dtype == jnp.bfloat16 and max_H.dtype == jnp.float32
    _assert_close(out, out_ref, tol=2e-2, what="bf16 output")
    _assert_close(max_H, max_ref, tol=1e-6, what="bf16 max logit")


def _temp_bytes(fn, t):
    """Compiler's temp buffer bytes of value_and_grad(sum of attention output)."""
    spec = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v)[0])  # noqa: E731
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(
        spec, spec, spec).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_at_8k():
    """Forward+backward at T = 8192 (B = 1, H = 2, K = 16): the reference holds [B, H, T, S]
    float32 logits and probabilities (~2 GiB); chunked must need <= 1/8 of that."""
    ref = _temp_bytes(lambda q, k, v: _reference(q, k, v, 0.25), 8192)
    chunked = _temp_bytes(lambda q, k, v: flash.flash_attention(q, k, v, scale=0.25), 8192)
    assert ref >= 2 * 8192 ** 2 * 4  # at least one [H, T, S] float32 buffer
    assert chunked * 8 <= ref, (chunked, ref)
