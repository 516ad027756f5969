"""What the studies share: recipes, axes, provenance, markdown tables, the output files.

A study's ``analyze(df, out)`` computes its numbers from the sweep table (and, where
it needs curves, the members' ``metrics.jsonl``), then calls :func:`write` to produce
``summary.json`` (numbers + provenance), ``report.md`` (generated from the numbers)
and ``report.png``. Provenance is read from the sweep directory itself, so a report
re-made from finished runs still names the command that trained them.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess

import jax
import numpy as np

from experiments.sweeps import zipped
from k2jax import atomic, sweeps

# The spike study's recipe (experiments/spike_study.py), shared by the studies on
# `small`: 16 x 128 tokens per step, warm-up then a stable phase then a linear decay
# to 5% over the last 60% (warmup-stable-decay), weight decay 0.1.
SMALL_RECIPE = (
    "data.global_batch_size=16", "data.seq_len=128", "optimizer.schedule=wsd",
    "optimizer.decay_fraction=0.6", "optimizer.final_lr_ratio=0.05",
    "optimizer.warmup_steps=20", "optimizer.weight_decay=0.1", "train.eval_batches=8",
    "train.checkpoint_every=100000", "train.final_checkpoint=false",
    "train.histogram_every=100000")
# the four optimizers of the issue: AdamW, vanilla Muon, MuonClip, AdamW + QK-Clip
OPTIMIZERS = zipped({"optimizer.name": ["adamw", "muon", "muon", "adamw"],
                     "optimizer.qk_clip": [False, False, True, True]})


def seeds(n: int):
    """``n`` replicates: seed k sets both the initialisation (train.seed) and the data
    order (data.seed), so a spread over seeds covers both sources of run-to-run noise."""
    return zipped({"train.seed": list(range(n)), "data.seed": list(range(n))})


def steps(n: int, eval_every: int | None = None) -> tuple[str, ...]:
    return (f"train.steps={n}", f"train.eval_every={eval_every or n}")


# a quick form's run: the tiny preset's width at a few steps, seconds per member
QUICK_RECIPE = (
    "data.global_batch_size=8", "data.seq_len=32", "optimizer.warmup_steps=2",
    "train.eval_batches=2", "train.checkpoint_every=100000", "train.final_checkpoint=false",
    "train.histogram_every=100000")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def meta(out: str) -> dict:
    """Command (the sweep's last invocation), commit (``-dirty`` with local changes),
    machine, versions, date, and time: ``wall_minutes`` from the first invocation to the
    last member's end, ``member_minutes`` the members' summed wall time."""
    with open(os.path.join(out, "sweep.jsonl")) as f:
        calls = [json.loads(line) for line in f if line.strip()]
    status_dir = os.path.join(out, "status")
    ends = [os.path.getmtime(os.path.join(status_dir, n)) for n in os.listdir(status_dir)]
    start = datetime.datetime.fromisoformat(calls[0]["date"]).timestamp()
    df = sweeps.load(out)
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {"command": calls[-1]["command"], "invocations": len(calls),
            "commit": commit + ("-dirty" if commit and dirty else ""),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "jax": jax.__version__,
            "wall_minutes": round((max(ends, default=start) - start) / 60, 1),
            "member_minutes": round(float(np.nansum(df["wall_s"].astype(float))) / 60, 1),
            "members": len(df), "members_ok": int((df["status"] == "ok").sum())}


def fmt(v, digits: int = 4) -> str:
    """A table cell: numbers to ``digits`` significant digits, missing as '–'."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, float | np.floating):
        return f"{float(v):.{digits}g}"
    return str(v)


def table(df, digits: int = 4) -> str:
    """A DataFrame as a markdown table."""
    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rows = ["| " + " | ".join(fmt(v, digits) for v in row) + " |"
            for row in df.itertuples(index=False)]
    return "\n".join([head, "|" + "---|" * len(df.columns), *rows])


def spread(values) -> dict:
    """{"mean", "min", "max", "std", "n"} of the finite values: a number with its seed spread."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return {"mean": None, "min": None, "max": None, "std": None, "n": 0}
    return {"mean": float(x.mean()), "min": float(x.min()), "max": float(x.max()),
            "std": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


def pm(s: dict, digits: int = 3) -> str:
    """'2.031 (2.02–2.04, 2 seeds)': a spread as text."""
    if not s["n"]:
        return "n/a"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}g} (1 seed)"
    return f"{s['mean']:.{digits}g} ({s['min']:.{digits}g}–{s['max']:.{digits}g}, {s['n']} seeds)"


def member_rows(out: str, member: str) -> list[dict]:
    """A member's per-step training records."""
    return sweeps.train_rows(os.path.join(out, member))


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write(out: str, name: str, summary: dict, markdown: list[str], fig) -> None:
    """``summary.json`` ({"study", "meta", **summary}; non-finite numbers as null),
    ``report.md`` (a provenance line, then ``markdown``) and ``report.png`` (``fig``)."""
    m = meta(out)
    atomic.write_text(os.path.join(out, "summary.json"), json.dumps(
        _json_safe({"study": name, "meta": m, **summary}), indent=2) + "\n")
    head = [f"# {name}", "", f"`{m['command']}` · commit {m['commit'] or '?'} · {m['date']} · "
            f"{m['machine']} · jax {m['jax']} · {m['members_ok']}/{m['members']} members ok · "
            f"{m['wall_minutes']} min wall ({m['member_minutes']} min summed over members)", ""]
    atomic.write_text(os.path.join(out, "report.md"),
                      "\n".join([*head, *markdown, "", "![report](report.png)", ""]))
    fig.savefig(os.path.join(out, "report.png"), dpi=100)
