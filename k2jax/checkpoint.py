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

import logging
import os
import signal
import sys
import threading
import traceback
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx


class CheckpointError(ValueError):
    """No checkpoint, a checkpoint that does not fit the requested state, or a clobber."""


class Incompatible(CheckpointError):
    """A readable checkpoint of another shape than the requested state (another config):
    not skipped as corrupt, since every older checkpoint would differ the same way."""


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
        raise Incompatible(f"{where}: '{path}' is only in the {side}")
    for path in sorted(want):
        h, w = have[path], want[path]
        if tuple(h.shape) != tuple(w.shape) or h.dtype != w.dtype:
            raise Incompatible(f"{where}: '{path}' is {h.dtype}{list(h.shape)} in the "
                               f"checkpoint but {w.dtype}{list(w.shape)} was requested")


_QUIET = []  # quiet_save_threads ran (it installs process-wide hooks once)


def quiet_save_threads() -> None:
    """Keep orbax's background saves from printing their failures (a full disk gave 25 to
    3,300 lines of tracebacks, racing with the exit): the same error reaches the training
    loop as a one-line CheckpointError (:meth:`Checkpointer.check`, ``wait``, ``save``).
    Silenced: uncaught exceptions in threads running orbax code, orbax's absl / asyncio
    error records that report a failure (with a traceback, or saying exception / failed),
    and tensorstore's callbacks into orbax's closed event loop (``sys.unraisablehook``).
    Main-thread errors and other records print."""
    if _QUIET:
        return
    _QUIET.append(True)

    def from_orbax(tb) -> bool:
        return any("orbax" in f.filename for f in traceback.extract_tb(tb))

    thread_hook, raw_hook = threading.excepthook, sys.unraisablehook
    threading.excepthook = lambda a: None if from_orbax(a.exc_traceback) else thread_hook(a)
    sys.unraisablehook = lambda u: None if (
        isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
        or from_orbax(u.exc_traceback)) else raw_hook(u)

    def keep(r: logging.LogRecord) -> bool:
        msg = r.getMessage()
        reports = r.exc_info is not None or any(
            w in msg.lower() for w in ("exception", "failed", "background", "traceback"))
        about = "orbax" in r.pathname or "orbax" in msg
        return r.levelno < logging.ERROR or not (reports and about)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(keep)


def _one_line(e: BaseException) -> str:
    """An exception as one short line (orbax and tensorstore errors run to many)."""
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    if len(line) > 300:  # the head says what failed, the tail why (e.g. "File too large")
        line = f"{line[:120]} ... {line[-160:]}"
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of one run under ``directory``."""

    def __init__(self, directory, *, save_every: int, keep: int, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise CheckpointError(f"save_every={save_every} and keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        # create=False: nothing is written before the first save (a run that fails its
        # checks, or a second run on a busy workdir, leaves no trace).
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False,
                                               enable_async_checkpointing=async_save)
        # Handlers named up front so a fresh manager (a resumed run) can read metadata.
        self._handlers = {"state": ocp.StandardCheckpointHandler(),
                          "data": grain.checkpoint.CheckpointHandler()}
        self._options = options
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_handlers=self._handlers)

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
        os.makedirs(self.directory, exist_ok=True)
        items = {"state": ocp.args.StandardSave(_to_pure(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            return self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
        except ocp.checkpoint_manager.StepAlreadyExistsError as e:
            raise CheckpointError(f"{self.directory}: {e}") from None
        except Exception as e:  # noqa: BLE001  (e.g. the disk is full: one line, not orbax's)
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: "
                                  f"{_one_line(e)}") from e

    def restore(self, abstract_state, data_iterator=None, step: int | None = None,
                on_skip=None):
        """(state, step), shaped and sharded like ``abstract_state`` (``jax.ShapeDtypeStruct``
        leaves with ``.sharding``, or arrays); resharding to a different mesh is fine.
        ``data_iterator`` is set in place.

        ``step`` None: the newest checkpoint that restores. A corrupt or incomplete one
        (truncated array file, emptied step directory, no ``state/``) is skipped, newest
        first, each with ``on_skip(step, why)`` (one line); none is deleted. Raises
        CheckpointError (one line) when there is no checkpoint or none restores, and
        :class:`Incompatible` at once for one that reads but has another shape."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"no checkpoint for step {step} in {self.directory} "
                                      f"(have {steps})")
            return self._restore(step, abstract_state, data_iterator), step
        why = {}
        for s in reversed(steps):
            try:
                return self._restore(s, abstract_state, data_iterator), s
            except (Incompatible, MemoryError):  # not corruption: skipping would lose work
                raise
            except Exception as e:  # noqa: BLE001  (any failure to read a step means: skip it)
                why[s] = _one_line(e)
                if on_skip is not None:
                    on_skip(s, why[s])
        newest = steps[-1]
        raise CheckpointError(f"none of the {len(steps)} checkpoints in {self.directory} "
                              f"restores (step {newest}: {why[newest]})")

    def _restore(self, step: int, abstract_state, data_iterator):
        where = f"{self.directory} step {step}"
        target = jax.tree.map(_abstract, _to_pure(abstract_state))
        stored = self._mngr.item_metadata(step)
        if stored is None or stored.get("state") is None:
            raise CheckpointError(f"{where} has no state")
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
        return _from_pure(abstract_state, restored["state"])

    def set_aside(self, after: int) -> list[str]:
        """Move every step directory newer than ``after`` (ones :meth:`restore` skipped)
        to ``<directory>.skipped/``, so the run can save those steps again; returns the new
        paths. Nothing is deleted."""
        self.wait()
        moved = []
        for s in self.all_steps():
            if s > after:
                dest = os.path.join(f"{self.directory}.skipped", str(s))
                k = 1
                while os.path.exists(dest):
                    dest = os.path.join(f"{self.directory}.skipped", f"{s}-{k}")
                    k += 1
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(os.path.join(self.directory, str(s)), dest)
                moved.append(dest)
        if moved:  # a fresh manager: orbax caches the steps it has seen
            self._mngr.close()
            self._mngr = ocp.CheckpointManager(self.directory, options=self._options,
                                               item_handlers=self._handlers)
        return moved

    def reached_preemption(self, step: int) -> bool:
        """jax's multi-host preemption sync point: every process agrees on the same ``step``
        (a per-process SIGTERM flag may not). False unless ``jax.distributed`` is set up."""
        return self._mngr.reached_preemption(step)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def check(self) -> None:
        """Raise a finished async save's error now (one line), not at the next save."""
        try:
            self._mngr.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: "
                                  f"{_one_line(e)}") from e

    def wait(self) -> None:
        """Block until in-flight async saves are committed; their errors (a full disk)
        surface here, or at the next save, as one-line CheckpointErrors."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"saving a checkpoint in {self.directory} failed: "
                                  f"{_one_line(e)}") from e

    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PreemptionGuard:
    """While active, SIGTERM and SIGINT (Ctrl-C) only set ``requested``; the loop polls it,
    saves with ``force=True`` and exits as preempted. A handler that did real work could run
    mid-step (or mid-save) in the main thread. A second Ctrl-C interrupts at once
    (KeyboardInterrupt). Multi-host runs should also poll
    ``Checkpointer.reached_preemption``, since hosts may see the signal at different steps."""

    def __init__(self, signums=(signal.SIGTERM, signal.SIGINT)):
        self.signums = tuple(signums)
        self.signal: int | None = None  # the first one received
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the save
        self.signal = self.signal or signum

    def __enter__(self) -> PreemptionGuard:
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
