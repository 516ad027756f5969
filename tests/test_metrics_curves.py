"""metrics.curves: spikes, divergence and plateau found exactly on synthetic curves."""

import numpy as np

from k2jax import metrics


def _clean_curve(n=600, seed=0):
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return 2.0 + 3.0 * np.exp(-t / 100) + 0.02 * rng.standard_normal(n)


def test_spikes_clean_curve_has_none():
    assert metrics.detect_spikes(_clean_curve()).size == 0


def test_spikes_found_exactly():
    x = _clean_curve()
    where = [120, 121, 300, 555]
    x[where] *= 2.0
    assert metrics.detect_spikes(x).tolist() == where
    assert metrics.detect_spikes(x, warmup=200).tolist() == [300, 555]
    assert metrics.detect_spikes(x, ratio=3.0).size == 0


def test_nan_is_divergence_not_spike():
    x = _clean_curve()
    x[200] = np.nan
    x[400] = np.inf
    assert metrics.detect_spikes(x).size == 0
    assert metrics.detect_divergence(x) == 200
    assert metrics.detect_divergence([np.nan, 1.0]) == 0  # no grace for non-finite


def test_divergence_above_initial():
    x = _clean_curve()
    assert metrics.detect_divergence(x) is None
    x[3] = 10.0  # inside the grace period: noise, not divergence
    assert metrics.detect_divergence(x) is None
    assert metrics.detect_divergence(x, grace=0) == 3
    x[450:] = np.linspace(2.0, 8.0, 150)  # blows up past the start (~5.0)
    first = int(np.flatnonzero(x[450:] > x[0])[0]) + 450
    assert metrics.detect_divergence(x) == first
    assert metrics.detect_divergence(x, initial_loss=100.0) is None


def test_plateau():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(5.0, 3.0, 200), 3.0 + 0.01 * rng.random(300)])
    start = metrics.detect_plateau(x, window=100, min_improvement=0.01)
    assert 190 <= start <= 200
    assert metrics.detect_plateau(np.linspace(5.0, 1.0, 500), window=100) is None
    assert metrics.detect_plateau(np.full(300, 2.0), window=100) == 0
    assert metrics.detect_plateau(np.full(50, 2.0), window=100) is None
    # a flat stretch followed by progress is not a plateau
    y = np.concatenate([np.full(200, 5.0), np.linspace(5.0, 2.0, 300)])
    assert metrics.detect_plateau(y, window=100) is None
