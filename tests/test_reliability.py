"""Reliability of a training workdir (issue 16): it can always be resumed, a corrupt
checkpoint is passed over, one run holds it at a time, signals save and exit as
"preempted", and each step is logged once however often a run restarts."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import BASE, deterministic, snapshot

from experiments import train as train_cli
from k2jax import loop, workdir_lock
from k2jax.metrics import MetricsWriter, read_jsonl

RUN = ["--config", "tiny", "--no-progress", *BASE, "train.steps=8", "train.checkpoint_every=2"]


def cli(workdir, *args, capsys=None):
    """experiments.train in this process -> (exit status, stderr lines)."""
    try:
        rc = train_cli.main(["--workdir", str(workdir), *args])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr() if capsys is not None else None
    cli.out = captured.out if captured else ""  # stdout of the last call
    return rc, [ln for ln in (captured.err if captured else "").splitlines() if ln.strip()]


def rows(workdir):
    return deterministic(read_jsonl(os.path.join(workdir, "metrics.jsonl")))


def train_steps(workdir):
    return [r["step"] for r in rows(workdir) if "train/loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of RUN: its metrics."""
    d = tmp_path_factory.mktemp("reference") / "run"
    assert cli(d, *RUN)[0] == 0
    return rows(d)


# --- never a stuck workdir ----------------------------------------------------------


def test_a_run_that_died_before_its_first_checkpoint_resumes_from_step_0(tmp_path, reference,
                                                                        capsys):
    d = tmp_path / "run"
    train_cli.write_config(train_cli.load_config("tiny", [*BASE, "train.steps=8",
                                                          "train.checkpoint_every=2"]),
                           str(d), resume=False)
    with MetricsWriter(d) as w:  # what the dead run had logged: steps 1 and 2 (half a line)
        w.write_scalars(1, {"train/loss": 9.0})
        w.write_scalars(2, {"train/loss": 9.0})
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')
    rc, err = cli(d, "--resume", "--no-progress", capsys=capsys)
    assert rc == 0, err
    assert any("3 metric records after step 0 dropped" in ln for ln in err), err
    assert train_steps(d) == list(range(1, 9))
    assert rows(d) == reference


# --- corrupt checkpoints --------------------------------------------------------------


def _largest_file(step_dir):
    files = [os.path.join(p, f) for p, _, fs in os.walk(step_dir / "state") for f in fs]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garble(step_dir):
    path = _largest_file(step_dir)
    data = bytearray(open(path, "rb").read())
    noise = np.random.default_rng(0).integers(0, 256, len(data) // 2 - len(data) // 4)
    data[len(data) // 4: len(data) // 2] = noise.astype(np.uint8).tobytes()
    open(path, "wb").write(bytes(data))


def _empty(step_dir):
    for p, dirs, files in os.walk(step_dir, topdown=False):
        for f in files:
            os.remove(os.path.join(p, f))
        for sub in dirs:
            os.rmdir(os.path.join(p, sub))


def _no_state(step_dir):
    os.rename(step_dir / "state", step_dir.parent / "state-moved-away")


@pytest.fixture(scope="module")
def stopped_at_6(tmp_path_factory):
    """RUN stopped after step 6: checkpoints 2, 4 and 6."""
    d = tmp_path_factory.mktemp("stopped") / "run"
    cfg = train_cli.load_config("tiny", [*BASE, "train.steps=8", "train.checkpoint_every=2"])
    train_cli.write_config(cfg, str(d), resume=False)
    loop.run(cfg, str(d), stop_after=6, progress=False)
    assert sorted(os.listdir(d / "checkpoints")) == ["2", "4", "6"]
    return d


@pytest.mark.parametrize("corrupt", [_truncate, _garble, _empty, _no_state])
def test_a_corrupt_latest_checkpoint_is_passed_over(tmp_path, stopped_at_6, reference, capsys,
                                                    corrupt):
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(stopped_at_6), str(d)], check=True)
    corrupt(d / "checkpoints" / "6")
    rc, err = cli(d, "--resume", "--no-progress", capsys=capsys)
    assert rc == 0, err
    skipped = [ln for ln in err if "checkpoint step 6 skipped" in ln]
    assert len(skipped) == 1 and "Traceback" not in "".join(err), err
    assert any("moved to" in ln and "checkpoints.skipped" in ln for ln in err), err
    assert os.path.isdir(d / "checkpoints.skipped" / "6")  # kept, not deleted
    assert train_steps(d) == list(range(1, 9)) and rows(d) == reference


