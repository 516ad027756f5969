"""The scaling ladder: AdamW vs MuonClip at their own best lr over 4 sizes, and the
compute-efficiency ratio at matched loss.

    python -m experiments.sweep scaling_ladder [--quick] [--workers 2]

Moonlight (arXiv 2502.16982) fits loss against training FLOPs for Muon and AdamW and
finds Muon reaching AdamW's loss with ~52% of the compute (a ratio of ~1.9); a tuned
benchmark (arXiv 2509.02046) finds the speed-up falling with scale (~1.4× at 0.1B,
~1.1× at 1.2B). This study measures the same ratio at CPU scale:

- sizes: `small`'s shape (MLA, 1 dense + 3 MoE layers, 16 experts top-2 + 1 shared)
  at widths 48, 64, 80 and 112 (FFN 3·d, expert width d, heads d/32, q rank d/2):
  0.19M–0.72M active parameters;
- tokens proportional to active parameters (1 token per active parameter, 8 × 128
  tokens per step), so compute C = 6·N·D-style FLOPs (k2jax.metrics.flops_per_token)
  grows ~N² and spans 12.5× from the smallest to the largest size;
- {AdamW, MuonClip (τ = 30)}, each at 4 lrs ×2 apart per size (its best is picked per
  size, k2jax.analysis.at_best_lr), 2 seeds at the two smallest sizes;
- the spike study's warmup-stable-decay schedule with 10% warm-up, evaluated at the
  end of training (2509.02046: rankings mid-run can flip once the lr decays).

Fit: per optimizer, L = A·C^(−α) over its tuned runs (k2jax.analysis.efficiency_ratio
says why this form over this range). The ratio is AdamW's compute to reach the
loss MuonClip's curve gives at MuonClip's largest compute, over that compute, with
a residual-bootstrap 95% interval; the ratio at the smallest compute shows its
trend with scale.

Full: 48 runs. ``--quick``: widths 32 and 48, 2 lrs, 2 seeds at width 32, a few steps.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from experiments.sweeps import Study, zipped
from experiments.sweeps import _common as common
from k2jax import analysis, params, plots, presets

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

BATCH, SEQ, TOKENS_PER_PARAM, METRIC = 8, 128, 1.0, "final_eval_loss"
# ×2 apart around each optimizer's best lr on `small` (lr_sensitivity: AdamW 0.0063,
# Muon 0.016–0.04), each on its own grid; the outer lrs (0.0015, 0.08) were added when
# the best lr of the smallest sizes sat on the first grid's edge
LRS = {"adamw": (0.0015, 0.003, 0.006, 0.012), "muonclip": (0.01, 0.02, 0.04, 0.08)}
BASELINE, REFERENCE = "adamw", "muonclip"


def shape(d: int) -> list[str]:
    """`small`'s shape at width d (the docstring's ratios)."""
    return [f"model.hidden_size={d}", f"model.intermediate_size={3 * d}",
            f"model.moe_intermediate_size={d}", f"model.num_attention_heads={max(2, d // 32)}",
            f"model.q_lora_rank={d // 2}"]


def rung(d: int, tokens_per_param: float, batch: int, seq: int, min_steps: int = 4) -> dict:
    """One size: its model keys and a step count giving tokens ∝ active parameters."""
    _, active = params.count(presets.preset("small", *(s.split(".", 1)[1] for s in shape(d))))
    steps = max(min_steps, round(tokens_per_param * active / (batch * seq)))
    return {**dict(s.split("=") for s in shape(d)), "train.steps": steps,
            "train.eval_every": steps, "optimizer.warmup_steps": max(1, steps // 10)}


def sizes(widths, seeded=(), n_seeds=2, tokens_per_param=TOKENS_PER_PARAM, batch=BATCH,
          seq=SEQ):
    """One axis of (size, seed) points: every width at seed 0, and seeds 1 … n_seeds−1
    at the ``seeded`` widths only (the small sizes are cheap, and noisiest). Seed k
    sets train.seed and data.seed, as common.seeds does."""
    pts = [(d, k) for d in widths for k in range(n_seeds) if k == 0 or d in seeded]
    rungs = {d: rung(d, tokens_per_param, batch, seq) for d in widths}
    return zipped({**{key: [rungs[d][key] for d, _ in pts] for key in rungs[widths[0]]},
                   "train.seed": [k for _, k in pts], "data.seed": [k for _, k in pts]})


def optimizer_lrs(lrs: dict):
    """One axis of (optimizer, lr) points: each optimizer on its own lr grid."""
    pairs = [(o, lr) for o, grid in lrs.items() for lr in grid]
    return zipped({"optimizer.name": ["adamw" if o == "adamw" else "muon" for o, _ in pairs],
                   "optimizer.qk_clip": [o == "muonclip" for o, _ in pairs],
                   "optimizer.lr": [lr for _, lr in pairs]})


def tuned(df) -> pd.DataFrame:
    """The runs at each (optimizer, size)'s best lr (all their seeds)."""
    return analysis.at_best_lr(df, METRIC, by=("optimizer", "params_active"))


