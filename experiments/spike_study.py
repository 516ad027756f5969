"""Loss spikes and max logits: AdamW vs Muon vs MuonClip (and AdamW + QK-Clip).

    python -m experiments.spike_study [--workdir DIR] [--quick] [key=value ...]

Kimi K2 (arXiv 2507.20534 §2.1, Fig. 2) reports that under vanilla Muon a MoE's
max attention logits passed 1000 and the loss spiked, while QK-Clip at τ = 100
pinned them at τ without hurting the loss. This study reproduces that contrast
on the ``small`` preset on 2 CPU cores: every run starts from the same
initialisation and reads the same batches; only the optimizer, its learning
rate and the clip differ.

Defaults, and why:
- lrs 0.01 / 0.03 / 0.1 for every optimizer: Muon's update is RMS-matched to
  AdamW's (0.2·√max(fan), Moonlight), so one grid serves both; 0.1 is where
  logits run away within a few hundred steps on this model (prototype
  measurements: Muon reached max logits 253, AdamW 2·10⁵).
- τ = 30, not K2's 100: a 128-wide model with 48-dim heads reaches logits in
  the tens, not hundreds, before instability, so τ sits at ~5× the healthy
  level as K2's 100 does; the K2 report itself used τ = 30 on a 0.5B/3B MoE.
- weight decay 0.1; 20 warm-up steps, the peak lr held for 40% of training, then a
  linear decay to 5% (warmup-stable-decay, like K2's constant-then-cosine recipe):
  the stable phase is where logits run away; the decay phase shows whether the
  clip holds them at τ once updates shrink. (With a constant lr to the end the
  clipped runs sit ~1.15τ: each step's max is read on a new batch, after one
  more update than the clip saw.)
- 16 × 128 tokens per step, 160 steps: 12 runs take ~13.5 minutes here. The
  peak lr is an optimizer-state hyperparameter (k2jax.optimizer.build_optimizer), so
  the runs of one optimizer compile to the same programs, and JAX's persistent
  compilation cache (k2jax.loop.enable_compilation_cache) compiles each once.
At this scale instability shows as a plateau or a divergence as often as a
spike, so all three are detected and reported (k2jax.metrics).

Outputs in DIR: one subdirectory per run (config.json, metrics.jsonl, tb/),
``summary.json``, ``report.md`` (a table and a paragraph generated from the
numbers) and ``report.png`` (loss and max-logit curves with the τ line).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time

import matplotlib
import numpy as np

from k2jax import atomic, loop, metrics, presets, sweeps
from k2jax.config import ConfigError

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

OPTIMIZERS = {  # label -> optimizer overrides
    "adamw": ["optimizer.name=adamw", "optimizer.qk_clip=false"],
    "adamw+clip": ["optimizer.name=adamw", "optimizer.qk_clip=true"],
    "muon": ["optimizer.name=muon", "optimizer.qk_clip=false"],
    "muonclip": ["optimizer.name=muon", "optimizer.qk_clip=true"],
}
DEFAULT = dict(lrs=(0.01, 0.03, 0.1), tau=30.0, steps=160,
               base=["data.global_batch_size=16", "data.seq_len=128",
                     "optimizer.schedule=wsd", "optimizer.decay_fraction=0.6",
                     "optimizer.final_lr_ratio=0.05", "optimizer.warmup_steps=20",
                     "optimizer.weight_decay=0.1", "train.eval_every=80",
                     "train.eval_batches=8", "train.checkpoint_every=100000",
                     "train.final_checkpoint=false",
                     "train.histogram_every=20"])
QUICK = dict(lrs=(0.1,), steps=60, optimizers=("adamw", "muon", "muonclip"))


@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    lr: float

    @property
    def name(self) -> str:
        return f"{self.label}_lr{self.lr:g}"


def summarize(run_dir: str, run: Run, tau: float, clipped: bool) -> dict:
    """The per-run numbers of summary.json, from the run's metrics.jsonl."""
    evals = [r["eval/loss"] for r in metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if "eval/loss" in r]
    s = sweeps.curve_summary(sweeps.train_rows(run_dir), evals, tau)
    keys = ("steps", "final_train_loss", "final_eval_loss", "min_loss", "max_logit",
            "median_max_logit_second_half", "steps_max_logit_above_tau", "spikes", "diverged",
            "diverged_at", "plateau_from", "fraction_heads_ever_clipped", "last_clip_step")
    return {"run": run.name, "optimizer": run.label, "lr": run.lr,
            "tau": tau if clipped else None,
            **{k: s["min_train_loss" if k == "min_loss" else k] for k in keys}}


