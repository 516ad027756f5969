"""The host-side training loop: data → jitted step → metrics, evaluation, checkpoints.

The same code runs on one CPU and on a multi-host TPU pod: every process feeds
its own rows of each global batch, process 0 writes metrics, orbax writes
checkpoints collectively. :func:`run` reads top-down: :func:`setup` builds
everything a run needs, then each step is dispatched and the :class:`Reporter`
logs the *previous* step's metrics, so the host never stalls the device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from k2jax import checkpoint, data, metrics, sharding, train, workdir_lock
from k2jax import optimizer as optimizer_lib
from k2jax.config import Config

PREEMPTED = 75  # exit status of a run stopped by SIGTERM / SIGINT after its checkpoint
# was saved: resumable (sysexits' EX_TEMPFAIL, "try again later").


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


@dataclasses.dataclass
class Session:
    """Everything one run needs, built by :func:`setup`."""

    mesh: Any
    train_it: Any  # checkpointable grain iterator over this process's rows
    state: train.TrainState
    start: int  # last step already taken (0, or the restored checkpoint's)
    step_fn: Any
    eval_fn: Any
    ckpt: checkpoint.Checkpointer
    resume: bool = False  # continuing a workdir (from `start`, 0 if it had no checkpoint)


def setup(cfg: Config, workdir: str, *, resume: bool = False, grad_hook=None,
          on_skip=None) -> Session:
    """Mesh, optimizer, data, state (fresh, from a Hugging Face checkpoint, or restored
    with the config's lr) and the step and eval functions. Writes nothing.

    On ``resume`` the state is the newest checkpoint that restores (``on_skip(step, why)``
    for each corrupt one passed over; CheckpointError when none does), or a fresh one
    from step 0 when the workdir has no checkpoint yet (a run that died before its
    first save): a workdir with a config can always be resumed."""
    mesh = make_mesh(cfg)
    tx = optimizer_lib.build_optimizer(cfg, mesh)
    train_it, _ = data.make_iterator(cfg.data, "train")
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                   save_every=cfg.train.checkpoint_every,
                                   keep=cfg.train.keep_checkpoints)
    start, restore = 0, resume and bool(ckpt.all_steps())
    if cfg.train.init_from and not restore:
        state = train.init_from_hf(state, shardings, cfg, mesh)
    if restore:
        state, start = ckpt.restore(train.abstract_state(cfg, tx, mesh), train_it,
                                    on_skip=on_skip)
        state = state._replace(opt_state=optimizer_lib.with_config_lr(state.opt_state, cfg))
    return Session(mesh, train_it, state, start,
                   train.make_train_step(cfg, graphdef, tx, mesh, shardings, grad_hook),
                   train.make_eval_step(cfg, graphdef, mesh, shardings), ckpt, resume)


def _scalars(m: dict[str, Any]) -> dict[str, float]:
    """Flatten one step's device metrics into named scalars (per layer where it applies)."""
    out: dict[str, float] = {}
    for k, v in m.items():
        v = np.asarray(v)
        if k == "attn/max_logits":
            out["attn/max_logit"] = float(v.max())
            for layer, row in enumerate(v.max(-1)):
                out[metrics.layer_tag("attn/max_logit", layer)] = float(row)
        elif k == "moe/load_imbalance":
            if v.size:
                out["moe/load_imbalance"] = float(v.max())
                for layer, x in enumerate(v):
                    out[metrics.layer_tag("moe/load_imbalance", layer)] = float(x)
        elif k == "qk_clip/heads_clipped_per_layer":
            out["qk_clip/heads_clipped"] = float(v.sum())
        elif v.ndim == 0:
            out[k] = float(v)
    return out


class Reporter:
    """Owns what the host does with each step's metrics: the step still in flight, the
    non-finite counters, the writers (metrics.jsonl, TensorBoard) and the progress bar.

    :meth:`push` hands over a step's device metrics and logs the one before it, whose
    values are ready by then; :meth:`flush` logs the one in flight (before an eval or a
    checkpoint, so nothing is saved past an unchecked step)."""

    def __init__(self, cfg: Config, workdir: str, start: int, *, progress: bool,
                 ckpt: checkpoint.Checkpointer, resume: bool = False):
        self.cfg, self.ckpt = cfg, ckpt
        self.writer = metrics.MetricsWriter(workdir, resume_from=start if resume else None)
        if self.writer.dropped:
            print(f"resume: {self.writer.dropped} metric records after step {start} dropped "
                  f"(those steps run again from the checkpoint)", file=sys.stderr)
        self.tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        self.flops_per_token = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = metrics.peak_flops_per_device(override=cfg.train.peak_flops)
        self.bar = (tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True)
                    if progress and jax.process_index() == 0 else None)
        self.pending: tuple[int, Any] | None = None
        self.nonfinite_run = self.nonfinite_total = 0
        self.last: dict[str, float] = {}
        self.t_last = time.perf_counter()

    def push(self, step: int, m_dev) -> None:
        self.flush()
        self.pending = (step, m_dev)

    def flush(self) -> None:
        if self.pending is not None:
            step, m_dev = self.pending
            self.pending = None
            now = time.perf_counter()  # the step's wall time ends when the host asks for it
            self.last = self._log(step, jax.device_get(m_dev), now)

    def write_eval(self, step: int, loss: float) -> None:
        self.writer.write_scalars(step, {"eval/loss": loss})

    def _log(self, step: int, m: dict, now: float) -> dict[str, float]:
        s = _scalars(m)
        bad = int(s.pop("train/nonfinite"))
        self.nonfinite_run = self.nonfinite_run + 1 if bad else 0
        self.nonfinite_total += bad
        s["train/nonfinite_steps"] = float(self.nonfinite_total)
        s["perf/tokens_per_sec"] = self.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last = now
        s["perf/mfu"] = metrics.mfu(s["perf/tokens_per_sec"], self.flops_per_token, self.peak,
                                    jax.device_count())
        self._write(step, s, m["attn/max_logits"])
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            self.ckpt.wait()
            last = self.ckpt.latest_step()
            kept = ("no checkpoint was written" if last is None else
                    f"the last good checkpoint is step {last} in {self.ckpt.directory}")
            raise TrainingError(f"{self.nonfinite_run} non-finite steps in a row (step {step}): "
                                f"stopping; {kept}")
        return s

    def _write(self, step: int, s: dict[str, float], max_logits_LH) -> None:
        self.writer.write_scalars(step, s)
        self.writer.write_array(step, "max_logits", max_logits_LH)
        if step % self.cfg.train.histogram_every == 0 or step == 1:
            self.writer.write_histogram(step, "attn/max_logits_per_head", max_logits_LH.ravel())
            self.writer.write_image(step, "attn/max_logits_layer_x_head", max_logits_LH)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{s['train/loss']:.3f}",
                                 maxlogit=f"{s['attn/max_logit']:.1f}",
                                 tok_s=f"{s['perf/tokens_per_sec']:,.0f}")

    def close(self) -> None:
        self.writer.close()
        if self.bar is not None:
            self.bar.close()


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
    """Train ``cfg`` in ``workdir`` (locked for the run, k2jax.workdir_lock); returns a summary
    dict. ``stop_after`` ends the loop after that many steps (as a preemption would) with
    a checkpoint. SIGTERM / SIGINT do the same: the summary then says ``preempted``."""
    with checkpoint.PreemptionGuard() as guard:
        s = setup(cfg, workdir, resume=resume, grad_hook=grad_hook)
        with workdir_lock.hold(workdir, create=True):
            return train_loop(cfg, workdir, s, guard, stop_after=stop_after,
                              progress=progress)


