"""Newton–Schulz ablation: steps × coefficients × compute dtype, under MuonClip on `small`.

    python -m experiments.sweep ns_ablation [--quick] [--workers 2]

Muon's update is the polar factor U·Vᵀ of its momentum, approximated by a few
Newton–Schulz steps (optim/newton_schulz.py). Jordan's fixed quintic (5 steps,
Moonlight's setting) leaves singular values in ≈ [0.7, 1.2]; Polar Express (Amsel
et al. 2025, arXiv 2505.16932) converges faster; bfloat16 halves the matmul cost on
accelerators. Each setting is reported by:
- final eval loss over seeds (the training runs of the sweep);
- orthogonalisation error: how far the update NS makes from a real gradient G (every
  Muon matrix of the model at initialisation, on one training batch; expert stacks
  per expert) is from G's exact polar factor U·Vᵀ: the RMS distance per direction,
  and the singular values along G's directions (their spread around 1);
- time: the median train step of the runs, and NS alone on all of the model's Muon
  matrices (jitted, batched by shape, median of 20 calls) on this machine's CPU.

Full: 3 step counts × 2 coefficient sets × 2 dtypes × 2 seeds = 24 runs of 100 steps
(MuonClip, lr 0.01, τ = 30, the spike study's recipe). ``--quick``: tiny, 3 and 5 steps
× both coefficient sets in float32, 1 seed.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pandas as pd
from flax import nnx

from experiments.sweeps import Study, grid
from experiments.sweeps import _common as common
from experiments.train import load_config
from k2jax import data, optimizer, train
from k2jax.model import Transformer
from optim.newton_schulz import polar_factor
from optim.paths import flatten

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

KEYS = ("optimizer.ns_steps", "optimizer.ns_coeffs", "optimizer.ns_dtype")
BASE = ("optimizer.name=muon", "optimizer.qk_clip=true", "optimizer.tau=30",
        "optimizer.lr=0.01")


def gradient_matrices(config: str, base: list[str]) -> dict[tuple[int, int], np.ndarray]:
    """{(m, n): [count, m, n]}: every Muon-owned matrix of the model's gradient at
    initialisation on one training batch, grouped by shape (a stack per expert)."""
    cfg = load_config(config, base)
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=jax.random.key(cfg.train.seed)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    it, _ = data.make_iterator(cfg.data, "train")
    batch = {k: jnp.asarray(v) for k, v in next(it).items()}
    grads = jax.grad(lambda p: train.loss_fn(p, rest, batch, graphdef=graphdef, cfg=cfg,
                                             constrain=None)[0])(params)
    part, groups = optimizer.partition(cfg.optimizer), {}
    for path, g in flatten(grads).items():
        g = jnp.asarray(g)
        dims = part.assign(path, tuple(g.shape))
        if dims != "adamw":
            mats = np.asarray(dims.to_matrices(g), np.float32)
            groups.setdefault(mats.shape[1:], []).append(mats)
    return {shape: np.concatenate(ms) for shape, ms in groups.items()}


def polar_error(g: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, float, int]:
    """How far NS output ``o`` [b, m, n] is from the exact polar factor U_r·V_rᵀ of
    ``g`` on its numerical rank r (numpy's matrix_rank tolerance at float32): (σ, the
    singular values along g's directions, diag(U_rᵀ·o·V_r); the summed squared
    Frobenius distance ‖o − U_r·V_rᵀ‖²; r summed). A zero singular value of g has no
    direction to orthogonalise, so it is no error; a small one NS fails to lift is."""
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    keep = s > s[..., :1] * max(g.shape[-2:]) * np.finfo(np.float32).eps
    exact = (u * keep[..., None, :]) @ vt
    sigma = np.einsum("bmk,bmn,bkn->bk", u, o, vt)[keep]
    return sigma, float(np.sum((o - exact) ** 2)), int(keep.sum())


def ns_quality(mats: dict, steps: int, coeffs: str, dtype: str, repeats: int = 20) -> dict:
    """The NS update's distance from the exact polar factor over all matrices, and NS's
    median wall time (jitted, all shapes in one call)."""
    dt = jnp.dtype(dtype)
    fn = jax.jit(lambda ms: [polar_factor(m, steps=steps, coeffs=coeffs, dtype=dt)
                             for m in ms])
    inputs = [jnp.asarray(m) for m in mats.values()]
    outs = jax.block_until_ready(fn(inputs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(inputs))
        times.append(time.perf_counter() - t0)
    parts = [polar_error(np.asarray(g, np.float64), np.asarray(o, np.float64))
             for g, o in zip(mats.values(), outs)]
    sigma = np.concatenate([p[0] for p in parts])
    rank = sum(p[2] for p in parts)
    return {"sigma_min": float(sigma.min()), "sigma_max": float(sigma.max()),
            "polar_error": float(np.sqrt(sum(p[1] for p in parts) / rank)),
            "directions": rank, "ns_ms": 1e3 * float(np.median(times))}


def step_seconds(out: str, member: str) -> float:
    """Median train-step wall time from the run's tokens/s (first 10 steps skipped:
    compilation; half of a shorter run), in seconds."""
    rows = common.member_rows(out, member)
    rows = rows[min(10, len(rows) // 2):]
    tps = [r["perf/tokens_per_sec"] for r in rows if r.get("perf/tokens_per_sec")]
    return float(np.median(1.0 / np.asarray(tps))) if tps else float("nan")


def settings_table(df, out: str, mats: dict) -> pd.DataFrame:
    """One row per NS setting: loss over seeds, step time, NS quality and time."""
    rows = []
    for values, g in df.groupby(list(KEYS), sort=True):
        steps, coeffs, dtype = values
        tokens = float(g["tokens"].iloc[0]) / max(int(g["steps"].iloc[0]), 1)
        rows.append({"ns_steps": int(steps), "ns_coeffs": coeffs, "ns_dtype": dtype,
                     "final_eval_loss": common.spread(g["final_eval_loss"]),
                     "step_s": float(np.median([step_seconds(out, m) for m in g["member"]]))
                     * tokens,
                     **ns_quality(mats, int(steps), coeffs, dtype)})
    return pd.DataFrame(rows)


def sentence(t: pd.DataFrame, n_seeds: int) -> str:
    """The result in one sentence of numbers: the loss range over settings, the best
    setting (among those whose every seed finished), the default's, the error range."""
    ref = t[(t["ns_steps"] == 5) & (t["ns_coeffs"] == "jordan") & (t["ns_dtype"] == "float32")]
    complete = t["final_eval_loss"].map(lambda s: s["n"] == n_seeds and s["mean"] is not None)
    best = t[complete].loc[t.loc[complete, "final_eval_loss"].map(lambda s: s["mean"]).idxmin()]
    loss = t["final_eval_loss"].map(lambda s: s["mean"] or np.nan)
    out = (f"Over {len(t)} settings the final eval loss spans {np.nanmin(loss):.3f}–"
           f"{np.nanmax(loss):.3f}; the best is {best['ns_steps']} {best['ns_coeffs']} "
           f"{best['ns_dtype']} at {common.pm(best['final_eval_loss'])}")
    if len(ref):
        r = ref.iloc[0]
        out += (f", the default (5 jordan float32) {common.pm(r['final_eval_loss'])} with σ in "
                f"[{r['sigma_min']:.2f}, {r['sigma_max']:.2f}]")
    err = t.set_index(["ns_steps", "ns_coeffs", "ns_dtype"])["polar_error"]
    name = lambda key: " ".join(map(str, key))  # noqa: E731
    return out + (f"; the RMS distance from the exact polar factor ranges {err.min():.3f} "
                  f"({name(err.idxmin())}) to {err.max():.3f} ({name(err.idxmax())}).")


