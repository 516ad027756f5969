"""k2jax.analysis against hand-computed answers on small synthetic sweeps."""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from tiny_runs import execute_notebook

from k2jax import analysis, plots, sweeps

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LRS = (1e-3, 3e-3, 1e-2)
SIZES = {64: 1_000_000, 128: 3_500_000}  # model.hidden_size -> params_active
TOKENS = 10_000_000


def synthetic_sweep() -> pd.DataFrame:
    """2 optimizers x 3 lrs x 2 seeds x 2 sizes, as k2jax.sweeps.load returns it. Loss is
    quadratic in log lr around a per-optimizer optimum, falls with size; muon at
    lr 1e-2, size 64, seed 1 diverges (failed, NaN losses, an error message)."""
    rows = []
    for opt, lr_star in (("adamw", 3e-3), ("muon", 1e-2)):
        for lr in LRS:
            for seed in (0, 1):
                for hidden, active in SIZES.items():
                    loss = 3.0 + 0.3 * math.log10(lr / lr_star) ** 2 - 0.1 * (hidden // 64)
                    loss += (0.01 if seed else -0.01) + (0.05 if opt == "adamw" else 0.0)
                    bad = opt == "muon" and lr == 1e-2 and seed == 1 and hidden == 64
                    rows.append({
                        "member": f"{opt}-{lr:g}-{seed}-{hidden}",
                        "status": "failed" if bad else "ok",
                        "error": "diverged at step 40" if bad else "", "attempts": 1,
                        "optimizer.name": opt, "optimizer.lr": lr, "train.seed": seed,
                        "model.hidden_size": hidden, "optimizer": opt, "lr": lr, "seed": seed,
                        "params_total": 4 * active, "params_active": active,
                        "steps": 40 if bad else 100, "initial_train_loss": 10.8,
                        "final_train_loss": math.nan if bad else loss + 0.02,
                        "min_train_loss": loss - 0.05, "final_eval_loss": math.nan if bad else loss,
                        "max_logit": 900.0 if bad else 20.0 * lr / 1e-3,
                        "spikes": 0, "diverged": bad, "tokens": TOKENS,
                        "flops": 6.0 * active * TOKENS, "wall_s": 10.0})
    return pd.DataFrame(rows)


def frame(**columns) -> pd.DataFrame:
    return pd.DataFrame(columns)


def test_seed_stats_matches_scipy_t_interval():
    """Mean, sample std, n and the 95% t interval agree with scipy.stats.t per group."""
    a, b = [2.0, 2.5, 3.1], [1.0, 1.4]
    df = frame(optimizer=["x"] * 3 + ["y"] * 2, seed=[0, 1, 2, 0, 1], loss=a + b)
    st = analysis.seed_stats(df, ["optimizer"], "loss").set_index("optimizer")
    for name, x in (("x", a), ("y", b)):
        lo, hi = stats.t.interval(0.95, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
        row = st.loc[name]
        assert row["mean"] == pytest.approx(np.mean(x))
        assert row["std"] == pytest.approx(np.std(x, ddof=1))
        assert (row["n"], row["n_failed"]) == (len(x), 0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((lo, hi))


def test_seed_stats_counts_non_finite_as_failed():
    """inf and NaN are failures: out of the mean, counted in n_failed; one seed has no spread."""
    df = frame(optimizer=["x"] * 4, seed=[0, 1, 2, 3], loss=[2.0, np.inf, np.nan, 4.0])
    row = analysis.seed_stats(df, "optimizer", "loss").iloc[0]
    assert (row["mean"], row["n"], row["n_failed"]) == (3.0, 2, 2)
    one = analysis.seed_stats(df.iloc[:1], "optimizer", "loss").iloc[0]
    assert one["mean"] == 2.0 and one["n"] == 1 and np.isnan([one["std"], one["ci_low"]]).all()


def test_group_keys_extend_by_varying_keys_and_skip_aliases():
    """Sizes split groups; optimizer.name (fixed by optimizer) and optimizer.lr (alias of
    lr) do not; seeds never do."""
    df = synthetic_sweep()
    assert analysis.swept_keys(df) == ["optimizer.name", "optimizer.lr", "model.hidden_size"]
    assert analysis.group_keys(df, ["optimizer"], x="lr") == [
        "optimizer", "model.hidden_size", "lr"]
    assert analysis.group_keys(df, "optimizer") == [
        "optimizer", "optimizer.lr", "model.hidden_size"]
    st = analysis.seed_stats(df, ["optimizer", "lr"], "final_eval_loss")
    assert len(st) == 2 * 3 * 2 and st["n"].sum() + st["n_failed"].sum() == len(df)


def test_group_keys_split_sizes_with_disjoint_lr_grids():
    """When each size has its own lrs, lr fixes the size, yet the sizes stay two curves."""
    df = frame(optimizer=["m"] * 4, lr=[1.0, 2.0, 3.0, 4.0], **{
        "optimizer.lr": [1.0, 2.0, 3.0, 4.0], "model.hidden_size": [64, 64, 128, 128]})
    assert analysis.group_keys(df, ["optimizer"], x="lr") == [
        "optimizer", "model.hidden_size", "lr"]
    tuned = frame(optimizer=["m", "m", "a", "a"], params_active=[1, 2, 1, 2],
                  **{"optimizer.lr": [1.0, 2.0, 1.0, 1.0]})
    assert analysis.group_keys(tuned, ["optimizer"], x="params_active", scale=True) == [
        "optimizer", "params_active"]


def test_seed_stats_rejects_rows_that_share_a_seed():
    """Two rows with one seed in one group are two configs the keys cannot tell apart."""
    df = frame(optimizer=["x", "x"], seed=[0, 0], loss=[1.0, 2.0])
    with pytest.raises(ValueError, match="share a seed"):
        analysis.seed_stats(df, ["optimizer"], "loss")


def test_best_lr_skips_lrs_with_a_failed_seed_and_flags_the_edge():
    """muon at size 64 is best at 1e-2 by the surviving seed, but one seed diverged there."""
    best = analysis.best_lr(synthetic_sweep()).set_index(["optimizer", "model.hidden_size"])
    assert best.loc[("adamw", 64), "lr"] == 3e-3 and not best.loc[("adamw", 64), "at_edge"]
    assert best.loc[("muon", 64), "lr"] == 3e-3 and not best.loc[("muon", 64), "at_edge"]
    assert best.loc[("muon", 128), "lr"] == 1e-2 and best.loc[("muon", 128), "at_edge"]
    assert best.loc[("adamw", 64), "mean"] == pytest.approx(2.9 + 0.05)
    tuned = analysis.at_best_lr(synthetic_sweep())
    assert len(tuned) == 8 and set(tuned.groupby("optimizer")["lr"].unique()["muon"]) == {
        3e-3, 1e-2}


def test_clamp_to_init():
    """min(L, L_init); a diverged run scores L_init; NaN without divergence stays NaN."""
    df = frame(loss=[2.0, 12.0, 3.0, np.inf, np.nan], initial_train_loss=[10.0] * 4 + [np.nan],
               diverged=[False, False, True, None, None])
    out = analysis.clamp_to_init(df, "loss").to_numpy()
    np.testing.assert_array_equal(out[:4], [2.0, 10.0, 10.0, 10.0])
    assert np.isnan(out[4])


def test_lr_sensitivity_by_hand():
    """Per seed: mean over lrs of min(L, L_init) minus the seed's best; then over seeds."""
    df = frame(optimizer=["m"] * 6, lr=[1e-3, 1e-2, 1e-1] * 2, seed=[0] * 3 + [1] * 3,
               loss=[3.0, 2.0, np.nan, 3.2, 2.2, 11.0], initial_train_loss=[10.0] * 6,
               diverged=[False, False, True, False, False, False])
    row = analysis.lr_sensitivity(df, "loss").iloc[0]
    per_seed = [(3 + 2 + 10) / 3 - 2, (3.2 + 2.2 + 10) / 3 - 2.2]
    assert row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert (row["n"], row["n_failed"], row["n_lrs"]) == (2, 0, 3)
    missing = analysis.lr_sensitivity(df.drop(index=5), "loss").iloc[0]
    assert (missing["n"], missing["n_failed"]) == (1, 1)
    assert missing["mean"] == pytest.approx(per_seed[0])


def test_lr_sensitivity_on_the_synthetic_sweep():
    """The quadratic curve: adamw's optimum sits mid-grid, so it is the less sensitive."""
    out = analysis.lr_sensitivity(synthetic_sweep()).set_index(["optimizer", "model.hidden_size"])
    adamw = 0.3 * np.mean([np.log10(1 / 3) ** 2, 0, np.log10(10 / 3) ** 2])
    assert out.loc[("adamw", 64), "mean"] == pytest.approx(adamw)
    q = 0.3 * np.log10(0.3) ** 2  # muon's excess loss at 3e-3; 0.3 at 1e-3
    seeds = [(0.3 + q + 0) / 3, (3.21 + 2.91 + q + 10.8) / 3 - (2.91 + q)]  # seed 1 diverged
    assert out.loc[("muon", 64), "mean"] == pytest.approx(np.mean(seeds))
    assert out.loc[("muon", 64), "n_failed"] == 0
    assert out.loc[("muon", 128), "mean"] > out.loc[("adamw", 128), "mean"]


def test_fit_recovers_a_saturating_power_law():
    """Exact Chinchilla-form data over 4 decades of compute gives back E, A, alpha."""
    compute = np.geomspace(1e15, 1e19, 6)
    truth = analysis.PowerLaw(1.8, 2.0e4, 0.28, analysis.SATURATING, 6)
    fit = analysis.fit_loss_vs_compute(compute, truth.predict(compute))
    assert fit.form == analysis.SATURATING and fit.n_points == 6
    assert (fit.E, fit.A, fit.alpha) == pytest.approx((1.8, 2.0e4, 0.28), rel=1e-3)


def test_fit_falls_back_to_a_pure_power_law():
    """Three compute values (and a NaN point) fit A*C^-alpha in log-log space."""
    compute = np.array([1e16, 1e17, 1e18, 1e19])
    loss = 50.0 * compute ** -0.08
    loss[-1] = np.nan
    fit = analysis.fit_loss_vs_compute(compute, loss)
    assert fit.form == analysis.PURE and fit.E == 0.0 and fit.n_points == 3
    assert (fit.A, fit.alpha) == pytest.approx((50.0, 0.08), rel=1e-9)
    with pytest.raises(ValueError, match="2 distinct"):
        analysis.fit_loss_vs_compute([1e16, 1e16], [3.0, 3.1])


def test_compute_to_reach_inverts_predict():
    fit = analysis.PowerLaw(1.8, 2.0e4, 0.28, analysis.SATURATING, 6)
    compute = np.array([1e15, 3e17, 1e20])
    np.testing.assert_allclose(analysis.compute_to_reach(fit, fit.predict(compute)), compute,
                               rtol=1e-9)
    assert analysis.compute_to_reach(fit, 1.8) == np.inf
    assert np.isinf(analysis.compute_to_reach(fit, [1.0, 1.7])).all()


def test_loss_vs_compute_points_and_fits():
    """At the tuned lr, one point per size with its seed stats, a pure fit per optimizer."""
    tuned = analysis.at_best_lr(synthetic_sweep())
    points = analysis.compute_points(tuned, "final_eval_loss")
    assert list(points["optimizer"]) == ["adamw", "adamw", "muon", "muon"]
    assert (points["n"] == 2).all()
    np.testing.assert_allclose(points["flops"], [6e6 * TOKENS, 21e6 * TOKENS] * 2)
    fits = analysis.fit_groups(points)
    assert set(fits) == {"adamw", "muon"} and fits["muon"].form == analysis.PURE
    np.testing.assert_allclose(fits["adamw"].predict(points["flops"][:2]),
                               points["mean"][:2], rtol=1e-9)


def test_plots_draw_on_agg_axes():
    """Each helper draws its lines on the given axes, log x where the key spans decades."""
    df = synthetic_sweep()
    fig, axes = plt.subplots(1, 4)
    st = plots.plot_metric(axes[0], df, "optimizer.lr", "final_eval_loss")
    assert len(st) == 12 and axes[0].get_xscale() == "log"
    assert len(axes[0].get_legend().get_texts()) == 4
    best = plots.plot_lr_sensitivity(axes[1], df, "final_eval_loss")
    assert len(best) == 4 and "best lr" in [t.get_text() for t in axes[1].get_legend().get_texts()]
    fits = plots.plot_loss_vs_compute(axes[2], analysis.at_best_lr(df), "final_eval_loss")
    assert set(fits) == {"adamw", "muon"} and axes[2].get_xscale() == "log"
    plots.plot_metric(axes[3], df, "optimizer", "max_logit", hue=None, error="std")
    assert [t.get_text() for t in axes[3].get_xticklabels()] == ["adamw", "muon"]
    plt.close(fig)


def test_sweep_analysis_notebook_executes(tmp_path):
    """notebooks/sweep_analysis.ipynb runs headless on a synthetic results.csv read by
    k2jax.sweeps.load (true/false bools, empty cells for NaN)."""
    df = synthetic_sweep()
    keys = [c for c in df.columns if "." in c]
    sweeps.write_results(tmp_path / "results.csv", df.to_dict("records"), keys)
    text, images = execute_notebook("sweep_analysis.ipynb", K2JAX_SWEEP=str(tmp_path))
    assert "24 members" in text and "diverged at step 40" in text
    assert images == 3