def _fmt(x, nd=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.{nd}g}"
    return str(x)


def paragraph(summary: list[dict], tau: float) -> str:
    """What the numbers say, written from the numbers (no hand-written claims)."""
    top = max(s["lr"] for s in summary)
    at = {s["optimizer"]: s for s in summary if s["lr"] == top}
    out = [f"At the highest learning rate ({top:g}), with τ = {tau:g}:"]
    if "muon" in at:
        m = at["muon"]
        out.append(f"vanilla Muon's max attention logit reached {m['max_logit']:.1f} "
                   f"({m['max_logit'] / tau:.1f}τ), its final eval loss "
                   f"{m['final_eval_loss']:.3f}.")
    if "muonclip" in at:
        c = at["muonclip"]
        out.append(f"MuonClip peaked at {c['max_logit']:.1f} ({c['max_logit'] / tau:.2f}τ; "
                   f"the clip acts after the step that overshot) with a second-half median of "
                   f"{c['median_max_logit_second_half']:.1f} "
                   f"({c['median_max_logit_second_half'] / tau:.2f}τ), clipped "
                   f"{100 * c['fraction_heads_ever_clipped']:.0f}% of heads at least once, "
                   f"and ended at eval loss {c['final_eval_loss']:.3f}.")
        if "muon" in at and at["muon"]["final_eval_loss"] > 0:
            ratio = c["final_eval_loss"] / at["muon"]["final_eval_loss"]
            out.append(f"MuonClip / Muon final eval loss = {ratio:.3f}.")
    for label, name in (("adamw", "AdamW"), ("adamw+clip", "AdamW + QK-Clip")):
        if label in at:
            a = at[label]
            out.append(f"{name}: max logit {a['max_logit']:.1f}, eval loss "
                       f"{a['final_eval_loss']:.3f}.")
    spikes = sum(s["spikes"] for s in summary)
    div = [s["run"] for s in summary if s["diverged"]]
    plat = [s["run"] for s in summary if s["plateau_from"] is not None]
    out.append(f"Across all {len(summary)} runs: {spikes} loss spikes (loss > 1.5× the median "
               f"of the previous 50 steps), divergence in {', '.join(div) or 'none'}, "
               f"plateaus in {', '.join(plat) or 'none'}.")
    return " ".join(out)


def write_report(out: str, summary: list[dict], tau: float, meta: dict) -> None:
    cols = ["run", "final_train_loss", "final_eval_loss", "min_loss", "max_logit",
            "median_max_logit_second_half", "steps_max_logit_above_tau", "spikes", "diverged",
            "plateau_from", "fraction_heads_ever_clipped", "last_clip_step"]
    lines = [f"# Spike study: {meta['command']}", "",
             f"{meta['date']} · {meta['machine']} · {meta['minutes']:.1f} min", "",
             paragraph(summary, tau), "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(s[c]) for c in cols) + " |" for s in summary]
    lines += ["", "![loss and max logit](report.png)", ""]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    plot(out, summary, tau)


def plot(out: str, summary: list[dict], tau: float) -> None:
    labels = list(dict.fromkeys(s["optimizer"] for s in summary))
    lrs = sorted({s["lr"] for s in summary})
    colors = dict(zip(lrs, plt.cm.viridis(np.linspace(0.1, 0.85, len(lrs)))))
    fig, axes = plt.subplots(2, len(labels), figsize=(4 * len(labels), 6.5), squeeze=False,
                             sharex=True)
    for j, label in enumerate(labels):
        for s in (s for s in summary if s["optimizer"] == label):
            rows = [r for r in metrics.read_jsonl(os.path.join(out, s["run"], "metrics.jsonl"))
                    if "train/loss" in r]
            steps = [r["step"] for r in rows]
            axes[0, j].plot(steps, [r["train/loss"] for r in rows], color=colors[s["lr"]],
                            lw=1, label=f"lr {s['lr']:g}")
            axes[1, j].plot(steps, [r["attn/max_logit"] for r in rows], color=colors[s["lr"]],
                            lw=1)
        axes[0, j].set_title(label)
        axes[1, j].axhline(tau, color="red", ls="--", lw=1, label=f"τ = {tau:g}")
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
        axes[0, j].legend(fontsize=8)
    axes[0, 0].set_ylabel("train loss (nats/token)")
    axes[1, 0].set_ylabel("max attention logit")
    axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "report.png"), dpi=110)
    plt.close(fig)


