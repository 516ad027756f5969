"""QK-Clip's threshold τ under Muon at a learning rate where vanilla Muon's logits grow.

    python -m experiments.sweep tau_ablation [--quick] [--workers 2]

Kimi K2 (arXiv 2507.20534 §2.1) clipped at τ = 100 and reports that τ = 30 on a
small MoE cost no quality. At lr 0.1 on `small` vanilla Muon's max logit runs to
~6× the spike study's τ = 30 within 160 steps, so every τ below that fires. Variants:
no clip; τ = 10, 30, 100; and monitor-only at τ = 30 (QK-Clip measures and counts
the heads it would clip, and rescales nothing: its loss must equal no clip's).
Reported per variant over seeds: final eval loss, max logit, the fraction of heads
ever clipped and the mean fraction clipped per step, and the last step that clipped.

Full: 5 variants × 2 seeds = 10 runs of the spike study's 160-step recipe.
``--quick``: the tiny preset at τ = 0.05 (its logits stay ~0.1 in 6 steps), 3 variants
× 2 seeds.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd

from experiments.sweeps import Study, zipped
from experiments.sweeps import _common as common

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

LR, MONITOR_TAU = 0.1, 30.0
VARIANTS = zipped({"optimizer.qk_clip": [False, True, True, True, True],
                   "optimizer.tau": [MONITOR_TAU, 10.0, 30.0, 100.0, MONITOR_TAU],
                   "optimizer.monitor_only": [False, False, False, False, True]})
QUICK_VARIANTS = zipped({"optimizer.qk_clip": [False, True, True],
                         "optimizer.tau": [0.05, 0.05, 0.05],
                         "optimizer.monitor_only": [False, False, True]})
BASELINE, CLAIM_TAU, NO_COST = "no clip", 30.0, 1.02  # the spike study's loss-ratio bound


def variant(row) -> str:
    if not row["optimizer.qk_clip"]:
        return BASELINE
    tau = f"τ={row['optimizer.tau']:g}"
    return f"monitor {tau}" if row["optimizer.monitor_only"] else tau


def clip_curves(out: str, df) -> pd.DataFrame:
    """Per member: the mean per-step fraction of heads clipped and the last step that
    clipped (monitor-only: would have clipped), from its metrics.jsonl."""
    rows = []
    for member in df["member"]:
        steps = common.member_rows(out, member)
        frac = [r.get("qk_clip/fraction_clipped", 0.0) for r in steps]
        fired = [r["step"] for r in steps if r.get("qk_clip/heads_clipped", 0) > 0]
        rows.append({"member": member, "mean_fraction_clipped": float(np.mean(frac or [np.nan])),
                     "last_clip_step": fired[-1] if fired else None})
    return df.merge(pd.DataFrame(rows), on="member")


def loss_ratios(df) -> dict:
    """{variant: final eval loss / no clip's, paired by seed}: the cost of clipping. A
    variant run without a final loss (diverged) where no clip has one scores inf (it
    cost everything); a seed whose no-clip run has none is left out of the pairing."""
    base = df[df["variant"] == BASELINE].set_index("train.seed")["final_eval_loss"]
    base = base[np.isfinite(base.astype(float))]
    out = {}
    for name, g in df[df["variant"] != BASELINE].groupby("variant", sort=False):
        loss = g.set_index("train.seed")["final_eval_loss"].astype(float).reindex(base.index)
        r = (loss / base).where(np.isfinite(loss), np.inf)
        out[name] = {**common.spread(r[np.isfinite(r)]), "n_failed": int(np.isinf(r).sum()),
                     "per_seed": {int(k): float(v) for k, v in r.items()}}
    return out


def per_variant(df) -> dict:
    """{variant: seed spreads of its loss, logit and clipping numbers}."""
    out = {}
    for name, g in df.groupby("variant", sort=False):
        out[name] = {k: common.spread(g[k]) for k in (
            "final_eval_loss", "max_logit", "median_max_logit_second_half",
            "fraction_heads_ever_clipped", "mean_fraction_clipped")}
        out[name]["last_clip_step"] = common.spread(g["last_clip_step"].astype(float))
    return out


def sentence(variants: dict, ratios: dict, tau: float) -> str:
    """The result in one sentence of numbers: each variant's max logit and clipping, and
    whether τ = ``tau`` stayed within the loss bound in every seed."""
    key = f"τ={tau:g}"
    parts = [f"At lr {LR:g}, vanilla Muon's max logit reached "
             f"{common.pm(variants[BASELINE]['max_logit'])}"]
    for name, v in variants.items():
        heads = common.pm(v["fraction_heads_ever_clipped"], 2)
        if name.startswith("monitor"):
            parts.append(f"{name} (nothing rescaled) reached {common.pm(v['max_logit'])} and "
                         f"would have clipped {heads} of heads")
        elif name != BASELINE:
            parts.append(f"{name} held it to {common.pm(v['max_logit'])}, clipping {heads} "
                         "of heads at least once")
    out = "; ".join(parts) + "."
    r = ratios.get(key)
    if r and r["per_seed"]:
        within = sum(v <= NO_COST for v in r["per_seed"].values())
        n = len(r["per_seed"])
        verdict = "costs no quality" if within == n else "costs quality"
        failed = f", {r['n_failed']} diverged" if r["n_failed"] else ""
        out += (f" {key} / no-clip final eval loss = {common.pm(r)}{failed}: within the "
                f"≤ {NO_COST:g} bound in {within} of {n} seeds, so {key} {verdict} "
                "(K2's finding at τ = 30).")
    return out


def analyze(df, out: str) -> None:
    """summary.json, report.md and report.png from the sweep's table and runs' curves."""
    ran = df[df["lr"].notna()].copy()
    ran["variant"] = ran.apply(variant, axis=1)
    ran = clip_curves(out, ran)
    variants, ratios = per_variant(ran), loss_ratios(ran)
    tau = CLAIM_TAU if f"τ={CLAIM_TAU:g}" in variants else float(ran["optimizer.tau"].iloc[0])
    table = pd.DataFrame([{"variant": n, "final eval loss": common.pm(v["final_eval_loss"]),
                           "loss / no clip": common.pm(ratios[n]) if n in ratios else "–",
                           "max logit": common.pm(v["max_logit"]),
                           "heads ever clipped": common.pm(v["fraction_heads_ever_clipped"], 2),
                           "mean fraction clipped per step":
                               common.pm(v["mean_fraction_clipped"], 2),
                           "last clip step": common.pm(v["last_clip_step"])}
                          for n, v in variants.items()])
    md = [sentence(variants, ratios, tau), "",
          "Spreads are min–max over seeds. Monitor-only counts the heads it *would* clip.", "",
          common.table(table)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, g in ran.groupby("variant", sort=False):
        for i, member in enumerate(g["member"]):
            rows = common.member_rows(out, member)
            steps = [r["step"] for r in rows]
            kw = {"label": name if i == 0 else None, "alpha": 0.8, "lw": 1}
            line, = axes[0].plot(steps, [r["train/loss"] for r in rows], **kw)
            axes[1].plot(steps, [r.get("attn/max_logit", np.nan) for r in rows],
                         color=line.get_color(), alpha=0.8, lw=1)
    axes[0].set(xlabel="step", ylabel="train loss", title=f"Muon, lr {LR:g}, each seed")
    axes[1].set(xlabel="step", ylabel="max attention logit", yscale="log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    common.write(out, "tau_ablation", {"lr": LR, "variants": variants,
                                       "loss_ratio_to_no_clip": ratios}, md, fig)
    plt.close(fig)


STUDY = Study(
    description=__doc__.splitlines()[0],
    config="small",
    base=(*common.SMALL_RECIPE, "optimizer.name=muon", f"optimizer.lr={LR}",
          *common.steps(160, 80)),
    axes=(VARIANTS, common.seeds(2)),
    quick={"config": "tiny", "base": (*common.QUICK_RECIPE, "optimizer.name=muon",
                                      f"optimizer.lr={LR}", *common.steps(6)),
           "axes": (QUICK_VARIANTS, common.seeds(2))},
    analyze=analyze,
)
