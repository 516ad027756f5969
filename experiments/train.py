"""Train one model: ``python -m experiments.train --config PRESET_OR_FILE --workdir DIR [k=v ...]``.

``--config`` is a preset name, a config JSON file, or a Hugging Face DeepseekV3 /
Kimi-K2 checkpoint directory: its architecture, initialised from its weights
(``train.init_from``; k2jax.hf). Overrides are dotted keys of
:class:`k2jax.config.Config`, e.g.
``model.n_routed_experts=32 optimizer.name=adamw optimizer.lr=3e-3 train.steps=500
data.source=text data.paths=corpus/*.txt mesh.fsdp=4``.

DIR receives ``config.json`` (the resolved config), ``metrics.jsonl``, TensorBoard
events under ``tb/`` and ``checkpoints/``; one run holds it at a time (k2jax.workdir_lock).
A non-empty DIR is refused unless ``--resume``, which continues with its ``config.json``
from its newest checkpoint that restores (corrupt ones are named and passed over), or
from step 0 if it has none yet. On resume only the keys in :data:`RESUMABLE` may change;
``train.steps`` only where the lr schedule at the resumed step stays the same (e.g. WSD's
stable phase), or with ``--stretch-schedule``.

Exit status: 0 done; 1 the run failed while training (non-finite stop, data error);
2 bad input, found before anything is written (config, paths, data, mesh, a busy
workdir, checkpoints that do not restore); 75 (``loop.PREEMPTED``) stopped by SIGTERM or
Ctrl-C after saving a checkpoint: resumable with ``--resume``.

Multi-host: set ``mesh.distributed=true`` (TPU pods: nothing else; CPU/GPU hosts:
``mesh.coordinator_address=HOST:PORT mesh.num_processes=N mesh.process_id=I``)
and start the same command on every host.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import warnings

import jax
from jax.experimental import multihost_utils

from k2jax import atomic, hf, loop, optimizer, overrides, preflight, presets, workdir_lock
from k2jax.checkpoint import CheckpointError, PreemptionGuard, quiet_save_threads
from k2jax.config import Config, ConfigError, TrainConfig, suggest
from k2jax.data import DataError, sources

RESUMABLE = (  # what --resume may change; everything else is the run's config.json
    "train.steps", "train.eval_every", "train.eval_batches", "train.log_every",
    "train.histogram_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.final_checkpoint", "train.max_nonfinite_steps", "train.peak_flops",
    "optimizer.lr", "optimizer.adam_lr_ratio")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def load_config(source: str, changes: list[str]) -> Config:
    """``--config``: a preset name, a config JSON file, or a Hugging Face checkpoint
    directory (its architecture, ``train.init_from`` = its weights); then overrides."""
    if source in presets.PRESETS or os.path.isfile(source):
        return presets.load(source, changes)
    if os.path.isdir(source):
        cfg = Config(model=hf.config_from_hf(source),
                     train=TrainConfig(init_from=os.path.abspath(source)))
        return overrides.apply(cfg, changes)
    raise ConfigError(f"--config {source!r} is neither a preset ({', '.join(presets.PRESETS)}), "
                      f"a config file nor a checkpoint directory{suggest(source, presets.PRESETS)}")


def resolve(args) -> Config:
    """The run's config, checked completely (including data paths) before any write."""
    cfg_path = os.path.join(args.workdir, "config.json")
    if args.resume:
        if args.config is not None:
            _fail(f"--resume continues with {cfg_path}; --config cannot be used with it")
        if not os.path.isfile(cfg_path):
            _fail(f"--resume: {cfg_path} does not exist (nothing to resume)")
        bad = [o for o in args.overrides if o.split("=", 1)[0].strip() not in RESUMABLE]
        if bad:
            _fail(f"--resume: {bad[0].split('=', 1)[0]!r} cannot change on resume (only "
                  f"{', '.join(RESUMABLE)})")
        cfg = presets.load(cfg_path, args.overrides)
    else:
        if args.config is None:
            _fail("--config is required (a preset name, a config JSON file or a checkpoint "
                  "directory)")
        if (why := atomic.occupied(args.workdir)) is not None:
            _fail(f"--workdir {why}; use --resume to continue it or choose a new directory")
        cfg = load_config(args.config, args.overrides)
    if cfg.train.init_from and not args.resume:
        try:
            hf.check(cfg.train.init_from, cfg.model)
        except ConfigError as e:  # hf.HFError is a ConfigError
            _fail(f"train.init_from: {e}")
    try:
        if cfg.data.source != "stdlib":
            sources.expand(cfg.data.paths)
        if cfg.data.source == "shards" and cfg.data.val_paths:
            sources.expand(cfg.data.val_paths)
    except DataError as e:
        _fail(str(e))
    return cfg


