import jax.numpy as jnp
import numpy as np
import pytest

from optim.newton_schulz import JORDAN, POLAR_EXPRESS, coefficients, polar_factor

RNG = np.random.default_rng(0)
CASES = {
    "random": RNG.normal(size=(64, 96)),
    "tall": RNG.normal(size=(128, 32)),
    "wide": RNG.normal(size=(32, 128)),
    "tiny-scale": 1e-4 * RNG.normal(size=(48, 80)),
    "batched": RNG.normal(size=(4, 32, 48)),
}
# Jordan's quintic does not converge: it sends singular values into an oscillating
# band; p(1) = 0.701 and max p = 1.2 on it, so the band is ~[0.68, 1.2].
BANDS = {"jordan": (0.67, 1.21), "polar_express": (0.85, 1.15)}


def _svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


@pytest.mark.parametrize("coeffs", sorted(BANDS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_singular_values_in_band(case, coeffs):
    lo, hi = BANDS[coeffs]
    s = _svals(polar_factor(jnp.asarray(CASES[case], jnp.float32), coeffs=coeffs))
    assert lo <= s.min() and s.max() <= hi, (s.min(), s.max())


@pytest.mark.parametrize("coeffs", sorted(BANDS))
def test_rank_deficient_keeps_null_space(coeffs):
    x = RNG.normal(size=(64, 8)) @ RNG.normal(size=(8, 48))  # rank 8
    s = np.sort(_svals(polar_factor(jnp.asarray(x, jnp.float32), coeffs=coeffs)))[::-1]
    lo, hi = BANDS[coeffs]
    assert lo <= s[:8].min() and s[:8].max() <= hi
    assert s[8:].max() < 1e-3


def test_orthogonal_factor_direction():
    """The output approximates U Vᵀ: its singular vectors are the input's."""
    x = RNG.normal(size=(40, 24))
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    o = np.asarray(polar_factor(jnp.asarray(x, jnp.float32), coeffs="polar_express", steps=8))
    np.testing.assert_allclose(o, u @ vt, atol=0.02)


def _numpy_ns(x, table, safety):
    """The same iteration, written plainly in float64 numpy."""
    tall = x.shape[-2] > x.shape[-1]
    X = np.swapaxes(x, -1, -2) if tall else x
    X = X / (np.linalg.norm(X, axis=(-2, -1), keepdims=True) * safety + 1e-7)
    for a, b, c in table:
        A = X @ np.swapaxes(X, -1, -2)
        X = a * X + (b * A + c * A @ A) @ X
    return np.swapaxes(X, -1, -2) if tall else X


@pytest.mark.parametrize("coeffs, steps", [("jordan", 5), ("polar_express", 5),
                                           ("polar_express", 10), ("jordan", 3)])
@pytest.mark.parametrize("case", ["tall", "wide", "batched"])
def test_equals_numpy_iteration(case, coeffs, steps):
    x = CASES[case]
    table, safety = coefficients(coeffs, steps)
    want = _numpy_ns(x, table, safety)
    got = np.asarray(polar_factor(jnp.asarray(x, jnp.float32), steps=steps, coeffs=coeffs))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_presets_are_the_published_numbers():
    assert JORDAN == (3.4445, -4.7750, 2.0315)
    table, safety = coefficients("jordan", 5)
    assert table == (JORDAN,) * 5 and safety == 1.0
    assert POLAR_EXPRESS[0] == pytest.approx((8.28721201814563 / 1.01,
                                              -23.595886519098837 / 1.01**3,
                                              17.300387312530933 / 1.01**5))
    assert POLAR_EXPRESS[-1] == (1.875, -1.25, 0.375)
    assert coefficients("polar_express", 10)[0][-3:] == (POLAR_EXPRESS[-1],) * 3


def test_bfloat16_compute():
    x = jnp.asarray(CASES["tall"], jnp.float32)
    o = polar_factor(x, dtype=jnp.bfloat16)
    assert o.dtype == jnp.float32
    s = _svals(o)
    assert 0.6 <= s.min() and s.max() <= 1.25


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown coeffs"):
        polar_factor(jnp.ones((3, 3)), coeffs="nope")
    with pytest.raises(ValueError, match="need a matrix"):
        polar_factor(jnp.ones(3))
    with pytest.raises(ValueError, match="steps=0"):
        polar_factor(jnp.ones((3, 3)), steps=0)
