"""One sweep member: a run of ``experiments.train`` with one retry, and its status record.

The same :func:`execute` runs a member on this machine (a thread of
``experiments.sweep``) and on a Ray worker (``experiments.sweep_ray``), so it lives
in a module of its own that both import (Ray ships it by reference). It never
raises: whatever goes wrong is recorded as this member's one-line error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import threading
import time

from experiments import sweeps as studies
from k2jax import atomic, sweeps
from k2jax.config import from_file

PREEMPTED = 75  # experiments.train's exit status for a stop by signal after a checkpoint
# (k2jax.loop.PREEMPTED; not imported: that would load jax into the sweep driver)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RETRIES = 1
STOP = threading.Event()  # set by stop_all(): no new attempt starts
RUNNING: set[subprocess.Popen] = set()  # the attempts running now (local engine)
_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs to run a member (plain data, so Ray can ship it)."""

    member: studies.Member
    config: str  # preset name, config file or checkpoint directory
    sweep_dir: str  # absolute
    cwd: str  # where the sweep was started: relative paths in overrides mean the same


# ---------------------------------------------------------------------------
# running one member (on this machine or a Ray worker)


def _paths(job: Job) -> tuple[str, str, str]:
    d, n = job.sweep_dir, job.member.name
    return (os.path.join(d, n), os.path.join(d, "status", f"{n}.json"),
            os.path.join(d, "logs"))


def read_status(job: Job) -> dict:
    """The member's recorded outcome; {} when it never ended (or the record is unreadable:
    then it simply runs again)."""
    try:
        with open(_paths(job)[1]) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def command(job: Job, *, resume: bool, python: str = "python") -> list[str]:
    run_dir = _paths(job)[0]
    if resume:  # config.json in run_dir holds everything else
        return [python, "-m", "experiments.train", "--workdir", run_dir, "--resume",
                "--no-progress"]
    return [python, "-m", "experiments.train", "--config", job.config, "--workdir", run_dir,
            "--no-progress", *job.member.overrides]


def has_checkpoint(job: Job) -> bool:
    """Whether the member's directory holds a checkpoint to resume from."""
    return _has_checkpoint(_paths(job)[0])


def _has_checkpoint(run_dir: str) -> bool:
    ckpt = os.path.join(run_dir, "checkpoints")
    return (os.path.isfile(os.path.join(run_dir, "config.json")) and os.path.isdir(ckpt)
            and any(n.isdigit() for n in os.listdir(ckpt)))


def _prepare(run_dir: str) -> bool:
    """Before an attempt: True to resume from a checkpoint; otherwise a leftover
    directory of an earlier attempt is moved aside (kept), never deleted."""
    if _has_checkpoint(run_dir):
        return True
    if atomic.occupied(run_dir) is not None:
        k = 1
        while os.path.exists(f"{run_dir}.failed-{k}"):
            k += 1
        os.replace(run_dir, f"{run_dir}.failed-{k}")
    return False


def _error_line(log_path: str, rc: int) -> str:
    """The attempt's one-line error: the CLI's ``error:`` line, else the log's last line."""
    if rc < 0:
        return f"killed by signal {-rc}"
    with open(log_path, errors="replace") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit {rc}: {last.removeprefix('error: ')}"


def _unfinished(run_dir: str) -> str:
    """Why a run that exited 0 is not done ("" when it reached ``train.steps``)."""
    steps = from_file(os.path.join(run_dir, "config.json")).train.steps
    rows = sweeps.train_rows(run_dir)
    if not rows:
        return "exited without logging a step"
    last = rows[-1]["step"]
    return "" if last >= steps else f"stopped at step {last} of {steps} (preempted?)"


def _finished_unrecorded(run_dir: str) -> bool:
    """A run that reached ``train.steps`` but whose end was never recorded (the sweep
    was killed between the two): it is kept as finished, not trained again."""
    try:
        return _unfinished(run_dir) == ""
    except (OSError, ValueError):  # no or unreadable config.json (ConfigError is one)
        return False


def _env() -> dict[str, str]:
    """This environment, with this repository importable from any working directory."""
    path = [ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


def _attempt(job: Job, run_dir: str, logs: str) -> tuple[int, str]:
    """One run of ``experiments.train`` (resumed when a checkpoint exists) -> (exit
    status, one-line error or "")."""
    cmd = command(job, resume=_prepare(run_dir), python=sys.executable)
    k = 1
    while os.path.exists(log_path := os.path.join(logs, f"{job.member.name}.{k}.log")):
        k += 1  # a log of an attempt that never recorded its end is kept too
    with open(log_path, "x") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=job.cwd, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        with _LOCK:
            RUNNING.add(proc)
        try:
            rc = proc.wait()
        except BaseException:  # interrupted (a cancelled Ray task): stop the run too
            proc.terminate()
            proc.wait()
            raise
        finally:
            with _LOCK:
                RUNNING.discard(proc)
    if rc == PREEMPTED:  # checkpointed and stopped: to be resumed, not a failure
        where = _unfinished(run_dir).removesuffix(" (preempted?)")
        return rc, f"preempted: {where or 'stopped by a signal'}"
    return rc, _error_line(log_path, rc) if rc else _unfinished(run_dir)


def stop_all() -> None:
    """Stop the sweep here: no new attempt starts, and every running member gets
    SIGTERM, on which it checkpoints and exits (a re-run resumes it)."""
    STOP.set()
    with _LOCK:
        for proc in RUNNING:
            proc.terminate()


def execute(job: Job) -> dict:
    """Run the member with one retry (none after a kill by a signal, or once the sweep
    is stopping); write and return its status record. Never raises: what goes wrong is
    this member's error."""
    run_dir, status_path, logs = _paths(job)
    before = read_status(job)
    attempts, t0 = int(before.get("attempts", 0)), time.time()
    error = "preempted: the sweep stopped before it ran"
    try:
        os.makedirs(logs, exist_ok=True)
        if not before and _finished_unrecorded(run_dir):
            error, attempts = "", max(attempts, 1)
        for _ in range(1 + RETRIES if error else 0):
            if STOP.is_set():
                break
            attempts += 1
            rc, error = _attempt(job, run_dir, logs)
            if not error or rc < 0 or STOP.is_set():
                break
    except Exception as e:  # noqa: BLE001  (isolation: one member's failure, not the sweep's)
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    outcome = "preempted" if error.startswith("preempted") else "failed" if error else "ok"
    status = {"status": outcome, "error": error, "attempts": attempts,
              "wall_s": round(float(before.get("wall_s", 0.0)) + time.time() - t0, 2),
              "overrides": shlex.join(job.member.overrides)}
    try:
        os.makedirs(os.path.dirname(status_path), exist_ok=True)
        atomic.write_text(status_path, json.dumps(status, indent=2))
    except OSError as e:
        status["error"] = status["error"] or f"status not written: {e}"
    return status
