"""LR sensitivity of AdamW, Muon, MuonClip and AdamW + QK-Clip on `small`, over seeds.

    python -m experiments.sweep lr_sensitivity [--quick] [--workers 2]

Wortsman et al. 2023 (arXiv 2309.14322, §3.1) call an optimizer robust when its
final loss moves little over a wide lr range: LR sensitivity = E_η[min(L(η), L_init)
− L*], the mean over a log-spaced grid of how far each lr ends above the best one,
a diverged run scored as the initial loss (k2jax.analysis.lr_sensitivity). Muon's
update is RMS-matched to AdamW's (0.2·√max(fan), Moonlight arXiv 2502.16982), so one
grid serves all four optimizers. The max attention logit against lr shows where
each optimizer's logits run away, and whether QK-Clip (τ = 30, the spike study's)
holds them.

Full: 4 optimizers × 6 lrs (1e-3 … 1e-1, 2 decades) × 2 seeds = 48 runs of 120 steps
of the spike study's recipe. ``--quick``: the tiny preset, 2 optimizers × 3 lrs ×
2 seeds, 6 steps (the tests).
"""

from __future__ import annotations

import matplotlib
import pandas as pd

from experiments.sweeps import Study, grid
from experiments.sweeps import _common as common
from k2jax import analysis, plots

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

LRS = (0.001, 0.0025, 0.0063, 0.016, 0.04, 0.1)  # 10^(-3 + 0.4k), rounded
METRIC = "final_eval_loss"


def per_optimizer(df) -> dict:
    """{optimizer: best lr, its loss, whether it is at the grid's edge, LR sensitivity
    (over seeds, and each seed's), max logit at the best and the top lr, the lrs where a
    seed diverged}."""
    best = analysis.best_lr(df, METRIC).set_index("optimizer")
    sens = analysis.lr_sensitivity(df, METRIC).set_index("optimizer")
    per_seed = analysis.lr_sensitivity_per_seed(df, METRIC)
    top, failed = df["lr"].max(), analysis.diverged(df)
    out = {}
    for opt, g in df.groupby("optimizer", sort=True):
        b, s = best.loc[opt], sens.loc[opt]
        at_best = g[g["lr"] == b["lr"]]
        out[opt] = {
            "best_lr": b["lr"], "best_lr_at_edge": bool(b["at_edge"]),
            "best_loss": common.spread(at_best[METRIC]),
            "lr_sensitivity": {k: s[k] for k in ("mean", "std", "n", "n_failed", "ci_low",
                                                 "ci_high")},
            "lr_sensitivity_per_seed": common.spread(
                per_seed.loc[per_seed["optimizer"] == opt, "lr_sensitivity"]),
            "max_logit_at_best_lr": common.spread(at_best["max_logit"]),
            "max_logit_at_top_lr": common.spread(g.loc[g["lr"] == top, "max_logit"]),
            "diverged_lrs": sorted(g.loc[failed[g.index], "lr"].unique().tolist()),
        }
    return out


def sentence(opts: dict, top: float) -> str:
    """The result in one sentence of numbers: per optimizer its best lr and loss there,
    its LR sensitivity and its max logit at the top lr, each with its seed range."""
    parts = [f"{o}: best lr {r['best_lr']:g}{' (grid edge)' if r['best_lr_at_edge'] else ''} "
             f"→ eval loss {common.pm(r['best_loss'])}, LR sensitivity "
             f"{common.pm(r['lr_sensitivity_per_seed'])}, max logit at lr {top:g} "
             f"{common.pm(r['max_logit_at_top_lr'])}" for o, r in opts.items()]
    return "; ".join(parts) + "."


def analyze(df, out: str) -> None:
    """summary.json, report.md and report.png from the sweep's results table."""
    ran = df[df["lr"].notna()]  # every member with a config: a divergence is a data point
    opts = per_optimizer(ran)
    curves = analysis.seed_stats(ran, ["optimizer", "lr"], METRIC)
    logits = analysis.seed_stats(ran, ["optimizer", "lr"], "max_logit")
    summary_rows = [{"optimizer": o, "best_lr": r["best_lr"],
                     "eval loss at best lr": common.pm(r["best_loss"]),
                     "LR sensitivity": common.pm(r["lr_sensitivity_per_seed"]),
                     "max logit at best lr": common.pm(r["max_logit_at_best_lr"]),
                     "diverged at lr": ", ".join(f"{x:g}" for x in r["diverged_lrs"]) or "–"}
                    for o, r in opts.items()]
    md = [sentence(opts, ran["lr"].max()), "",
          "LR sensitivity = E over the lr grid of min(L, L_init) − L* (Wortsman et al. 2023), "
          "per seed; spreads are min–max over seeds.", "",
          common.table(pd.DataFrame(summary_rows)), "",
          "## Final eval loss against lr (seed mean, std, n)", "", common.table(curves), "",
          "## Max attention logit against lr", "", common.table(logits)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plots.plot_lr_sensitivity(axes[0], ran, METRIC)
    plots.plot_metric(axes[1], ran, "lr", "max_logit")
    axes[1].set_yscale("log")
    fig.tight_layout()
    common.write(out, "lr_sensitivity", {"metric": METRIC, "lrs": list(LRS), "optimizers": opts,
                                  "curves": curves.to_dict("records"),
                                  "max_logit": logits.to_dict("records")}, md, fig)
    plt.close(fig)


STUDY = Study(
    description=__doc__.splitlines()[0],
    config="small",
    base=(*common.SMALL_RECIPE, "optimizer.tau=30", *common.steps(120)),
    axes=(common.OPTIMIZERS, grid("optimizer.lr", LRS), common.seeds(2)),
    quick={"config": "tiny", "base": (*common.QUICK_RECIPE, "optimizer.tau=30", *common.steps(6)),
           "axes": (common.OPTIMIZERS[1:3], grid("optimizer.lr", LRS[::2]), common.seeds(2))},
    analyze=analyze,
)