def train_loop(cfg: Config, workdir: str, s: Session, guard: checkpoint.PreemptionGuard, *,
               stop_after: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Steps ``s.start + 1 ..`` to ``train.steps`` (or ``stop_after`` more, or a signal on
    ``guard``), each logged once; checkpoints on schedule, at the end and when stopped.
    The caller holds the workdir's lock: this is where writing starts."""
    t = cfg.train
    end = t.steps if stop_after is None else min(t.steps, s.start + stop_after)
    if s.resume and jax.process_index() == 0:
        for path in s.ckpt.set_aside(after=s.start):
            print(f"resume: checkpoint newer than step {s.start} moved to {path}",
                  file=sys.stderr)
    reporter = Reporter(cfg, workdir, s.start, progress=progress, ckpt=s.ckpt, resume=s.resume)
    state, step = s.state, s.start
    try:
        for step in range(s.start + 1, end + 1):
            state, m_dev = s.step_fn(state, train.global_batch(next(s.train_it), s.mesh))
            reporter.push(step, m_dev)
            s.ckpt.check()  # a failed async save (a full disk) stops the run here
            if step % t.eval_every == 0 or step == t.steps:
                reporter.flush()
                if t.eval_batches:
                    reporter.write_eval(step, evaluate(cfg, s.eval_fn, state, s.mesh))
            at_end = step == end and (t.final_checkpoint or stop_after is not None)
            stop = guard.requested  # read once: a signal between two reads would skip the save
            if step % t.checkpoint_every == 0 or at_end or stop:
                reporter.flush()
                if reporter.nonfinite_run == 0 or stop:  # keep the last good one
                    s.ckpt.save(step, state, s.train_it, force=True)
            if stop:
                break
        reporter.flush()
    finally:
        try:
            s.ckpt.wait()  # an async save's error (a full disk) surfaces here
        finally:
            s.ckpt.close()
            reporter.close()
    return {"step": step, "last": reporter.last, "nonfinite_steps": reporter.nonfinite_total,
            "preempted": guard.requested and step < t.steps and s.ckpt.latest_step() == step,
            "checkpoint": s.ckpt.latest_step(), "config": dataclasses.asdict(cfg)}
