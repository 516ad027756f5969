"""Sweep results: what one finished run says in numbers, and a sweep's table for notebooks.

A sweep (``python -m experiments.sweep``) is a directory of ordinary training runs
plus ``results.csv``, one row per member. :func:`run_summary` turns a run's
``metrics.jsonl`` into the row's numbers; :func:`load` reads the table back as a
pandas DataFrame with numbers, bools and NaN where they belong::

    from k2jax import analysis, sweeps
    df = sweeps.load("runs/my_sweep")
    analysis.seed_stats(df, ["optimizer", "lr"], "final_eval_loss")

Instability is part of every row, not only the final loss (which is all many
sweep tools rank by): max attention logit, spikes, divergence, plateau
(k2jax.metrics.curves), and the share of heads QK-Clip ever touched.
"""

from __future__ import annotations

import csv
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from k2jax import atomic, metrics, params
from k2jax.config import Config, from_file

RESULTS = "results.csv"
MEMBER_COLUMNS = ("member", "status", "error", "attempts", "overrides")
CONFIG_COLUMNS = ("optimizer", "lr", "seed", "params_total", "params_active")
METRIC_COLUMNS = (
    "steps", "initial_train_loss", "final_train_loss", "min_train_loss", "final_eval_loss",
    "max_logit", "median_max_logit_second_half", "fraction_heads_ever_clipped", "spikes",
    "diverged", "plateau_from", "tokens", "flops", "wall_s")


def optimizer_label(cfg: Config) -> str:
    """adamw | adamw+clip | muon | muonclip: the name analyses group runs by."""
    name, clip = cfg.optimizer.name, cfg.optimizer.qk_clip
    return {"muon": "muonclip" if clip else "muon"}.get(name, name + ("+clip" if clip else ""))


def train_rows(run_dir: str | os.PathLike) -> list[dict]:
    """The run's per-step training records; a step repeated by a resumed run keeps its
    last record (the one the run continued from)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    by_step = {r["step"]: r for r in metrics.read_jsonl(path) if "train/loss" in r}
    return [by_step[s] for s in sorted(by_step)]


def curve_summary(rows: list[dict], evals: list[float], tau: float | None = None) -> dict:
    """Loss and max-logit statistics of one run's training records (see METRIC_COLUMNS).

    Final train loss is the mean of the last 10 logged losses (one step is noise);
    the max logit's second-half median shows where logits *settle* (a clipped run
    overshoots τ once per firing, then sits at τ). ``tau``: also count steps above it.
    """
    losses = np.array([r["train/loss"] for r in rows], float)
    logits = np.array([r.get("attn/max_logit", math.nan) for r in rows], float)
    finite = losses[np.isfinite(losses)]
    second = logits[len(logits) // 2:]
    fired = [r["step"] for r in rows if r.get("qk_clip/heads_clipped", 0) > 0]
    diverged_at = metrics.detect_divergence(losses) if losses.size else None
    with np.errstate(all="ignore"):
        out = {
            "steps": len(rows),
            "initial_train_loss": float(losses[0]) if losses.size else math.nan,
            "final_train_loss": float(np.mean(losses[-10:])) if losses.size else math.nan,
            "min_train_loss": float(finite.min()) if finite.size else math.nan,
            "final_eval_loss": float(evals[-1]) if evals else math.nan,
            "max_logit": float(np.nanmax(logits)) if np.isfinite(logits).any() else math.nan,
            "median_max_logit_second_half": (float(np.nanmedian(second))
                                             if np.isfinite(second).any() else math.nan),
            "fraction_heads_ever_clipped": float(rows[-1].get(
                "qk_clip/fraction_ever_clipped", 0.0)) if rows else 0.0,
            "spikes": int(len(metrics.detect_spikes(losses))),
            "diverged": diverged_at is not None,
            "diverged_at": diverged_at,
            "plateau_from": metrics.detect_plateau(
                losses, window=min(100, len(losses) // 3 or 1)) if losses.size else None,
            "last_clip_step": int(fired[-1]) if fired else None,
        }
    if tau is not None:
        out["steps_max_logit_above_tau"] = int(np.sum(logits > tau))
    return out


def stopped_nonfinite(rows: list[dict], steps: int) -> bool:
    """Whether the run ended early on a non-finite step: the loop's stop after
    ``train.max_nonfinite_steps`` in a row, a divergence even when the loss itself
    stayed finite (the gradient did not)."""
    if not rows or rows[-1]["step"] >= steps:
        return False
    counts = [r.get("train/nonfinite_steps", 0) for r in rows]
    return counts[-1] > (counts[-2] if len(counts) > 1 else 0)


def run_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config and metric columns of one run directory (its config.json and
    metrics.jsonl); NaN where the run left nothing to measure (e.g. it never started)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    cfg = from_file(path)
    total, active = params.count(cfg.model)
    rows = train_rows(run_dir)
    evals = [r["eval/loss"] for r in (metrics.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
                                      if rows else []) if "eval/loss" in r]
    out = {"optimizer": optimizer_label(cfg), "lr": cfg.optimizer.lr, "seed": cfg.train.seed,
           "params_total": total, "params_active": active}
    summary = curve_summary(rows, evals)
    out.update({k: summary[k] for k in METRIC_COLUMNS if k in summary})
    out["diverged"] = summary["diverged"] or stopped_nonfinite(rows, cfg.train.steps)
    if out["diverged"] or not rows or rows[-1]["step"] < cfg.train.steps:
        # no final loss: a last eval from before a divergence would rank the run as fine
        out["final_train_loss"] = out["final_eval_loss"] = math.nan
    tokens = len(rows) * cfg.data.global_batch_size * cfg.data.seq_len
    out["tokens"] = tokens
    out["flops"] = tokens * metrics.flops_per_token(cfg.model, cfg.data.seq_len)
    return out


def write_results(path: str | os.PathLike, rows: list[dict], keys: list[str]) -> None:
    """``results.csv``: member columns, the swept ``keys``, config and metric columns."""
    columns = [*MEMBER_COLUMNS, *keys, *CONFIG_COLUMNS, *METRIC_COLUMNS]
    with atomic.file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore", restval="")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in columns})


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def load(sweep_dir: str | os.PathLike):
    """A sweep's ``results.csv`` as a pandas DataFrame, one row per member: integers as
    (nullable) Int64, other numbers as floats, true/false as (nullable) bools, other text
    as strings, and an empty cell (a member that never ran, a run without evaluation) as
    missing: NaN / NA / None. ``member``, ``status``, ``error`` (empty when none) and
    ``overrides`` stay text."""
    path = os.path.join(sweep_dir, RESULTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (is {sweep_dir} a sweep directory?)")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in df.columns:
        df[col] = _typed(df[col])
    return df


def _typed(col):
    if col.name in ("member", "status", "error", "overrides"):
        return col
    given = col != ""
    if given.any() and col[given].isin(["true", "false"]).all():
        flags = col.map({"true": True, "false": False, "": None})
        return flags.astype(bool if given.all() else "boolean")
    if given.any() and col[given].str.fullmatch(r"-?\d+").all():  # stay integers with gaps
        return pd.to_numeric(col.where(given, None)).astype("Int64")
    numbers = pd.to_numeric(col.where(given, None), errors="coerce")
    return numbers if numbers[given].notna().all() else col.where(given, None)
