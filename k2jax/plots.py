"""Plots of sweep numbers (:mod:`k2jax.analysis`), each drawn on a given matplotlib ``ax``.

The numbers come from :mod:`k2jax.analysis`, so a plot and a report's table never
disagree; this module never imports matplotlib itself (the caller picks a backend).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from k2jax import analysis


def _log_x(values) -> bool:
    """Log axis for a positive numeric key spanning at least a decade (lr grids)."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return False
    v = values[np.isfinite(values.astype(float))]
    return bool(len(v) and (v > 0).all() and v.max() / v.min() >= 10)


def _xs(st: pd.DataFrame, key: str):
    """x positions and (ticks, tick labels) for ``key``: itself when numeric, else ranks."""
    v = st[key]
    if pd.api.types.is_numeric_dtype(v) and not pd.api.types.is_bool_dtype(v):
        return v.astype(float).to_numpy(), None
    cats = sorted(v.astype(str).unique())
    return v.astype(str).map(cats.index).to_numpy(float), (list(range(len(cats))), cats)


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _yerr(g: pd.DataFrame, error: str):
    if error == "std":
        lo = hi = g["std"].to_numpy(float)
    else:
        lo = (g["mean"] - g["ci_low"]).to_numpy(float)
        hi = (g["ci_high"] - g["mean"]).to_numpy(float)
    return np.nan_to_num(np.vstack([lo, hi]))


def plot_metric(ax, df: pd.DataFrame, key: str, metric: str, hue: str | None = "optimizer",
                error: str = "ci") -> pd.DataFrame:
    """Seed mean of ``metric`` against swept ``key``, one line per ``hue`` value.

    Error bars: the 95% t interval (``error="ci"``) or ±std; none for a single
    seed. Points with failed seeds are annotated ("2 failed"). Returns the stats.
    """
    keys = analysis.group_keys(df, [hue] if hue and hue != key else [], x=key)
    st = analysis.stats_over(df, keys, metric, 0.95)
    xs, ticks = _xs(st, key)
    st = st.assign(_x=xs)
    for vals, g in analysis.groups(st, keys[:-1]):
        g = g.sort_values("_x")
        ax.errorbar(g["_x"], g["mean"], yerr=_yerr(g, error), marker="o", capsize=3,
                    ls="-" if ticks is None else "none",
                    label=analysis.label(keys[:-1], vals) or None)
        for _, r in g[(g["n_failed"] > 0) & np.isfinite(g["mean"])].iterrows():
            ax.annotate(f"{int(r['n_failed'])} failed", (r["_x"], r["mean"]), fontsize=7)
    if ticks:
        ax.set_xticks(*ticks)
    if _log_x(st[key]):
        ax.set_xscale("log")
    ax.set(xlabel=key, ylabel=f"{metric} (seed mean, {'95% CI' if error == 'ci' else 'std'})")
    _legend(ax)
    return st.drop(columns="_x")


def plot_lr_sensitivity(ax, df: pd.DataFrame, metric: str = "final_eval_loss",
                        hue: str = "optimizer", lr_key: str = "lr") -> pd.DataFrame:
    """min(L, L_init) against lr per ``hue`` (seed error bars), each best lr starred.

    Diverged runs sit at L_init (dotted line), as in Wortsman et al. 2023, Fig. 1;
    y spans the seed losses to L_init, so a wide interval is cut rather than
    flattening the curves. Returns :func:`best_lr`'s table.
    """
    d = df.assign(**{analysis.CLAMPED: analysis.clamp_to_init(df, metric)})
    plot_metric(ax, d, lr_key, analysis.CLAMPED, hue=hue)
    best = analysis.best_lr(df, metric, by=[hue], lr_key=lr_key)
    ax.plot(best[lr_key], best["mean"], "k*", ms=12, label="best lr")
    init = float(np.nanmedian(d["initial_train_loss"]))
    ax.axhline(init, color="gray", ls=":", lw=1)
    low = np.nanmin(d[analysis.CLAMPED]) if np.isfinite(d[analysis.CLAMPED]).any() else np.nan
    if np.isfinite(init) and np.isfinite(low) and low < init:  # 2-seed t intervals are wide
        ax.set_ylim(low - 0.1 * (init - low), init + 0.1 * (init - low))
    ax.set(xlabel=lr_key, ylabel=f"min({metric}, initial loss)", xscale="log")
    _legend(ax)
    return best


def plot_loss_vs_compute(ax, df: pd.DataFrame, metric: str = "final_eval_loss",
                         hue: str = "optimizer", size_key: str = "params_active",
                         compute_key: str = "flops", fits: dict | None = None) -> dict:
    """Seed mean of ``metric`` per model size against compute, and a fitted curve per
    ``hue`` (:func:`fit_loss_vs_compute`, or the given ``fits`` by label); log x, linear
    loss (with E > 0 the curve is no straight line on log-log axes anyway). Returns
    {label: PowerLaw}."""
    points = analysis.compute_points(df, metric, [hue], size_key, compute_key)
    fits = analysis.fit_groups(points, compute_key) if fits is None else fits
    keys = list(points.columns[: points.columns.get_loc("mean") - 1])
    for vals, g in analysis.groups(points, keys):
        name = analysis.label(keys, vals)
        bars = ax.errorbar(g[compute_key], g["mean"], yerr=_yerr(g, "ci"), marker="o",
                           ls="none", capsize=3, label=name)
        fit = fits.get(name)
        if fit is not None:
            c = np.geomspace(g[compute_key].min(), g[compute_key].max(), 100)
            ax.plot(c, fit.predict(c), color=bars.lines[0].get_color(), lw=1,
                    label=f"{name}: {fit.form}, alpha={fit.alpha:.3g}")
    ax.set(xscale="log", xlabel=f"{compute_key} (training FLOPs)",
           ylabel=f"{metric} (seed mean, 95% CI)")
    _legend(ax)
    return fits
