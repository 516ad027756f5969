"""AdamW vs MuonClip on two tiny model sizes, two learning rates, two seeds.

    python -m experiments.sweep tiny_ladder [--quick] [--workers 2]

A template for real studies, and the sweep the tests feed to
notebooks/sweep_analysis.ipynb: every analysis the notebook makes (a metric
against a swept key with seed error bars, LR sensitivity, loss against compute
across sizes) has something to show. Sizes differ in width only, at the tiny
preset's shape otherwise. Full: 16 members × 200 steps (2.5 minutes on 2 CPUs with
``--workers 2``); ``--quick``: one seed, 6 steps each (8 members), for the tests.
"""

from __future__ import annotations

import os

import matplotlib

from experiments.sweeps import Study, grid, zipped
from experiments.sweeps import _common as common
from k2jax import analysis, atomic, plots

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SIZES = zipped({"model.hidden_size": [32, 64], "model.intermediate_size": [64, 128],
                "model.moe_intermediate_size": [16, 32]})
OPTIMIZERS = zipped({"optimizer.name": ["adamw", "muon"], "optimizer.qk_clip": [False, True]})
AXES = (SIZES, OPTIMIZERS, grid("optimizer.lr", [0.01, 0.03]), grid("train.seed", [0, 1]))
BASE = ("data.seq_len=64", "data.global_batch_size=16", "optimizer.warmup_steps=20",
        "optimizer.tau=30", "optimizer.qk_clip=false", "train.steps=200",
        "train.eval_every=200", "train.eval_batches=4", "train.checkpoint_every=100000",
        "train.final_checkpoint=false", "train.histogram_every=100000")
QUICK_BASE = (*BASE, "data.seq_len=32", "data.global_batch_size=8",
              "optimizer.warmup_steps=2", "train.steps=6", "train.eval_every=6",
              "train.eval_batches=2")


def analyze(df, out: str) -> None:
    """report.md (seed means and spreads, best lr, LR sensitivity) and report.png."""
    # every member with a config, failed ones too: a divergence stop is a data point
    # (it scores its initial loss in LR sensitivity), not a row to drop
    ok = df[df["lr"].notna()]
    metric = "final_eval_loss"
    done = int((df["status"] == "ok").sum())
    by = ("model.hidden_size", "optimizer")
    lines = ["# tiny_ladder", "", f"{done} of {len(df)} members finished.", "",
             "## Final eval loss over seeds", "",
             common.table(analysis.seed_stats(ok, [*by, "lr"], metric)), "",
             "## Best lr per optimizer and size", "",
             common.table(analysis.best_lr(ok, metric, by=by)), "",
             "## LR sensitivity (Wortsman et al. 2023)", "",
             common.table(analysis.lr_sensitivity(ok, metric, by=by)),
             "", "![curves](report.png)", ""]
    atomic.write_text(os.path.join(out, "report.md"), "\n".join(lines))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plots.plot_lr_sensitivity(axes[0], ok, metric)
    plots.plot_loss_vs_compute(axes[1], analysis.at_best_lr(ok, metric), metric)  # tuned
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report.png"), dpi=100)
    plt.close(fig)


STUDY = Study(
    description=__doc__.splitlines()[0],
    config="tiny",
    base=BASE,
    axes=AXES,
    quick={"base": QUICK_BASE, "axes": AXES[:3]},  # one seed
    analyze=analyze,
)
