"""Loss-curve labels: spikes, divergence, plateau.

The claim under test is MuonClip's pre-training "with zero loss spike" (Kimi K2,
arXiv 2507.20534, §2.1), so a spike needs one precise definition. Pure numpy: one
code labels live runs, committed results and synthetic test curves alike.
"""

from __future__ import annotations

import math
import warnings

import numpy as np


def detect_spikes(losses, *, ratio: float = 1.5, window: int = 50,
                  warmup: int = 50) -> np.ndarray:
    """Indices i >= warmup with a finite loss[i] > ratio x median(finite losses[i-window:i]).

    A median of the preceding window is robust to earlier spikes, so each spike is
    judged against the trend, not against its neighbours. Non-finite losses are
    never spikes (they are divergence, :func:`detect_divergence`) and are left out
    of the medians. Assumes positive losses (cross-entropy).
    """
    x = np.asarray(losses, dtype=np.float64).ravel()
    n = x.size
    f = np.where(np.isfinite(x), x, np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.full(window, np.nan), f]), window)[:n]  # row i: f[i-window:i]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN, never a spike
        med = np.nanmedian(windows, axis=1)
    spike = np.isfinite(x) & (np.arange(n) >= warmup) & (x > ratio * med)
    return np.flatnonzero(spike)


def detect_divergence(losses, initial_loss: float | None = None, *,
                      grace: int = 10) -> int | None:
    """First index whose loss is non-finite, or (from index ``grace`` on) above the initial loss.

    Initial = ``losses[0]`` unless given. The grace period skips the first noisy
    steps, where a loss may briefly exceed its starting value without anything
    being wrong; a non-finite loss diverges at any step.
    """
    x = np.asarray(losses, dtype=np.float64)
    init = float(x[0]) if initial_loss is None and x.size else initial_loss
    bad = ~np.isfinite(x)
    if init is not None and math.isfinite(init):
        bad |= (np.arange(x.size) >= grace) & (x > init)
    return int(np.argmax(bad)) if bad.any() else None


def detect_plateau(losses, *, window: int = 100, min_improvement: float = 0.01) -> int | None:
    """First step from which the curve has stopped improving, or None.

    With best[i] = min(finite losses[:i+1]) (the rolling minimum), window j is flat
    when best[j] - best[j+window] < min_improvement x |best[j]|: under that relative
    improvement in ``window`` steps. The plateau starts at the first j such that
    every window starting at j or later is flat; so a temporary flat stretch
    followed by progress is not a plateau. None if the last window is not flat or
    the curve is no longer than ``window``.
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.size <= window:
        return None
    best = np.minimum.accumulate(np.where(np.isfinite(x), x, np.inf))
    with np.errstate(invalid="ignore"):
        flat = (best[:-window] - best[window:]) < min_improvement * np.abs(best[:-window])
    if not flat[-1]:
        return None
    not_flat = np.flatnonzero(~flat)
    return int(not_flat[-1] + 1) if not_flat.size else 0
