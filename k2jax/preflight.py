"""Everything about a run that can be known before its first step, checked before any write.

The training CLI (experiments/train.py) calls :func:`check` after the config is resolved
(and ``jax.distributed`` is up) and before it locks or writes the workdir: every problem
found here is one line and exit status 2, with the workdir untouched. Each check is
cheap: no compile, no parameters; the data it loads is what the run then reads
(k2jax.data.checks).
"""

from __future__ import annotations

import math
import os

import jax

from k2jax import sharding
from k2jax.config import Config, ConfigError
from k2jax.data import checks as data_checks


def check(cfg: Config, workdir: str, *, resume: bool) -> None:
    """Raise ConfigError or DataError (one line each) for the first problem found."""
    del resume  # a resumed run writes into its workdir too: the same checks
    check_workdir(workdir)
    check_positions(cfg)
    check_batch(cfg, make_mesh(cfg), jax.process_count())
    splits = ("train", "validation") if cfg.train.eval_batches else ("train",)
    data_checks.check(cfg.data, vocab_size=cfg.model.vocab_size, splits=splits)


def check_workdir(workdir: str) -> None:
    """The run can create (or, resuming, write into) ``workdir``: no file stands where
    a directory must be, and the nearest existing directory is writable."""
    if not workdir:
        raise ConfigError("--workdir must not be empty")
    path = existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir {workdir}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "not writable" if existing == path else f"cannot create it in {existing}"
        raise ConfigError(f"--workdir {workdir}: {why} (permission denied)")


def check_positions(cfg: Config) -> None:
    """A sequence longer than the model's positions runs RoPE past the range it was set
    up for (and YaRN's ramp past its design), with no error."""
    t, n = cfg.data.seq_len, cfg.model.max_position_embeddings
    if t > n:
        raise ConfigError(f"data.seq_len={t} is longer than model.max_position_embeddings={n}")


def make_mesh(cfg: Config):
    """The run's mesh, or a one-line error when the devices cannot form it."""
    m = cfg.mesh
    try:
        return sharding.make_mesh(data=m.data, fsdp=m.fsdp, expert=m.expert, tensor=m.tensor)
    except ValueError as e:
        raise ConfigError(f"{e} ({jax.default_backend()})") from None


def check_batch(cfg: Config, mesh, processes: int) -> None:
    """Each micro-batch splits over the ``data`` axis (pure data parallelism: a batch it
    does not divide is computed whole on every replica), and with several processes the
    batch's shards split over the processes (each feeds only its own rows,
    k2jax.data.pipeline)."""
    g, micro = cfg.data.global_batch_size, cfg.train.micro_batches
    rows, data = g // micro, mesh.shape["data"]
    if rows % data:
        raise ConfigError(f"data.global_batch_size={g}: {rows} rows per micro-batch "
                          f"(train.micro_batches={micro}) do not split over mesh.data={data}")
    spec = sharding.batch_sharding(mesh, size=g).spec[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    shards = math.prod(mesh.shape[a] for a in axes)
    if processes > 1 and shards % processes:
        raise ConfigError(f"data.global_batch_size={g} splits {shards} ways (mesh axes "
                          f"{axes}), not over the {processes} processes that each read "
                          f"their own rows")