def analyze(df, out: str) -> None:
    """summary.json, report.md and report.png: the runs' losses and times, and NS's
    error and cost measured here on a real gradient."""
    ran = df[df["lr"].notna()]
    # the model, data and recipe of the runs (any member's config), at seed 0
    first = os.path.join(out, ran["member"].iloc[0], "config.json")
    mats = gradient_matrices(first, ["train.seed=0", "data.seed=0"])
    t = settings_table(ran, out, mats)
    shown = t.assign(final_eval_loss=t["final_eval_loss"].map(common.pm))
    md = [sentence(t, int(ran["train.seed"].nunique())), "",
          f"G: every Muon matrix of the gradient at initialisation (seed 0, one batch), "
          f"{t['directions'].iloc[0]} directions (singular vectors) in all. `polar_error`: "
          "RMS over those directions of ‖NS(G) − U·Vᵀ‖ (0: the exact polar factor); "
          "`sigma_min`/`sigma_max`: NS(G)'s singular values along G's directions (1: exact); "
          "`step_s`: median train step; `ns_ms`: NS alone on all those matrices (jitted, "
          "median of 20); loss spreads min–max over seeds. Times are this CPU's, with "
          "members running two at a time, and XLA's CPU bfloat16 matmuls are no faster "
          "than float32 ones: read them as relative costs of steps, not of dtypes, which "
          "pay off on accelerators.", "", common.table(shown)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (coeffs, dtype), g in t.groupby(["ns_coeffs", "ns_dtype"]):
        lab = f"{coeffs} {dtype}"
        axes[0].plot(g["ns_steps"], g["polar_error"], "o-", label=lab)
        mean = g["final_eval_loss"].map(lambda s: s["mean"] or np.nan)
        lo = mean - g["final_eval_loss"].map(lambda s: s["min"] or np.nan)
        hi = g["final_eval_loss"].map(lambda s: s["max"] or np.nan) - mean
        axes[1].errorbar(g["ns_steps"], mean, yerr=np.nan_to_num([lo, hi]), marker="o",
                         capsize=3, label=lab)
    axes[0].set(xlabel="NS steps", ylabel="RMS distance from the polar factor", yscale="log")
    axes[1].set(xlabel="NS steps", ylabel="final eval loss (seed mean, min–max)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.write(out, "ns_ablation", {"settings": t.to_dict("records")}, md, fig)
    plt.close(fig)


STUDY = Study(
    description=__doc__.splitlines()[0],
    config="small",
    base=(*common.SMALL_RECIPE, *BASE, *common.steps(100)),
    axes=(grid(KEYS[0], [3, 5, 7]), grid(KEYS[1], ["jordan", "polar_express"]),
          grid(KEYS[2], ["float32", "bfloat16"]), common.seeds(2)),
    quick={"config": "tiny", "base": (*common.QUICK_RECIPE, *BASE, *common.steps(6)),
           "axes": (grid(KEYS[0], [3, 5]), grid(KEYS[1], ["jordan", "polar_express"]),
                    grid(KEYS[2], ["float32"]), common.seeds(1))},
    analyze=analyze,
)
