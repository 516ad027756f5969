"""Train one model: ``python -m experiments.train --config PRESET_OR_FILE --workdir DIR [k=v ...]``.

``--config`` is a preset name, a config JSON file, or a Hugging Face DeepseekV3 /
Kimi-K2 checkpoint directory: its architecture, initialised from its weights
(``train.init_from``; k2jax.hf). Overrides are dotted keys of
:class:`k2jax.config.Config`, e.g.
``model.n_routed_experts=32 optimizer.name=adamw optimizer.lr=3e-3 train.steps=500
data.source=text data.paths=corpus/*.txt mesh.fsdp=4``.

DIR receives ``config.json`` (the resolved config), ``metrics.jsonl``, TensorBoard
events under ``tb/`` and ``checkpoints/``. A non-empty DIR is refused unless
``--resume``, which continues from its latest checkpoint with its ``config.json``
(only ``train.*`` keys may then be overridden, e.g. more steps). Every config,
path and workdir problem is reported in one line, with exit status 2, before
anything is written.

Multi-host: set ``mesh.distributed=true`` (TPU pods: nothing else; CPU/GPU hosts:
``mesh.coordinator_address=HOST:PORT mesh.num_processes=N mesh.process_id=I``)
and start the same command on every host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
from jax.experimental import multihost_utils

from k2jax import atomic, hf, loop, overrides, presets
from k2jax.config import Config, ConfigError, TrainConfig, suggest
from k2jax.data import DataError, sources


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
        if not os.path.isfile(cfg_path):
            _fail(f"--resume: {cfg_path} does not exist (nothing to resume)")
        bad = [o for o in args.overrides if not o.strip().startswith("train.")]
        if bad:
            _fail(f"--resume: only train.* keys may change on resume, got {bad[0]!r}")
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
        os.replace(path, os.path.join(workdir, f"config.before-resume-{n}.json"))
    atomic.write_text(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="preset name, config JSON file or HF checkpoint directory")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = resolve(args)
    except ConfigError as e:
        _fail(str(e))
    if cfg.mesh.distributed:
        m = cfg.mesh
        jax.distributed.initialize(m.coordinator_address, m.num_processes, m.process_id)
    loop.enable_compilation_cache()
    multihost_utils.sync_global_devices("k2jax: config checked")  # no host writes before
    write_config(cfg, args.workdir, args.resume)
    try:
        summary = loop.run(cfg, args.workdir, resume=args.resume,
                           progress=not args.no_progress)
    except (loop.TrainingError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        last = summary["last"]
        print(f"done: step {summary['step']}, loss {last.get('train/loss', float('nan')):.4f}, "
              f"max logit {last.get('attn/max_logit', float('nan')):.1f}, "
              f"non-finite steps {summary['nonfinite_steps']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