def ratio_table(result: dict, compute) -> pd.DataFrame:
    """The ratio and its interval at each compute of ``compute``."""
    return pd.DataFrame({"flops": compute, "ratio": np.atleast_1d(result["value"]),
                         "low": np.atleast_1d(result["low"]),
                         "high": np.atleast_1d(result["high"])})


def headline(r: dict, at, fits: dict, extrapolation: float, edges: list[str]) -> str:
    """The result in one sentence of numbers."""
    out = (f"Compute-efficiency ratio (AdamW's compute to reach MuonClip's loss ÷ MuonClip's "
           f"compute, at MuonClip's largest compute {at[-1]:.3g} FLOPs): "
           f"{float(r['value'][-1]):.3g} (95% bootstrap interval {float(r['low'][-1]):.3g}–"
           f"{float(r['high'][-1]):.3g}); at the smallest compute {at[0]:.3g}: "
           f"{float(r['value'][0]):.3g} ({float(r['low'][0]):.3g}–{float(r['high'][0]):.3g}). "
           "Fits L = A·C^(−α): " + "; ".join(f"{k} α = {v['alpha']:.3f}, A = {v['A']:.3g}"
                                             for k, v in fits.items()) +
           f". (Moonlight: ~1.9.) AdamW's curve is extrapolated to {extrapolation:.3g}× its "
           "largest measured compute.")
    if edges:
        out += f" Best lr at the edge of its grid: {', '.join(edges)}."
    return out + (" The interval resamples fit residuals (seed noise and lack of fit); it "
                  "does not redo the best-lr pick, so it is a lower bound on the "
                  "uncertainty.")


def analyze(df, out: str) -> None:
    """summary.json, report.md and report.png: tuned runs, fits, the ratio."""
    ran = df[df["lr"].notna()]
    best = tuned(ran)
    ref_c = np.sort(best.loc[best["optimizer"] == REFERENCE, "flops"].unique())
    at = np.array([ref_c[0], ref_c[-1]])
    r = analysis.efficiency_ratio(best, BASELINE, REFERENCE, at, METRIC)
    fits = {k: vars(v) for k, v in r["fits"].items()}
    need = float(r["value"][-1]) * at[-1]
    extrapolation = need / best.loc[best["optimizer"] == BASELINE, "flops"].max()
    lrs = analysis.best_lr(ran, METRIC, by=("optimizer", "params_active"))
    edges = [f"{o} at {n:,} active params (lr {lr:g})" for o, n, lr, e in
             lrs[["optimizer", "params_active", "lr", "at_edge"]].itertuples(index=False) if e]
    points = analysis.compute_points(best, METRIC, ["optimizer"], "params_active")
    md = [headline(r, at, fits, extrapolation, edges), "",
          "## Ratio at matched loss", "", common.table(ratio_table(r, at), 3), "",
          "## Best lr per optimizer and size", "", common.table(lrs), "",
          "## Tuned loss per size (seed mean)", "", common.table(points)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plots.plot_loss_vs_compute(axes[0], best, METRIC, fits=r["fits"])
    for fit in r["fits"].values():  # dotted: where the ratio reads the curves
        c = np.geomspace(best["flops"].min(), max(need, best["flops"].max()), 100)
        axes[0].plot(c, fit.predict(c), ls=":", lw=1, color="gray")
    plots.plot_lr_sensitivity(axes[1], ran[ran["params_active"] == ran["params_active"].max()],
                              METRIC)
    axes[1].set_title("largest size: loss against lr")
    fig.tight_layout()
    common.write(out, "scaling_ladder", {
        "compute_efficiency_ratio": {k: float(r[k][-1]) for k in ("value", "low", "high")},
        "ratio_at_smallest_compute": {k: float(r[k][0]) for k in ("value", "low", "high")},
        "at_flops": at.tolist(), "form": "L = A * C^-alpha (least squares in log-log)",
        "fitted_curves": fits, "n_boot": r["n_boot"], "baseline_extrapolation": extrapolation,
        "best_lr_at_edge": edges, "best_lr": lrs.to_dict("records"),
        "points": points.to_dict("records")}, md, fig)
    plt.close(fig)


WIDTHS, SEEDED = (48, 64, 80, 112), (48, 64)
STUDY = Study(
    description=__doc__.splitlines()[0],
    config="small",
    base=(*common.SMALL_RECIPE, f"data.global_batch_size={BATCH}", f"data.seq_len={SEQ}",
          "optimizer.tau=30"),
    axes=(sizes(WIDTHS, SEEDED), optimizer_lrs(LRS)),
    quick={"base": (*common.QUICK_RECIPE, "optimizer.tau=30"),
           "axes": (sizes((32, 48), (32,), 2, 0.01, 8, 32),
                    optimizer_lrs({"adamw": (0.01, 0.03), "muonclip": (0.01, 0.03)}))},
    analyze=analyze,
)
