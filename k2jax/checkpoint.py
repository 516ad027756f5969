"""Checkpoints of a training run: the train state plus each process's data-iterator state.

One ``orbax.checkpoint.CheckpointManager`` per run directory with two items per step:

- ``state``: any pytree of jax arrays (params, optax states with ``MaskedNode`` holes,
  the int32 step, ``jax.random.key_data``), sharded or not. ``nnx.State`` nodes are stored
  as pure dicts (``nnx.to_pure_dict``) so the on-disk layout is plain nested names that
  survive NNX's Variable-representation changes and other tools can read; restore puts
  them back into ``nnx.State`` when the abstract state has one there.
- ``data``: grain's own orbax handler (``grain.checkpoint.CheckpointSave``), which writes
  ``process_{i}-of-{n}.json`` per process, because every host has its own iterator.

Saves are asynchronous: ``save`` returns once the arrays are copied to host, so the next
(donating) step may run while the write proceeds. Orbax waits for the previous save before
it starts the next one, so two saves never interleave; a step directory only appears
complete once committed, so a crash mid-write leaves no half checkpoint. Every process
must call ``save`` / ``restore`` (they are collective).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(ValueError):
    """No checkpoint, a checkpoint that does not fit the requested state, or a clobber."""


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _to_pure(tree):
    return jax.tree.map(lambda x: nnx.to_pure_dict(x) if _is_state(x) else x, tree,
                        is_leaf=_is_state)


def _from_pure(like, pure):
    """``pure`` (restored) back into ``like``'s container types, rebuilding ``nnx.State`` nodes."""
    outer = jax.tree.structure(like, is_leaf=_is_state)
    out = []
    for ref, sub in zip(jax.tree.leaves(like, is_leaf=_is_state), outer.flatten_up_to(pure)):
        if _is_state(ref):
            ref = jax.tree.map(lambda x: x, ref)  # a fresh State; the caller's stays untouched
            nnx.replace_by_pure_dict(ref, sub)
            sub = ref
        out.append(sub)
    return outer.unflatten(out)


def _abstract(x):
    """Target shape/dtype/sharding of one leaf: orbax needs a sharding to place shards."""
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _check_fits(stored, abstract, where: str) -> None:
    """Fail with the first mismatching path; orbax would cast dtypes silently and words its
    structure errors with source/target swapped."""
    have = ocp.tree.to_flat_dict(stored, sep="/")
    want = ocp.tree.to_flat_dict(abstract, sep="/")
    for path in sorted(set(have) ^ set(want)):
        side = "checkpoint" if path in have else "requested state"
        raise CheckpointError(f"{where}: '{path}' is only in the {side}")
    for path in sorted(want):
        h, w = have[path], want[path]
        if tuple(h.shape) != tuple(w.shape) or h.dtype != w.dtype:
            raise CheckpointError(f"{where}: '{path}' is {h.dtype}{list(h.shape)} in the "
                                  f"checkpoint but {w.dtype}{list(w.shape)} was requested")


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of one run under ``directory``."""

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise CheckpointError(f"save_every={save_every} and keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        # Handlers named up front so a fresh manager (a resumed run) can read metadata.
        handlers = {"state": ocp.StandardCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=handlers)

    def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
        """Save if ``step`` is a multiple of ``save_every``, if ``force`` (final step, SIGTERM)
        or at a multi-host preemption sync point; returns whether it saved.

        A step at or before the latest checkpoint is an error, never an overwrite: it means
        another run's checkpoints share this directory (or a restore from an older step).
        """
        if not (force or step % self.save_every == 0 or self.reached_preemption(step)):
            return False
        latest = self.latest_step()
        if latest is not None and step <= latest:
            raise CheckpointError(f"step {step} <= latest checkpoint step {latest} in "
                                  f"{self.directory}; refusing to overwrite (another run?)")
        items = {"state": ocp.args.StandardSave(_to_pure(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            return self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"{self.directory}: {e}") from None

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """(state, step) from ``step`` (default: the latest), shaped and sharded like
        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with ``.sharding``, or arrays);
        resharding to a different mesh is fine. ``data_iterator`` is set in place."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                  f"(have {steps})")
        where = f"{self.directory} step {step}"
        target = jax.tree.map(_abstract, _to_pure(abstract_state))
        stored = self._mngr.item_metadata(step)
        _check_fits(stored["state"], target, where)
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iterator is not None:
            if not os.path.isdir(os.path.join(self.directory, str(step), "data")):
                raise CheckpointError(f"{where} has no data-iterator state")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:
            raise CheckpointError(f"{where}: {str(e).splitlines()[0]}") from e
        return _from_pure(abstract_state, restored["state"]), step

    def reached_preemption(self, step: int) -> bool:
        """jax's multi-host preemption sync point: every process agrees on the same ``step``
        (a per-process SIGTERM flag may not). False unless ``jax.distributed`` is set up."""
        return self._mngr.reached_preemption(step)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def wait(self) -> None:
        """Block until in-flight async saves are committed (and raise their errors)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """While active, SIGTERM only sets ``requested``; the loop polls it, saves with
    ``force=True`` and exits cleanly. A handler that did real work could run mid-step (or
    mid-save) in the main thread. Multi-host runs should also poll
    ``Checkpointer.reached_preemption``, since hosts may see the signal at different steps."""

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self._requested = False
        self._previous: Any = None

    @property
    def requested(self) -> bool:
        return self._requested

    def _handle(self, signum, frame) -> None:
        self._requested = True

    def __enter__(self) -> PreemptionGuard:
        self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        previous = signal.SIG_DFL if self._previous is None else self._previous  # not set by Python
        signal.signal(self.signum, previous)
