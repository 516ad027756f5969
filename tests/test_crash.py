"""The crash harness (issue 16): SIGKILL a training process at seeded random moments, and
once in the middle of a checkpoint save, resuming each time; the run that finally
completes equals an uninterrupted one bit for bit: every metric, each step exactly once
(metrics.jsonl and TensorBoard), and the final parameters and optimizer state.

The default run kills 6 times (one during start-up, one during the first save, four at
random steps); ``pytest -m slow`` kills 25 times."""

import os
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import BASE, deterministic

from k2jax.metrics import read_jsonl

STEPS = 30
ARGS = [*BASE, f"train.steps={STEPS}", "train.checkpoint_every=4", "train.keep_checkpoints=2",
        "train.eval_every=10", "train.histogram_every=5"]


def _start(workdir):
    resume = os.path.exists(os.path.join(workdir, "config.json"))
    cmd = [sys.executable, "-m", "experiments.train", "--workdir", str(workdir), "--no-progress"]
    cmd += ["--resume"] if resume else ["--config", "tiny", *ARGS]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _saving(workdir) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any("tmp" in name for name in os.listdir(d))


def _last_step(workdir, what: str) -> int:
    """The newest step logged (what="metrics") or checkpointed ("checkpoints"); 0 if none."""
    if what == "checkpoints":
        d = os.path.join(workdir, "checkpoints")
        names = os.listdir(d) if os.path.isdir(d) else []
        return max([int(n) for n in names if n.isdigit()], default=0)
    try:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    steps = [int(ln.split(",")[0].split(":")[1]) for ln in lines if ln.endswith("}")]
    return max(steps, default=0)


def _kill_at(p, workdir, when, rng):
    """SIGKILL ``p``: ("time", s) s seconds after its start; ("save",) as soon as a save
    is in flight; ("step",) once it has logged a step drawn between its checkpoint and
    the end, plus up to 50 ms. Returns whether it was still running."""
    t0, target = time.time(), None
    if when[0] == "step":
        target = int(rng.integers(_last_step(workdir, "checkpoints") + 1, STEPS + 1))
    delay = rng.uniform(0, 0.05)
    while p.poll() is None and time.time() - t0 < 300:
        if ((when[0] == "time" and time.time() - t0 > when[1])
                or (when[0] == "save" and _saving(workdir))
                or (target is not None and _last_step(workdir, "metrics") >= target)):
            time.sleep(0 if when[0] == "save" else delay)
            p.kill()
            p.wait()
            return True
        time.sleep(0.002)
    return False


def _finish(workdir):
    p = _start(workdir)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def _final_state(workdir):
    path = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    return ocp.StandardCheckpointer().restore(path)


def _tb_losses(workdir):
    acc = EventAccumulator(os.path.join(workdir, "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("train/loss")]


def _crash_and_compare(tmp_path, kills: int, seed: int):
    ref, crashed = tmp_path / "reference", tmp_path / "crashed"
    _finish(ref)  # also fills the compilation cache the kills' processes then use
    rng = np.random.default_rng(seed)
    # during start-up (import, setup, compile), during the first save, then mostly at
    # random steps, with a save kill every 5th
    plan = [("time", rng.uniform(0.5, 3.0)), ("save",)]
    plan += [("save",) if i % 5 == 4 else ("step",) for i in range(kills - 2)]
    killed = 0
    for when in plan:
        p = _start(crashed)
        killed += _kill_at(p, crashed, when, rng)
        if p.returncode == 0:  # it finished before the kill: nothing left to interrupt
            break
    assert killed >= 2, f"only {killed} of {kills} kills hit a running process"
    _finish(crashed)
    a, b = read_jsonl(ref / "metrics.jsonl"), read_jsonl(crashed / "metrics.jsonl")
    steps = [r["step"] for r in b if "train/loss" in r]
    assert steps == list(range(1, STEPS + 1))  # each step exactly once
    assert deterministic(b) == deterministic(a)  # bit for bit, evals included
    assert read_jsonl(crashed / "max_logits.jsonl") == read_jsonl(ref / "max_logits.jsonl")
    assert _tb_losses(crashed) == _tb_losses(ref)
    sa, sb = _final_state(ref), _final_state(crashed)
    flat_a, flat_b = ocp.tree.to_flat_dict(sa), ocp.tree.to_flat_dict(sb)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)
    return killed


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path):
    _crash_and_compare(tmp_path, kills=6, seed=0)


@pytest.mark.slow
def test_sigkill_25_times(tmp_path):
    _crash_and_compare(tmp_path, kills=25, seed=1)
