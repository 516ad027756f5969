"""The host-side training loop: data → jitted step → metrics, evaluation, checkpoints.

The same code runs on one CPU and on a multi-host TPU pod: every process
feeds its own rows of each global batch, process 0 writes metrics, orbax
writes checkpoints collectively. Metrics of step s are fetched after step
s+1 is dispatched, so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import numpy as np

from k2jax import checkpoint, data, metrics, sharding, train
from k2jax.config import Config


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps in a row); message says why."""


DEFAULT_COMPILATION_CACHE = "~/.cache/k2jax/xla"


def enable_compilation_cache(path: str = DEFAULT_COMPILATION_CACHE) -> str:
    """Turn on JAX's persistent compilation cache (the CLIs do): compiled steps are
    reused across the runs of a sweep and across invocations. A directory the user
    already chose (``JAX_COMPILATION_CACHE_DIR``) wins. Returns the directory used."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    return jax.config.jax_compilation_cache_dir


def make_mesh(cfg: Config):
    m = cfg.mesh
    return sharding.make_mesh(data=m.data, fsdp=m.fsdp, expert=m.expert, tensor=m.tensor)


def _scalars(m: dict[str, Any]) -> dict[str, float]:
    """Flatten one step's device metrics into named scalars (per layer where it applies)."""
    out: dict[str, float] = {}
    for k, v in m.items():
        v = np.asarray(v)
        if k == "attn/max_logits":
            out["attn/max_logit"] = float(v.max())
            for layer, row in enumerate(v.max(-1)):
                out[f"attn/max_logit/layer_{layer:02d}"] = float(row)
        elif k == "moe/load_imbalance":
            if v.size:
                out["moe/load_imbalance"] = float(v.max())
                for layer, x in enumerate(v):
                    out[f"moe/load_imbalance/layer_{layer:02d}"] = float(x)
        elif k == "qk_clip/heads_clipped_per_layer":
            out["qk_clip/heads_clipped"] = float(v.sum())
        elif v.ndim == 0:
            out[k] = float(v)
    return out


def evaluate(cfg: Config, eval_fn, state, mesh) -> float:
    """Mean cross-entropy over the first ``eval_batches`` validation batches (same every time)."""
    ds, _ = data.make_dataset(cfg.data, "validation")
    losses = []
    for i, batch in enumerate(ds):
        if i >= cfg.train.eval_batches:
            break
        losses.append(float(eval_fn(state.params, state.rest, train.global_batch(batch, mesh))))
    return float(np.mean(losses)) if losses else math.nan


def run(cfg: Config, workdir: str, *, resume: bool = False, grad_hook=None,
        stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train ``cfg`` in ``workdir``; returns a summary dict. ``stop_after`` ends the loop
    after that many steps (as a preemption would) with a checkpoint."""
    mesh = make_mesh(cfg)
    tx = train.build_optimizer(cfg)
    train_it, tok = data.make_iterator(cfg.data, "train")
    if tok.vocab_size > cfg.model.vocab_size:
        raise TrainingError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                            f"{tok.name} tokenizer's {tok.vocab_size}")
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                   save_every=cfg.train.checkpoint_every,
                                   keep=cfg.train.keep_checkpoints)
    start = 0
    if cfg.train.init_from and not resume:
        state = train.init_from_hf(state, shardings, cfg, mesh)
    if resume:
        state, start = ckpt.restore(train.abstract_state(cfg, tx, mesh), train_it)
        state = train.with_config_lr(state, cfg)
    step_fn = train.make_train_step(cfg, graphdef, tx, mesh, shardings, grad_hook=grad_hook)
    eval_fn = train.make_eval_step(cfg, graphdef, mesh, shardings)
    writer = metrics.MetricsWriter(workdir)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    fpt = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
    peak = metrics.peak_flops_per_device(override=cfg.train.peak_flops)
    end = cfg.train.steps if stop_after is None else min(cfg.train.steps, start + stop_after)
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)
    nonfinite_run, nonfinite_total, last = 0, 0, {}
    pending = None
    t_last = time.perf_counter()

    def finish(step: int, m_dev) -> dict[str, float]:
        nonlocal nonfinite_run, nonfinite_total, t_last
        now = time.perf_counter()
        m = jax.device_get(m_dev)
        s = _scalars(m)
        bad = int(s.pop("train/nonfinite"))
        nonfinite_run = nonfinite_run + 1 if bad else 0
        nonfinite_total += bad
        s["train/nonfinite_steps"] = float(nonfinite_total)
        dt = max(now - t_last, 1e-9)
        t_last = now
        s["perf/tokens_per_sec"] = tokens_per_step / dt
        s["perf/mfu"] = metrics.mfu(s["perf/tokens_per_sec"], fpt, peak, jax.device_count())
        writer.write_scalars(step, s)
        writer.write_array(step, "max_logits", m["attn/max_logits"])
        if step % cfg.train.histogram_every == 0 or step == 1:
            writer.write_histogram(step, "attn/max_logits_per_head", m["attn/max_logits"].ravel())
            writer.write_image(step, "attn/max_logits_layer_x_head", m["attn/max_logits"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{s['train/loss']:.3f}", maxlogit=f"{s['attn/max_logit']:.1f}",
                            tok_s=f"{s['perf/tokens_per_sec']:,.0f}")
        if nonfinite_run >= cfg.train.max_nonfinite_steps:
            raise TrainingError(
                f"{nonfinite_run} non-finite steps in a row (step {step}): stopping; the last "
                f"good checkpoint in {ckpt.directory} is intact")
        return s

    try:
        with checkpoint.PreemptionGuard() as guard:
            step = start
            for step in range(start + 1, end + 1):
                batch = train.global_batch(next(train_it), mesh)
                state, m_dev = step_fn(state, batch)
                if pending is not None:
                    last = finish(*pending)
                pending = (step, m_dev)
                if step % cfg.train.eval_every == 0 or step == cfg.train.steps:
                    last = finish(*pending)
                    pending = None
                    if cfg.train.eval_batches:
                        writer.write_scalars(step, {"eval/loss": evaluate(cfg, eval_fn, state,
                                                                          mesh)})
                at_end = step == end and (cfg.train.final_checkpoint or stop_after is not None)
                if step % cfg.train.checkpoint_every == 0 or at_end or guard.requested:
                    if pending is not None:  # never checkpoint past an unchecked step
                        last = finish(*pending)
                        pending = None
                    if nonfinite_run == 0 or guard.requested:  # keep the last good one last
                        ckpt.save(step, state, train_it, force=True)
                if guard.requested:
                    break
            if pending is not None:
                last = finish(*pending)
    finally:
        ckpt.wait()
        ckpt.close()
        writer.close()
        if bar is not None:
            bar.close()
    return {"step": step, "last": last, "nonfinite_steps": nonfinite_total,
            "config": dataclasses.asdict(cfg)}
