import math

import jax.numpy as jnp
import numpy as np
import pytest

from k2jax import config, presets
from k2jax.model import rope


def test_plain_rope_frequencies():
    np.testing.assert_allclose(rope.inv_frequencies(8, 10000.0),
                               [10000.0 ** (-i / 8) for i in (0, 2, 4, 6)])


@pytest.mark.parametrize("name", ["kimi-k2", "deepseek-v3"])
def test_yarn_matches_paper_outside_ramp(name):
    """YaRN (arXiv 2309.00071 eq. 16-18): with r = L / λ_i rotations over the original
    context L, frequencies with r > β_fast stay as they are, those with r < β_slow are
    divided by s, and the ramp between blends them monotonically."""
    cfg = presets.preset(name)
    y, dim, base = cfg.rope_scaling, cfg.qk_rope_head_dim, cfg.rope_theta
    theta = base ** (-np.arange(0, dim, 2) / dim)
    r = y.original_max_position_embeddings / (2 * math.pi / theta)
    got = rope.inv_frequencies(dim, base, y)
    fast, slow = r > max(y.beta_fast, y.beta_slow) * 2, r < min(y.beta_fast, y.beta_slow) / 2
    assert fast.any() and slow.any()
    np.testing.assert_allclose(got[fast], theta[fast], rtol=1e-12)
    np.testing.assert_allclose(got[slow], theta[slow] / y.factor, rtol=1e-12)
    ratio = got / theta
    assert np.all(np.diff(ratio) <= 1e-12)
    assert np.all((ratio >= 1 / y.factor - 1e-12) & (ratio <= 1 + 1e-12))


def test_yarn_matches_transformers_values():
    """Values printed by transformers 5.24 (_compute_yarn_parameters, yarn_apply_mscale)
    for the published configs: K2's first inv_freqs and last, and both softmax scales."""
    k2 = presets.preset("kimi-k2")
    inv = rope.inv_frequencies(k2.qk_rope_head_dim, k2.rope_theta, k2.rope_scaling)
    np.testing.assert_allclose(inv[:3], [1.0, 0.71311, 0.50853], rtol=1e-4)
    np.testing.assert_allclose(inv[-1], 8.764e-07, rtol=1e-3)
    assert rope.softmax_scale(k2.qk_head_dim, k2.rope_scaling) == pytest.approx(
        0.13086079996295005, rel=1e-12)
    ds = presets.preset("deepseek-v3")
    assert rope.softmax_scale(ds.qk_head_dim, ds.rope_scaling) == pytest.approx(
        0.1352337788608801, rel=1e-12)
    assert rope.cos_sin_scale(k2.rope_scaling) == 1.0


def test_mscale_formula():
    assert rope.yarn_mscale(1.0) == 1.0
    assert rope.yarn_mscale(40.0, 1.0) == pytest.approx(0.1 * math.log(40.0) + 1)
    assert rope.softmax_scale(64, None) == 64 ** -0.5


def test_apply_rope_is_complex_rotation():
    """Interleaved pairs (2i, 2i+1) are the complex number x_2i + i·x_2i+1 times e^{i·p·θ_i}."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.tile(np.arange(5), (2, 1)) * 7
    inv = rope.inv_frequencies(8, 500.0)
    got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv))
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * np.exp(1j * pos[..., None, None] * inv)
    want = np.stack([z.real, z.imag], -1).reshape(x.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_mscale_unset_follows_transformers():
    """Without mscale/mscale_all_dim (0 = not given) the softmax scale is plain and cos/sin
    carry the temperature 0.1·ln(s) + 1 (transformers' _compute_yarn_parameters)."""
    y = config.YarnConfig(factor=16.0)
    assert rope.softmax_scale(64, y) == 64 ** -0.5
    assert rope.cos_sin_scale(y) == pytest.approx(0.1 * math.log(16.0) + 1)
    both = config.YarnConfig(factor=16.0, mscale=1.0, mscale_all_dim=1.0)
    assert rope.cos_sin_scale(both) == 1.0
    assert rope.softmax_scale(64, both) == pytest.approx(64 ** -0.5 * rope.yarn_mscale(16.0) ** 2)
