"""The long horizon: does QK-Clip go idle at CPU scale, and when? MuonClip beside vanilla Muon.

    python -m experiments.sweep long_horizon [--quick] [--workers 2]

Kimi K2 (arXiv 2507.20534 §2.1; Su Jianlin, kexue.fm/archives/11126) saw the first
heads pass τ around step 7k and every head back under τ by ~70k of ~220k steps:
after ~30% of training the clip never fired again. Here MuonClip at lr 0.1 and
τ = 30 (the spike study's top lr, where the clip fires within the first 50 steps)
trains `small` for 2,000 steps beside vanilla Muon on the same seeds. The schedule
is the spike study's warmup-stable-decay: the peak lr until step 800, then a linear
decay to 5%. Reported: the fraction of heads clipped per step over time (in 20
windows), the last step that clipped, and both runs' max logit and loss.

Full: {muon, muonclip} × 2 seeds = 4 runs of 2,000 steps, 8 × 128 tokens per step.
``--quick``: tiny, τ = 0.05, 30 steps, 1 seed.
"""

from __future__ import annotations

import os

import matplotlib
import numpy as np
import pandas as pd

from experiments.sweeps import Study, grid
from experiments.sweeps import _common as common
from k2jax.config import from_file

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

WINDOWS = 20
BASE = ("optimizer.name=muon", "optimizer.lr=0.1", "data.global_batch_size=8")


def clip_timeline(rows: list[dict], total_steps: int, windows: int = WINDOWS) -> dict:
    """Per run: the first and last step that clipped, and the mean fraction of heads
    clipped per step in ``windows`` equal windows of ``total_steps`` (the configured
    length: runs of one study share the windows; a window the run never reached is NaN)."""
    steps = np.array([r["step"] for r in rows])
    frac = np.array([r.get("qk_clip/fraction_clipped", 0.0) for r in rows], float)
    fired = steps[np.array([r.get("qk_clip/heads_clipped", 0) > 0 for r in rows], bool)]
    edges = np.linspace(0, total_steps, windows + 1)
    means = [frac[(steps > a) & (steps <= b)] for a, b in zip(edges, edges[1:])]
    return {"first_clip_step": int(fired[0]) if fired.size else None,
            "last_clip_step": int(fired[-1]) if fired.size else None,
            "steps": int(steps[-1]) if steps.size else 0, "total_steps": total_steps,
            "window_end_step": [int(round(b)) for b in edges[1:]],
            "fraction_clipped": [float(m.mean()) if m.size else None for m in means]}


def per_run(df, out: str) -> pd.DataFrame:
    """One row per member: optimizer, seed and :func:`clip_timeline`."""
    rows = []
    for _, r in df.iterrows():
        total = from_file(os.path.join(out, r["member"], "config.json")).train.steps
        t = clip_timeline(common.member_rows(out, r["member"]), total)
        rows.append({"member": r["member"], "optimizer": r["optimizer"],
                     "seed": int(r["train.seed"]), **t})
    return pd.DataFrame(rows)


def sentence(runs: pd.DataFrame, df) -> str:
    """The result in one sentence of numbers: when each MuonClip seed last clipped, and
    both optimizers' max logit and final loss."""
    clip = runs[runs["optimizer"] == "muonclip"]
    total = int(runs["total_steps"].max())
    last = clip["last_clip_step"].astype(float)
    idle = [f"step {int(s)} ({100 * s / n:.0f}%)" for s, n in zip(last, clip["total_steps"])
            if np.isfinite(s)]
    never = int(last.isna().sum())
    by = {o: g for o, g in df.groupby("optimizer")}
    out = (f"Over {total} steps MuonClip last clipped at {', '.join(idle) or 'no step'}"
           f"{f' ({never} seed(s) never clipped)' if never else ''} over {len(clip)} "
           f"seed{'s' if len(clip) != 1 else ''}")
    if {"muon", "muonclip"} <= set(by):
        def num(opt, key):
            return common.pm(common.spread(by[opt][key]))
        out += (f"; vanilla Muon's max logit reached {num('muon', 'max_logit')} and MuonClip's "
                f"{num('muonclip', 'max_logit')}; final eval loss {num('muon', 'final_eval_loss')}"
                f" (Muon) vs {num('muonclip', 'final_eval_loss')} (MuonClip)")
    return out + (" (K2: idle after ~30% of training; here the lr decays from 40% of "
                  "training, which lowers the logits too).")


def analyze(df, out: str) -> None:
    """summary.json, report.md and report.png from the runs' per-step records."""
    ran = df[df["lr"].notna()]
    runs = per_run(ran, out)
    clip = runs[runs["optimizer"] == "muonclip"]
    last = clip["last_clip_step"].astype(float)
    summary = {
        "last_clip_step": common.spread(last),
        "last_clip_fraction_of_training": common.spread(last / clip["total_steps"]),
        "tau": from_file(os.path.join(out, ran["member"].iloc[0], "config.json")).optimizer.tau,
        "runs": runs.drop(columns="member").to_dict("records")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for _, r in runs.iterrows():
        rows = common.member_rows(out, r["member"])
        steps = [x["step"] for x in rows]
        lab = f"{r['optimizer']} seed {r['seed']}"
        axes[0].plot(steps, [x["train/loss"] for x in rows], lw=0.6, label=lab)
        axes[1].plot(steps, [x.get("attn/max_logit", np.nan) for x in rows], lw=0.6, label=lab)
        if r["optimizer"] == "muonclip":
            axes[2].plot(steps, [x.get("qk_clip/fraction_clipped", 0.0) for x in rows], lw=0.6,
                         label=lab)
    axes[1].axhline(summary["tau"], color="red", ls="--", lw=1, label="τ")
    axes[0].set(xlabel="step", ylabel="train loss")
    axes[1].set(xlabel="step", ylabel="max attention logit", yscale="log")
    axes[2].set(xlabel="step", ylabel="fraction of heads clipped")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    windows = pd.DataFrame({"window ends at step": clip["window_end_step"].iloc[0]} if len(clip)
                           else {})
    for _, r in clip.iterrows():
        windows[f"seed {r['seed']}"] = r["fraction_clipped"]
    md = [sentence(runs, ran), "",
          "## Fraction of heads clipped per step (mean over each window), MuonClip", "",
          common.table(windows, 3), "", "## Runs", "",
          common.table(runs[["optimizer", "seed", "steps", "first_clip_step",
                             "last_clip_step"]])]
    common.write(out, "long_horizon", summary, md, fig)
    plt.close(fig)


STUDY = Study(
    description=__doc__.splitlines()[0],
    config="small",
    base=(*common.SMALL_RECIPE, *BASE, "optimizer.tau=30", *common.steps(2000, 500)),
    axes=(grid("optimizer.qk_clip", [False, True]), common.seeds(2)),
    quick={"config": "tiny", "base": (*common.QUICK_RECIPE, *BASE, "optimizer.tau=0.05",
                                      *common.steps(30)),
           "axes": (grid("optimizer.qk_clip", [False, True]), common.seeds(1))},
    analyze=analyze,
)
