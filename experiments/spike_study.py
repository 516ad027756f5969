"""Loss spikes and max logits: AdamW vs Muon vs MuonClip (and AdamW + QK-Clip).

    python -m experiments.spike_study [--workdir DIR] [--quick] [--seeds N] [key=value ...]

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

``--seeds N`` repeats every run with seeds 0..N-1 (``train.seed`` and ``data.seed``:
initialisation and batch order; within a seed every optimizer still shares both), and
each K2 claim (``claims``) is reported as its worst case over the seeds.

Outputs in DIR: one subdirectory per run (config.json, metrics.jsonl, tb/),
``summary.json`` (every run's numbers and the claims), ``report.md`` (the claims, a
paragraph generated from the numbers, a table of every run) and ``report.png`` (loss
and max-logit curves with the τ line; with several seeds, one thin line per seed).
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
               # unrolled layers: 3-10% faster steps than lax.scan at 4 layers on a 2-core CPU
               # (benchmarks/RESULTS.md, "The small step on CPU"); the same function
               base=["model.scan_layers=false", "data.global_batch_size=16", "data.seq_len=128",
                     "optimizer.schedule=wsd", "optimizer.decay_fraction=0.6",
                     "optimizer.final_lr_ratio=0.05", "optimizer.warmup_steps=20",
                     "optimizer.weight_decay=0.1", "train.eval_every=80",
                     "train.eval_batches=8", "train.checkpoint_every=100000",
                     "train.final_checkpoint=false",
                     "train.histogram_every=20"])
QUICK = dict(lrs=(0.1,), steps=60, optimizers=("adamw", "muon", "muonclip"))
# K2's claims at the top lr, judged on the worst seed (claims): (claim, optimizer whose
# run gives the value, "a/b" for the ratio of two, key, relation, threshold, in units of τ)
CLAIMS = (("vanilla Muon's max attention logit", "muon", "max_logit", "≥", 5, True),
          ("MuonClip's peak max logit", "muonclip", "max_logit", "≤", 2, True),
          ("MuonClip's second-half median max logit", "muonclip",
           "median_max_logit_second_half", "≤", 1.1, True),
          ("MuonClip / Muon final eval loss", "muonclip/muon", "final_eval_loss", "≤", 1.02,
           False),
          ("AdamW's max attention logit (this study's, not K2's)", "adamw", "max_logit", ">",
           5, True))


@dataclasses.dataclass(frozen=True)
class Run:
    label: str
    lr: float
    seed: int = 0
    seeded: bool = False  # one of several seeds: the name says which

    @property
    def name(self) -> str:
        return f"{self.label}_lr{self.lr:g}" + (f"_seed{self.seed}" if self.seeded else "")


def summarize(run_dir: str, run: Run, tau: float, clipped: bool) -> dict:
    """The per-run numbers of summary.json, from the run's metrics.jsonl."""
    evals = [r["eval/loss"] for r in metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if "eval/loss" in r]
    s = sweeps.curve_summary(sweeps.train_rows(run_dir), evals, tau)
    keys = ("steps", "final_train_loss", "final_eval_loss", "min_loss", "max_logit",
            "median_max_logit_second_half", "steps_max_logit_above_tau", "spikes", "diverged",
            "diverged_at", "plateau_from", "fraction_heads_ever_clipped", "last_clip_step")
    return {"run": run.name, "optimizer": run.label, "lr": run.lr, "seed": run.seed,
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


def _by_seed(summary: list[dict]) -> dict[int, dict[str, dict]]:
    """{seed: {optimizer: run}} of the runs at the top learning rate, seeds in order."""
    top = max(s["lr"] for s in summary)
    out: dict[int, dict[str, dict]] = {}
    for s in summary:
        if s["lr"] == top:
            out.setdefault(s.get("seed", 0), {})[s["optimizer"]] = s
    return dict(sorted(out.items()))


def _value(runs: dict, opt: str, key: str) -> float:
    """One seed's value: runs[opt][key], or for "a/b" the ratio (nan where b's is 0)."""
    v = [math.nan if runs[o][key] is None else float(runs[o][key]) for o in opt.split("/")]
    return v[0] if len(v) == 1 else v[0] / v[1] if v[1] else math.nan


def claims(summary: list[dict], tau: float) -> list[dict]:
    """K2's claims (CLAIMS) at the top lr: each evaluated per seed, pairing the optimizers
    of one seed, and judged on its worst seed (the least value for ≥ / >, the most for ≤; a
    nan is worst). A claim whose runs are missing is left out."""
    by_seed, out = _by_seed(summary) if summary else {}, []
    for name, opt, key, rel, k, in_tau in CLAIMS:
        seeds = [sd for sd, runs in by_seed.items() if all(o in runs for o in opt.split("/"))]
        if not seeds:
            continue
        values = [_value(by_seed[sd], opt, key) for sd in seeds]
        nan = [i for i, v in enumerate(values) if math.isnan(v)]
        i = nan[0] if nan else values.index((min if rel in "≥>" else max)(values))
        threshold, worst = k * tau if in_tau else float(k), values[i]
        holds = {"≥": worst >= threshold, ">": worst > threshold, "≤": worst <= threshold}[rel]
        out.append({"claim": name, "relation": rel, "threshold": threshold,
                    "threshold_text": f"{rel} {k:g}{'τ' if in_tau else ''}", "in_tau": in_tau,
                    "seeds": seeds, "values": values, "worst": worst, "worst_seed": seeds[i],
                    "n": len(seeds), "holds": bool(holds)})
    return out


def _num(vals: list[float], nd: int, tau: float | None = None, tnd: int = 1, worst=None,
         note: str = "") -> str:
    """One seed: '183.7 (6.1τ)'. Several: with ``worst`` (min or max) the worst case and the
    range, 'at least 170.2 (5.7τ; 170.2–183.7 over 3 seeds)'; without, the range."""
    if len(vals) > 1 and worst is None:
        return f"{min(vals):.{nd}f}–{max(vals):.{nd}f}"
    v = (worst or min)(vals)
    paren = [f"{v / tau:.{tnd}f}τ"] if tau else []
    word = ""
    if len(vals) > 1:
        paren.append(f"{min(vals):.{nd}f}–{max(vals):.{nd}f} over {len(vals)} seeds")
        word = "at least " if worst is min else "no more than "
    paren += [note] if note else []
    return word + f"{v:.{nd}f}" + (f" ({'; '.join(paren)})" if paren else "")


def _col(rows: list[dict], key: str) -> list:
    return [r[key] for r in rows]


def paragraph(summary: list[dict], tau: float) -> str:
    """What the numbers say, written from the numbers (no hand-written claims); with
    several seeds, the claims' numbers as their worst case and range over seeds."""
    top = max(s["lr"] for s in summary)
    by = _by_seed(summary)
    at = {o: [runs[o] for runs in by.values() if o in runs] for o in OPTIMIZERS}
    n = len(by)
    out = [f"At the highest learning rate ({top:g}), with τ = {tau:g}"
           + (f", {n} seeds each:" if n > 1 else ":")]
    if m := at["muon"]:
        out.append(f"vanilla Muon's max attention logit reached "
                   f"{_num(_col(m, 'max_logit'), 1, tau, 1, min)}, its final eval loss "
                   f"{_num(_col(m, 'final_eval_loss'), 3)}.")
    if c := at["muonclip"]:
        peak = _num(_col(c, "max_logit"), 1, tau, 2, max,
                    "the clip acts after the step that overshot")
        out.append(f"MuonClip peaked at {peak} with a second-half median of "
                   f"{_num(_col(c, 'median_max_logit_second_half'), 1, tau, 2, max)}, clipped "
                   f"{_num([100 * x for x in _col(c, 'fraction_heads_ever_clipped')], 0)}% of "
                   f"heads at least once, and ended at eval loss "
                   f"{_num(_col(c, 'final_eval_loss'), 3)}.")
    ratios = [r["muonclip"]["final_eval_loss"] / r["muon"]["final_eval_loss"]
              for r in by.values()
              if "muon" in r and "muonclip" in r and r["muon"]["final_eval_loss"] > 0]
    if ratios:
        out.append(f"MuonClip / Muon final eval loss{' = ' if n == 1 else ': '}"
                   f"{_num(ratios, 3, worst=max)}.")
    for label, name in (("adamw", "AdamW"), ("adamw+clip", "AdamW + QK-Clip")):
        if a := at[label]:
            worst = min if label == "adamw" else None  # AdamW's runaway is a claim
            out.append(f"{name}: max logit {_num(_col(a, 'max_logit'), 1, worst=worst)}, "
                       f"eval loss {_num(_col(a, 'final_eval_loss'), 3)}.")
    spikes = sum(s["spikes"] for s in summary)
    div = [s["run"] for s in summary if s["diverged"]]
    plat = [s["run"] for s in summary if s["plateau_from"] is not None]
    out.append(f"Across all {len(summary)} runs: {spikes} loss spikes (loss > 1.5× the median "
               f"of the previous 50 steps), divergence in {', '.join(div) or 'none'}, "
               f"plateaus in {', '.join(plat) or 'none'}.")
    return " ".join(out)


def _claims_table(cl: list[dict], tau: float) -> list[str]:
    def num(c, v):
        return f"{v:.1f} = {v / tau:.2f}τ" if c["in_tau"] else f"{v:.3f}"
    n = max((c["n"] for c in cl), default=0)
    lines = [f"| claim (top lr) | threshold | worst case over {n} seed{'s' * (n > 1)} | "
             f"per seed | holds |", "|---|---|---|---|---|"]
    for c in cl:
        per = ", ".join(f"{sd}: {v:.{1 if c['in_tau'] else 3}f}"
                        for sd, v in zip(c["seeds"], c["values"]))
        lines.append(f"| {c['claim']} | {c['threshold_text']} | {num(c, c['worst'])} "
                     f"(seed {c['worst_seed']}) | {per} | {_fmt(c['holds'])} |")
    return lines


def write_report(out: str, summary: list[dict], tau: float, meta: dict,
                 cl: list[dict] | None = None) -> None:
    cl = claims(summary, tau) if cl is None else cl
    cols = ["run", "final_train_loss", "final_eval_loss", "min_loss", "max_logit",
            "median_max_logit_second_half", "steps_max_logit_above_tau", "spikes", "diverged",
            "plateau_from", "fraction_heads_ever_clipped", "last_clip_step"]
    lines = [f"# Spike study: {meta['command']}", "",
             f"{meta['date']} · {meta['machine']} · {meta['minutes']:.1f} min", "",
             *(_claims_table(cl, tau) + [""] if cl else []),
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
    several = len({s.get("seed", 0) for s in summary}) > 1  # one thin line per seed
    style = dict(lw=0.7, alpha=0.6) if several else dict(lw=1)
    for j, label in enumerate(labels):
        named = set()
        for s in (s for s in summary if s["optimizer"] == label):
            rows = [r for r in metrics.read_jsonl(os.path.join(out, s["run"], "metrics.jsonl"))
                    if "train/loss" in r]
            steps = [r["step"] for r in rows]
            name = None if s["lr"] in named else f"lr {s['lr']:g}"
            named.add(s["lr"])
            axes[0, j].plot(steps, [r["train/loss"] for r in rows], color=colors[s["lr"]],
                            label=name, **style)
            axes[1, j].plot(steps, [r["attn/max_logit"] for r in rows], color=colors[s["lr"]],
                            **style)
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
            if loop.run(cfg, run_dir, progress=True)["preempted"]:  # SIGTERM / Ctrl-C
                print(f"stopped by a signal during {run.name} (checkpoint in {run_dir})",
                      file=sys.stderr)
                raise SystemExit(loop.PREEMPTED)
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
    ap.add_argument("--seeds", default="1", help="seeds per run (train.seed = data.seed = "
                    "0..N-1; default 1); the claims are judged on the worst seed")
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
    n = _seeds(args)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.workdir or os.path.join("runs", f"spike_study-{stamp}")
    if (why := atomic.occupied(out)) is not None:
        raise ConfigError(f"--workdir {why}; choose a new directory")
    base = [*spec["base"], f"train.steps={steps}", f"optimizer.tau={tau}"]
    runs, cfgs = [], {}
    for o in spec["optimizers"]:
        for lr in spec["lrs"]:
            for k in range(n):  # one seed: no seed overrides, today's configs and names
                seed = [f"train.seed={k}", f"data.seed={k}"] if n > 1 else []
                cfg = presets.load(args.preset, [*base, *seed, *args.overrides,
                                                 *OPTIMIZERS[o], f"optimizer.lr={lr}"])
                runs.append(Run(o, lr, cfg.train.seed, n > 1))
                cfgs[runs[-1].name] = cfg
    return runs, cfgs, out, tau, steps


def _seeds(args) -> int:
    try:
        n = int(args.seeds)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--seeds {args.seeds!r}: expected a whole number >= 1")
    given = {o.split("=", 1)[0].strip() for o in args.overrides} & {"train.seed", "data.seed"}
    if n > 1 and given:
        raise ConfigError(f"--seeds {n} sets train.seed and data.seed; drop the override "
                          f"{sorted(given)[0]}=")
    return n


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
            "minutes": (time.time() - t0) / 60, "tau": tau, "steps": steps,
            "seeds": len({r.seed for r in runs})}
    cl = claims(summary, tau)
    atomic.write_text(os.path.join(out, "summary.json"),
                      json.dumps({"meta": meta, "runs": summary, "claims": cl}, indent=2))
    write_report(out, summary, tau, meta, cl)
    print(paragraph(summary, tau))
    print(f"wrote {out}/summary.json, report.md, report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
