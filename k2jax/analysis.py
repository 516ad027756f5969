"""Sweep analysis: seed statistics, best lr, LR sensitivity, loss-vs-compute fits.

One module so that the sweep notebook and every study's report (experiments/sweeps/)
compute each number the same way. Every result
aggregates over seeds (DESIGN.md, "Sweeps"): a point is a seed mean with its spread
(std, n, a t confidence interval), never one run, as modded-nanogpt judges records
over several seeds. Inputs are :func:`k2jax.sweeps.load` frames: one row per
member, swept keys as dotted columns (``optimizer.lr``), metrics as floats.

Grouping: ``by`` is extended by every other swept key that varies (see
:func:`group_keys`), so a mean never mixes two configurations; rows left in one
group must then differ in their seed, else ValueError. Plots of these numbers are
in :mod:`k2jax.plots`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import optimize, stats

STATS = ["mean", "std", "n", "n_failed", "ci_low", "ci_high"]
CLAMPED = "loss_clamped_to_init"
PURE, SATURATING = "A*C^-alpha", "E + A*C^-alpha"


def is_seed_key(column: str) -> bool:
    """``seed``, ``train.seed``, ``data.seed``: columns that name a replicate, not a config."""
    return column.split(".")[-1] == "seed"


def swept_keys(df: pd.DataFrame) -> list[str]:
    """Dotted (swept config) columns that take more than one value, seeds excluded."""
    return [c for c in df.columns if "." in c and not is_seed_key(c)
            and df[c].nunique(dropna=False) > 1]


def _determined(df: pd.DataFrame, column: str, by: list[str]) -> bool:
    """Whether ``column`` takes one value within every group of ``by``."""
    return bool(by) and bool((df.groupby(by, dropna=False)[column]
                              .nunique(dropna=False) <= 1).all())


def group_keys(df: pd.DataFrame, by, x: str | None = None, scale: bool = False) -> list[str]:
    """``by`` + the swept keys that still vary inside its groups (+ ``x`` last).

    A key fixed by ``by`` (``optimizer.name`` under ``optimizer``) adds nothing; nor
    does an alias of ``x`` (``optimizer.lr`` against ``lr``: each fixes the other).
    A key merely fixed by ``x`` still splits groups: a ladder whose sizes have
    disjoint lr grids would otherwise pool the sizes into one lr curve. With
    ``scale`` (x is a scale axis, e.g. model size), keys fixed by ``by`` and ``x``
    together move along the curve (each size's tuned lr, its ``model.*`` keys).
    """
    by = [by] if isinstance(by, str) else list(by)
    fixed = by + ([x] if x else [])

    def moves_with_x(k):
        if scale:
            return _determined(df, k, fixed)
        return _determined(df, k, [x]) and _determined(df, x, [k])

    extra = [k for k in swept_keys(df) if k not in fixed and not _determined(df, k, by)
             and not (x and moves_with_x(k))]
    return by + extra + ([x] if x else [])


def groups(df: pd.DataFrame, keys: list[str]):
    """(values tuple, rows) per group, NaN keys kept; one group when ``keys`` is empty."""
    return df.groupby(keys, dropna=False, sort=True) if keys else [((), df)]


def _check_replicates(df: pd.DataFrame, keys: list[str]) -> None:
    seeds = [c for c in df.columns if is_seed_key(c)]
    if seeds and df.duplicated(keys + seeds).any():
        raise ValueError(f"rows share a seed within groups of {keys}: group by the key "
                         "that tells them apart")


def summarize(values, confidence: float = 0.95) -> tuple:
    """(mean, std, n, n_failed, ci_low, ci_high) of the finite ``values``.

    The interval is mean ± t_{(1+c)/2, n−1}·std/√n (Student t, sample std with
    ddof=1): with 2–5 seeds a normal interval would be far too narrow. NaN spread
    when n < 2. Non-finite values are counted in ``n_failed`` and left out.
    """
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    n = int(finite.size)
    mean = float(finite.mean()) if n else np.nan
    std = float(finite.std(ddof=1)) if n > 1 else np.nan
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * std / np.sqrt(n)) if n > 1 else np.nan
    return mean, std, n, int(x.size - n), mean - half, mean + half


def stats_over(df: pd.DataFrame, keys: list[str], metric: str, confidence: float):
    _check_replicates(df, keys)
    rows = [(*vals, *summarize(g[metric], confidence)) for vals, g in groups(df, keys)]
    return pd.DataFrame(rows, columns=keys + STATS)


def seed_stats(df: pd.DataFrame, by, metric: str, confidence: float = 0.95) -> pd.DataFrame:
    """Per group of :func:`group_keys`\\ (by): ``metric``'s mean, std, n, n_failed, CI.

    A non-finite value (a diverged run's inf/NaN loss, or a metric the run never
    reached) is a failure: it is left out of mean/std/CI and counted in
    ``n_failed``, so a point is the mean of the seeds that finished, with the
    failures beside it. :func:`lr_sensitivity` instead charges a diverged run the
    initial loss, which is what an LR-sensitivity number needs.
    """
    return stats_over(df, group_keys(df, by), metric, confidence)


def best_lr(df: pd.DataFrame, metric: str = "final_eval_loss", by=("optimizer",),
            lr_key: str = "lr") -> pd.DataFrame:
    """Per group, the lr with the lowest seed-mean ``metric``, with its spread.

    An lr where any seed failed is not eligible (an lr that sometimes diverges is
    not the best one); a group without an eligible lr gets NaN. ``at_edge``: the
    best lr is the grid's smallest or largest, so the optimum may lie outside it.
    """
    keys = group_keys(df, by, x=lr_key)
    st = stats_over(df, keys, metric, 0.95)
    rows = []
    for vals, g in groups(st, keys[:-1]):
        ok = g[(g["n_failed"] == 0) & (g["n"] > 0)]
        if ok.empty:
            rows.append((*vals, np.nan, *[np.nan] * len(STATS), False))
            continue
        best = ok.loc[ok["mean"].idxmin()]
        edge = best[lr_key] in (g[lr_key].min(), g[lr_key].max())
        rows.append((*vals, best[lr_key], *best[STATS], bool(edge)))
    return pd.DataFrame(rows, columns=[*keys, *STATS, "at_edge"])


def at_best_lr(df: pd.DataFrame, metric: str = "final_eval_loss", by=("optimizer",),
               lr_key: str = "lr") -> pd.DataFrame:
    """The rows of ``df`` at their group's :func:`best_lr` (all seeds): the tuned runs a
    fair optimizer comparison uses (arXiv 2509.02046 tunes every optimizer)."""
    best = best_lr(df, metric, by, lr_key)
    keys = list(best.columns[: best.columns.get_loc(lr_key) + 1])
    return df.merge(best.loc[best[lr_key].notna(), keys], on=keys, how="inner")


def diverged(df: pd.DataFrame) -> pd.Series:
    """Per row, whether the run diverged (a missing value counts as no)."""
    if "diverged" not in df:
        return pd.Series(False, index=df.index)
    return df["diverged"].astype("boolean").fillna(False).astype(bool)


def clamp_to_init(df: pd.DataFrame, metric: str,
                  init_key: str = "initial_train_loss") -> pd.Series:
    """Per row min(L, L_init), and L_init for a diverged run (Wortsman et al. 2023, §3.1).

    L_init is the run's own first logged train loss (computed at the initial
    weights), or the frame's median one where that is missing. A diverged run
    (``diverged`` true, or an infinite metric) learnt nothing, so it scores L_init
    whatever its last loss; a NaN metric of a run that did not diverge stays NaN.
    """
    loss, init = df[metric].astype(float), df[init_key].astype(float)
    init = init.where(np.isfinite(init), np.nanmedian(init.where(np.isfinite(init))))
    out = np.minimum(loss, init)
    return out.where(~(diverged(df) | np.isinf(loss)), init).rename(CLAMPED)


def lr_sensitivity_per_seed(df: pd.DataFrame, metric: str = "final_eval_loss",
                            by=("optimizer",), lr_key: str = "lr") -> pd.DataFrame:
    """One :func:`lr_sensitivity` value per group and seed (column ``lr_sensitivity``):
    that seed's mean over the lr grid of min(L, L_init) − its own best; NaN where the
    seed misses an lr of its group or has a NaN loss at one."""
    keys = group_keys(df, by, x=lr_key)
    _check_replicates(df, keys)
    d = df.assign(**{CLAMPED: clamp_to_init(df, metric)})
    seeds = [c for c in df.columns if is_seed_key(c)]
    rows = []
    for vals, g in groups(d, keys[:-1]):
        n_lrs = g[lr_key].nunique()
        for seed_vals, sd in groups(g, seeds):
            v = sd[CLAMPED].to_numpy(float)
            rows.append((*vals, *seed_vals, np.mean(v - np.min(v)) if len(v) == n_lrs
                         else np.nan, n_lrs))
    return pd.DataFrame(rows, columns=[*keys[:-1], *seeds, "lr_sensitivity", "n_lrs"])


def lr_sensitivity(df: pd.DataFrame, metric: str = "final_eval_loss", by=("optimizer",),
                   lr_key: str = "lr", confidence: float = 0.95) -> pd.DataFrame:
    """Wortsman et al. 2023 (arXiv 2309.14322, §3.1): E_η[min(L(η), L_init) − L*].

    The expectation is the mean over the lr grid (log-spaced, as in the paper), L*
    the best loss over the grid, diverged runs scored as L_init
    (:func:`clamp_to_init`). Computed per seed (:func:`lr_sensitivity_per_seed`), each
    seed's L* from its own curve, then summarized over seeds (mean, std, CI): so the
    number has a spread. A seed missing an lr, or with a NaN loss there, is a failure
    (``n_failed``). In loss units; lower is more robust. Read it beside
    :func:`best_lr`: a curve that never learns at any lr also scores 0.
    """
    keys = group_keys(df, by, x=lr_key)[:-1]
    per_seed = lr_sensitivity_per_seed(df, metric, by, lr_key)
    rows = [(*vals, *summarize(g["lr_sensitivity"], confidence), int(g["n_lrs"].iloc[0]))
            for vals, g in groups(per_seed, keys)]
    return pd.DataFrame(rows, columns=[*keys, *STATS, "n_lrs"])


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """L(C) = E + A·C^(−alpha) (E = 0 when ``form`` is the pure power law)."""

    E: float
    A: float
    alpha: float
    form: str
    n_points: int

    def predict(self, compute):
        """Loss predicted at ``compute`` (FLOPs)."""
        return self.E + self.A * np.power(np.asarray(compute, dtype=np.float64), -self.alpha)


def compute_to_reach(fit: PowerLaw, loss):
    """The compute at which ``fit`` predicts ``loss``: C = (A / (L − E))^(1/alpha).

    inf where L <= E (the fit never gets there). Moonlight (arXiv 2502.16982)
    reports Muon reaching AdamW's loss with ~52% of the FLOPs: that is
    compute_to_reach(muon, L) / compute_to_reach(adamw, L).
    """
    gap = np.asarray(loss, dtype=np.float64) - fit.E
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(gap > 0, (fit.A / np.where(gap > 0, gap, 1.0)) ** (1.0 / fit.alpha), np.inf)
    return out[()] if out.ndim == 0 else out


def _pure_fit(log_c, log_l):
    slope, intercept = np.polyfit(log_c, log_l, 1)
    return float(np.exp(intercept)), float(-slope)


def _saturating_fit(c, loss):
    """(E, A, alpha) minimizing a Huber loss (δ=1e-3) of log-loss residuals, best of
    several starts (Hoffmann et al. 2022, App. D.2). Compute is scaled by its geometric
    mean so the three parameters are of similar size."""
    c0 = float(np.exp(np.mean(np.log(c))))
    x, log_l = c / c0, np.log(loss)

    def residual(p):
        return np.log(p[0] + np.exp(p[1]) * x ** -p[2]) - log_l

    best = None
    for frac in (0.0, 0.5, 0.8, 0.95):
        e0 = frac * loss.min()
        a0, alpha0 = _pure_fit(np.log(x), np.log(loss - e0))
        p0 = [e0, np.log(a0), float(np.clip(alpha0, 1e-3, 4.0))]
        res = optimize.least_squares(residual, p0, loss="huber", f_scale=1e-3,
                                     bounds=([0.0, -np.inf, 0.0], [loss.min(), np.inf, 5.0]))
        if best is None or res.cost < best.cost:
            best = res
    e, log_a, alpha = best.x
    return float(e), float(np.exp(log_a) * c0 ** alpha), float(alpha)


def fit_loss_vs_compute(compute, loss, min_saturating: int = 4) -> PowerLaw:
    """Fit loss against training compute; non-finite or non-positive points are dropped.

    With >= ``min_saturating`` distinct compute values: L = E + A·C^(−α), the
    Chinchilla form (Hoffmann et al. 2022, arXiv 2203.15556, eq. 2 at its compute
    frontier): E is the irreducible loss, so the curve flattens as it must. With
    fewer, three parameters are not identified and the fit is the pure power law
    L = A·C^(−α) of Kaplan et al. 2020 (arXiv 2001.08361), by least squares in
    log–log space. Needs two distinct compute values.
    """
    c, loss = np.asarray(compute, np.float64).ravel(), np.asarray(loss, np.float64).ravel()
    keep = np.isfinite(c) & np.isfinite(loss) & (c > 0) & (loss > 0)
    c, loss = c[keep], loss[keep]
    distinct = np.unique(c).size
    if distinct < 2:
        raise ValueError(f"a loss-vs-compute fit needs 2 distinct compute values, got {distinct}")
    if distinct < min_saturating:
        a, alpha = _pure_fit(np.log(c), np.log(loss))
        return PowerLaw(0.0, a, alpha, PURE, int(c.size))
    return PowerLaw(*_saturating_fit(c, loss), SATURATING, int(c.size))


def compute_points(df: pd.DataFrame, metric: str, by=("optimizer",),
                   size_key: str = "params_active", compute_key: str = "flops") -> pd.DataFrame:
    """Seed stats of ``metric`` per (group, model size), with the seed-mean compute."""
    keys = group_keys(df, by, x=size_key, scale=True)
    st = stats_over(df, keys, metric, 0.95)
    c = df.groupby(keys, dropna=False, sort=True)[compute_key].mean()
    st[compute_key] = c.to_numpy()
    return st


def fit_groups(points: pd.DataFrame, compute_key: str = "flops") -> dict:
    """{label: PowerLaw or None} per group of :func:`compute_points` output, fitted to
    seed means (one weight per model size); None below 2 distinct compute values."""
    keys = [k for k in points.columns if k not in STATS and k != compute_key][:-1]
    out = {}
    for vals, g in groups(points, keys):
        ok = np.isfinite(g["mean"]) & np.isfinite(g[compute_key]) & (g[compute_key] > 0)
        enough = g.loc[ok, compute_key].nunique() >= 2
        out[label(keys, vals)] = (fit_loss_vs_compute(g[compute_key], g["mean"])
                                  if enough else None)
    return out


def label(keys: list[str], values: tuple) -> str:
    """'muon' for one key; 'muon model.hidden_size=64' when more keys split the group."""
    return " ".join(str(v) if i == 0 else f"{k}={v}" for i, (k, v) in enumerate(zip(keys, values)))


def compute_ratio(baseline: PowerLaw, reference: PowerLaw, compute) -> np.ndarray:
    """The compute ``baseline`` needs to reach the loss ``reference`` predicts at
    ``compute``, divided by ``compute``: > 1 when ``reference`` is the more
    compute-efficient (Moonlight's Muon-vs-AdamW ~1/0.52 ≈ 1.9, arXiv 2502.16982)."""
    c = np.asarray(compute, dtype=np.float64)
    return compute_to_reach(baseline, reference.predict(c)) / c


def _runs_fit(c, loss) -> PowerLaw:
    return fit_loss_vs_compute(c, loss, min_saturating=np.inf)


def efficiency_ratio(df: pd.DataFrame, baseline: str, reference: str, at,
                     metric: str = "final_eval_loss", hue: str = "optimizer",
                     compute_key: str = "flops", n_boot: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """:func:`compute_ratio` of two optimizers' loss-vs-compute curves at compute ``at``
    (scalar or array), with a residual-bootstrap interval.

    Each optimizer's curve is the pure power law L = A·C^(−α) fitted by least squares
    in log–log space to its runs (every seed a point; pass the tuned runs, e.g.
    :func:`at_best_lr` per size). Over a compute range of about a decade the
    saturating form's irreducible loss E is not identified by a handful of sizes,
    while a ratio at matched loss inside (or just past) the measured range needs only
    the local log–log slope, which the pure law fits with two parameters (Kaplan et
    al. 2020, arXiv 2001.08361). Interval: refit both curves to fitted values plus
    log-residuals resampled with replacement within each optimizer (scaled by
    √(n/(n−2)) for the two fitted parameters), ``n_boot`` times; the percentile
    interval of the ratio. It covers seed noise (seeds are separate points) and
    lack of fit. Returns {"value", "low", "high", "n_boot", "fits": {name: PowerLaw}}.
    """
    rng = np.random.default_rng(seed)
    data, fits = {}, {}
    for name in (baseline, reference):
        g = df[(df[hue] == name) & np.isfinite(df[metric].astype(float))]
        c, loss = g[compute_key].to_numpy(float), g[metric].to_numpy(float)
        if np.unique(c).size < 2:
            raise ValueError(f"{name}: needs runs at 2 distinct compute values, has "
                             f"{np.unique(c).size}")
        fits[name] = _runs_fit(c, loss)
        resid = np.log(loss) - np.log(fits[name].predict(c))
        data[name] = (c, fits[name].predict(c), resid * np.sqrt(c.size / max(c.size - 2, 1)))
    value = compute_ratio(fits[baseline], fits[reference], at)
    boots = []
    for _ in range(n_boot):
        refit = {n: _runs_fit(c, pred * np.exp(rng.choice(r, size=r.size, replace=True)))
                 for n, (c, pred, r) in data.items()}
        boots.append(compute_ratio(refit[baseline], refit[reference], at))
    lo, hi = np.nanpercentile(np.asarray(boots), [50 * (1 - confidence), 50 * (1 + confidence)],
                              axis=0)
    return {"value": value, "low": lo, "high": hi, "n_boot": n_boot, "fits": fits}