def write_config(cfg: Config, workdir: str, resume: bool) -> None:
    """``workdir/config.json``; on a resume that changed it, the old one is kept as
    ``config.before-resume-N.json``, never overwritten."""
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    text = json.dumps(dataclasses.asdict(cfg), indent=2)
    if resume and os.path.isfile(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return
        n = sum(1 for name in os.listdir(workdir) if name.startswith("config.before-resume"))
        shutil.copy2(path, os.path.join(workdir, f"config.before-resume-{n}.json"))
    atomic.write_text(path, text)  # a kill at any moment leaves a config.json


def check_resume(stored: Config, cfg: Config, start: int, stretch: bool) -> str:
    """What the restored step ``start`` allows: ``train.steps`` not below it, and a schedule
    horizon that moves only where the lr at ``start`` is unchanged, or with ``stretch``.
    Returns a note to print when the horizon moves ("" otherwise)."""
    if cfg.train.steps < start:
        raise ConfigError(f"train.steps={cfg.train.steps} is below the checkpoint's step "
                          f"{start}")
    before, after = (float(optimizer.learning_rate(c, peak=1.0)(start)) for c in (stored, cfg))
    if before != after and not stretch:
        raise ConfigError(
            f"train.steps {stored.train.steps} -> {cfg.train.steps} moves the "
            f"{cfg.optimizer.schedule} schedule's horizon: its lr at step {start} would jump "
            f"{before:.3g} -> {after:.3g} x optimizer.lr; pass --stretch-schedule to accept")
    if stored.train.steps == cfg.train.steps or cfg.optimizer.schedule == "constant":
        return ""
    return (f"note: train.steps {stored.train.steps} -> {cfg.train.steps}: the "
            f"{cfg.optimizer.schedule} lr schedule now ends at step {cfg.train.steps} (lr at "
            f"step {start}: {before:.3g} -> {after:.3g} x optimizer.lr)")


def _start(args, cfg: Config, stack: contextlib.ExitStack) -> loop.Session:
    """Lock the workdir and restore (resume) or initialise the run; writes nothing but the
    lock's note. Every failure here is bad input: one line, exit 2."""
    first = jax.process_index() == 0
    try:
        if args.resume and first:  # the workdir exists: hold it before reading checkpoints
            stack.enter_context(workdir_lock.hold(args.workdir))
        s = loop.setup(cfg, args.workdir, resume=args.resume, on_skip=lambda step, why: print(
            f"warning: checkpoint step {step} skipped: {why}", file=sys.stderr))
        if args.resume:
            stored = presets.load(os.path.join(args.workdir, "config.json"), [])
            if note := check_resume(stored, cfg, s.start, args.stretch_schedule):
                print(note, file=sys.stderr)
        elif first:
            stack.enter_context(workdir_lock.hold(args.workdir, create=True))
            if (why := atomic.occupied(args.workdir)) is not None:  # another run got here first
                raise ConfigError(f"--workdir {why}")
    except (ConfigError, DataError, CheckpointError, workdir_lock.Busy) as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"--workdir {args.workdir}: {e.strerror or e}")
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="preset name, config JSON file or HF checkpoint directory")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stretch-schedule", action="store_true",
                    help="on --resume, accept a train.steps that moves the lr schedule")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line
    try:
        cfg = resolve(args)
    except ConfigError as e:
        _fail(str(e))
    if cfg.mesh.distributed:
        m = cfg.mesh
        jax.distributed.initialize(m.coordinator_address, m.num_processes, m.process_id)
    try:
        preflight.check(cfg, args.workdir, resume=args.resume)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    loop.enable_compilation_cache()
    quiet_save_threads()
    try:
        return _train(args, cfg)
    except KeyboardInterrupt:  # a second Ctrl-C: no save
        print("error: interrupted (a second Ctrl-C); the workdir keeps its last checkpoint",
              file=sys.stderr)
        return 130


def _train(args, cfg: Config) -> int:
    with contextlib.ExitStack() as stack:
        guard = stack.enter_context(PreemptionGuard())  # Ctrl-C from here saves
        s = _start(args, cfg, stack)
        if guard.requested:  # signalled while setting up: stop before writing anything
            print("preempted before the first step: nothing written; run the same command "
                  "again", file=sys.stderr)
            return loop.PREEMPTED
        if s.start >= cfg.train.steps:
            print(f"nothing to do: {args.workdir} is at step {s.start} of {cfg.train.steps}")
            return 0
        multihost_utils.sync_global_devices("k2jax: config checked")  # no host writes before
        write_config(cfg, args.workdir, args.resume)
        try:
            summary = loop.train_loop(cfg, args.workdir, s, guard, progress=not args.no_progress)
        except (loop.TrainingError, DataError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return _report(args, summary)


def _report(args, summary: dict) -> int:
    if summary["preempted"]:
        print(f"preempted at step {summary['step']}: checkpoint step {summary['checkpoint']} "
              f"saved; continue with: python -m experiments.train --workdir {args.workdir} "
              f"--resume", file=sys.stderr)
        return loop.PREEMPTED
    if jax.process_index() == 0:
        last = summary["last"]
        print(f"done: step {summary['step']}, loss {last.get('train/loss', float('nan')):.4f}, "
              f"max logit {last.get('attn/max_logit', float('nan')):.1f}, "
              f"non-finite steps {summary['nonfinite_steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