def _train_all(runs: list[Run], cfgs: dict, out: str, tau: float) -> list[dict]:
    summary = []
    for i, run in enumerate(runs):
        cfg = cfgs[run.name]
        run_dir = os.path.join(out, run.name)
        os.makedirs(run_dir)
        atomic.write_text(os.path.join(run_dir, "config.json"),
                          json.dumps(dataclasses.asdict(cfg), indent=2))
        print(f"[{i + 1}/{len(runs)}] {run.name}", flush=True)
        try:
            loop.run(cfg, run_dir, progress=True)
        except loop.TrainingError as e:
            print(f"  stopped: {e}", flush=True)
        summary.append(summarize(run_dir, run, tau, cfg.optimizer.qk_clip))
    return summary


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", help="output directory (default: runs/spike_study-TIMESTAMP)")
    ap.add_argument("--quick", action="store_true", help="3 runs at the top lr, ~1.5 minutes")
    ap.add_argument("--lrs", help="comma-separated learning rates")
    ap.add_argument("--tau", type=float)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--optimizers", help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    ap.add_argument("--preset", default="small")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted config overrides applied to every run")
    return ap.parse_args(argv)


def plan(args) -> tuple[list[Run], dict, str, float, int]:
    """(runs, their configs, output directory, tau, steps) from the arguments, every
    problem raised as one ConfigError before anything is written."""
    spec = {**DEFAULT, "optimizers": tuple(OPTIMIZERS), **(QUICK if args.quick else {})}
    try:
        if args.lrs:
            spec["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    except ValueError:
        raise ConfigError(f"--lrs {args.lrs!r}: expected comma-separated numbers") from None
    if args.optimizers:
        spec["optimizers"] = tuple(x.strip() for x in args.optimizers.split(","))
    unknown = [o for o in spec["optimizers"] if o not in OPTIMIZERS]
    if unknown:
        raise ConfigError(f"--optimizers: unknown {unknown[0]!r} (have {', '.join(OPTIMIZERS)})")
    tau, steps = args.tau or spec["tau"], args.steps or spec["steps"]
    runs = [Run(o, lr) for o in spec["optimizers"] for lr in spec["lrs"]]
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.workdir or os.path.join("runs", f"spike_study-{stamp}")
    if (why := atomic.occupied(out)) is not None:
        raise ConfigError(f"--workdir {why}; choose a new directory")
    base = [*spec["base"], f"train.steps={steps}", f"optimizer.tau={tau}", *args.overrides]
    cfgs = {r.name: presets.load(args.preset, [*base, *OPTIMIZERS[r.label],
                                               f"optimizer.lr={r.lr}"]) for r in runs}
    return runs, cfgs, out, tau, steps


def main(argv=None) -> int:
    args = _args(argv)
    try:
        runs, cfgs, out, tau, steps = plan(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    loop.enable_compilation_cache()
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    summary = _train_all(runs, cfgs, out, tau)
    meta = {"command": " ".join(["python -m experiments.spike_study", *(argv or sys.argv[1:])]),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "minutes": (time.time() - t0) / 60, "tau": tau, "steps": steps}
    atomic.write_text(os.path.join(out, "summary.json"),
                      json.dumps({"meta": meta, "runs": summary}, indent=2))
    write_report(out, summary, tau, meta)
    print(paragraph(summary, tau))
    print(f"wrote {out}/summary.json, report.md, report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