def test_no_checkpoint_restores_is_one_line_and_changes_nothing(tmp_path, stopped_at_6, capsys):
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(stopped_at_6), str(d)], check=True)
    for step in ("2", "4", "6"):
        _truncate(d / "checkpoints" / step)
    before = snapshot(d)
    rc, err = cli(d, "--resume", "--no-progress", capsys=capsys)
    assert rc == 2
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1 and "none of the 3 checkpoints" in errors[0], err
    assert len([ln for ln in err if "skipped" in ln]) == 3
    assert snapshot(d) == before


# --- the workdir lock -------------------------------------------------------------------


def test_a_busy_workdir_is_refused_naming_its_holder(tmp_path, stopped_at_6, capsys):
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(stopped_at_6), str(d)], check=True)
    before = snapshot(d)
    with workdir_lock.hold(d):
        rc, err = cli(d, "--resume", "--no-progress", capsys=capsys)
        assert snapshot(d) == {**before, ".lock": snapshot(d)[".lock"]}
    assert rc == 2 and len(err) == 1 and f"pid {os.getpid()}" in err[0], err
    assert snapshot(d) == before  # the holder's note went with it


def test_a_killed_holder_leaves_no_lock(tmp_path):
    code = ("import sys, time; from k2jax import workdir_lock\n"
            "with workdir_lock.hold(sys.argv[1], create=True):\n"
            "    print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "w")],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(workdir_lock.Busy, match=f"pid {p.pid}"):
        with workdir_lock.hold(tmp_path / "w"):
            pass
    p.kill()
    p.wait()
    assert os.path.exists(tmp_path / "w" / ".lock")  # the dead holder's note ...
    with workdir_lock.hold(tmp_path / "w"):  # ... blocks nothing
        assert f"pid {os.getpid()}" in (tmp_path / "w" / ".lock").read_text()


# --- signals and exit codes ---------------------------------------------------------------


def _spawn(workdir, *args):
    return subprocess.Popen([sys.executable, "-m", "experiments.train", "--workdir",
                             str(workdir), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_exits_preempted(tmp_path, signum):
    """Sent as soon as the run is set up (while the step compiles): it saves after the
    step it is in and exits 75; --resume then finishes the run."""
    d = tmp_path / "run"
    p = _spawn(d, *RUN[:-2], "train.steps=400", "train.checkpoint_every=1000")
    deadline = time.time() + 120
    while not (d / "config.json").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (d / "config.json").exists(), p.communicate()[1][-2000:]  # set up, guard installed
    p.send_signal(signum)
    out, err = p.communicate(timeout=300)
    assert p.returncode == loop.PREEMPTED, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("preempted at step"), err
    assert "Traceback" not in err and "done" not in out
    saved = sorted(int(s) for s in os.listdir(d / "checkpoints"))
    assert len(saved) == 1 and train_steps(d) == list(range(1, saved[0] + 1))


def test_a_full_disk_is_one_line_at_the_failing_save(tmp_path):
    """Files capped at 196 KiB (``ulimit -f``: writes past it fail as on a full disk): the
    first checkpoint's async write fails; the run stops with one line as soon as the write
    has failed (by the next save at the latest), instead of orbax's dozens of tracebacks
    one checkpoint later."""
    env = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(10**12)}
    d = tmp_path / "run"
    cmd = shlex.join([sys.executable, "-m", "experiments.train", "--workdir", str(d), *RUN,
                      "train.steps=40", "train.checkpoint_every=10"])
    r = subprocess.run(["bash", "-c", f"ulimit -f 196; trap '' XFSZ; exec {cmd}"], env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: saving a checkpoint in") and "File too large" in lines[0]
    assert train_steps(d)[-1] <= 20


def test_a_signal_while_setting_up_stops_before_writing(tmp_path, capsys, monkeypatch):
    d = tmp_path / "run"
    setup = train_cli.loop.setup

    def signalled_setup(*args, **kwargs):  # SIGTERM arrives while the run is being set up
        os.kill(os.getpid(), signal.SIGTERM)
        return setup(*args, **kwargs)
    monkeypatch.setattr(train_cli.loop, "setup", signalled_setup)
    rc, err = cli(d, *RUN, capsys=capsys)
    assert rc == loop.PREEMPTED and len(err) == 1 and "nothing written" in err[0], err
    assert not os.path.exists(d / "config.json") and os.listdir(d) == []


def test_a_nonfinite_stop_says_no_checkpoint_was_written(tmp_path, capsys):
    d = tmp_path / "run"
    rc, err = cli(d, *RUN, "optimizer.lr=1e30", "train.max_nonfinite_steps=2",
                  "optimizer.warmup_steps=0", capsys=capsys)
    assert rc == 1 and len(err) == 1, err
    assert "non-finite steps in a row" in err[0] and "no checkpoint was written" in err[0]
    assert not os.path.exists(d / "checkpoints")
    rc, err = cli(d, "--resume", "--no-progress", "optimizer.lr=0.01", "train.steps=4",
                  capsys=capsys)  # what it takes to continue: nothing but --resume
    assert rc == 0 and train_steps(d) == [1, 2, 3, 4], err


# --- resume ----------------------------------------------------------------------------------


def test_resume_with_nothing_left_to_do_writes_nothing(tmp_path, stopped_at_6, capsys):
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(stopped_at_6), str(d)], check=True)
    assert cli(d, "--resume", "--no-progress", capsys=capsys)[0] == 0  # to the end: step 8
    before = snapshot(d)
    rc, err = cli(d, "--resume", "--no-progress", capsys=capsys)
    assert rc == 0 and err == [] and snapshot(d) == before
    assert "nothing to do" in cli.out and "loss" not in cli.out


def test_moving_the_schedule_horizon_needs_stretch(tmp_path, stopped_at_6, capsys):
    """Cosine over 8 steps, stopped at 6: 16 steps would raise the lr at step 6."""
    d = tmp_path / "run"
    subprocess.run(["cp", "-a", str(stopped_at_6), str(d)], check=True)
    assert json.loads((d / "config.json").read_text())["optimizer"]["schedule"] == "cosine"
    before = snapshot(d)
    for bad in (["train.steps=16"], ["train.steps=4"]):  # stretched; below the checkpoint
        rc, err = cli(d, "--resume", "--no-progress", *bad, capsys=capsys)
        assert rc == 2 and len(err) == 1, err
        assert snapshot(d) == before
    assert "--stretch-schedule" in cli(d, "--resume", "--no-progress", "train.steps=16",
                                       capsys=capsys)[1][0]
    rc, err = cli(d, "--resume", "--no-progress", "train.steps=10", "--stretch-schedule",
                  capsys=capsys)
    assert rc == 0 and train_steps(d) == list(range(1, 11)), err


def test_extending_wsd_in_its_stable_phase_needs_no_flag(tmp_path, capsys):
    """WSD over 40 steps decays from step 32; stopped at 8, 44 steps leave the lr at 8 as it
    was (the point of WSD: a run can be extended before its decay)."""
    d = tmp_path / "run"
    cfg = train_cli.load_config("tiny", [*BASE, "train.steps=40", "train.checkpoint_every=4",
                                         "optimizer.schedule=wsd"])
    train_cli.write_config(cfg, str(d), resume=False)
    loop.run(cfg, str(d), stop_after=8, progress=False)
    rc, err = cli(d, "--resume", "--no-progress", "train.steps=44", capsys=capsys)
    assert rc == 0, err
    assert train_steps(d) == list(range(1, 45))


# --- each step once in metrics.jsonl and TensorBoard ------------------------------------


def test_resumed_writer_drops_later_steps_and_purges_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 7):
            w.write_scalars(step, {"train/loss": float(step)})
            w.write_array(step, "max_logits", np.ones((1, 2)))
    with open(tmp_path / "max_logits.jsonl", "a") as f:
        f.write('{"step": 7, "val')  # a line a kill cut short
    (tmp_path / "mine.jsonl").write_text('{"step": 9}\n')  # not the writer's: untouched
    with MetricsWriter(tmp_path, resume_from=4) as w:
        assert w.dropped == 5  # steps 5, 6 in two files, and the cut line
        w.write_array(5, "max_logits", np.ones((1, 2)))
        for step in (5, 6):
            w.write_scalars(step, {"train/loss": 10.0 * step})
    rs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rs] == [1, 2, 3, 4, 5, 6] and rs[-1]["train/loss"] == 60.0
    assert [r["step"] for r in read_jsonl(tmp_path / "max_logits.jsonl")] == [1, 2, 3, 4, 5]
    assert (tmp_path / "mine.jsonl").read_text() == '{"step": 9}\n'
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events][-2:] == [50.0, 60.0]
