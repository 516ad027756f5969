"""The sweep runner: plans, names, resume, failure isolation, dry run, Ray, results, notebook."""

import contextlib
import csv
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from tiny_runs import execute_notebook

from experiments import sweep, sweep_member
from experiments import sweeps as studies
from k2jax import sweeps
from k2jax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Members on one CPU device (the tests' 8 simulated devices only slow tiny runs down).
# Ray on loopback only: its single-machine mode (as on macOS), and no auth token.
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
TINY = ["data.seq_len=32", "data.global_batch_size=8", "optimizer.warmup_steps=2",
        "train.steps=5", "train.eval_every=5", "train.eval_batches=2",
        "train.checkpoint_every=1000", "train.final_checkpoint=false"]


def _sweep(*args, env=ENV):
    return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)


def _table(sweep_dir):
    """results.csv rows without wall time, keyed by member."""
    with open(os.path.join(sweep_dir, "results.csv")) as f:
        return {r["member"]: {k: v for k, v in r.items() if k != "wall_s"}
                for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------
# planning (no training)


def test_axes_make_the_product_of_grid_zip_and_random():
    lr = studies.grid("optimizer.lr", [0.01, 0.1])
    size = studies.zipped({"model.hidden_size": [32, 64], "train.steps": [10, 20]})
    pts = studies.points([lr, size])
    assert pts == [{"optimizer.lr": "0.01", "model.hidden_size": "32", "train.steps": "10"},
                   {"optimizer.lr": "0.01", "model.hidden_size": "64", "train.steps": "20"},
                   {"optimizer.lr": "0.1", "model.hidden_size": "32", "train.steps": "10"},
                   {"optimizer.lr": "0.1", "model.hidden_size": "64", "train.steps": "20"}]
    space = {"optimizer.lr": studies.LogUniform(1e-3, 1e-1), "train.seed": [0, 1, 2]}
    draws = studies.random(space, n=50, seed=3)
    assert draws == studies.random(space, n=50, seed=3) != studies.random(space, n=50, seed=4)
    lrs = [float(d["optimizer.lr"]) for d in draws]
    assert min(lrs) >= 1e-3 and max(lrs) <= 1e-1 and min(lrs) < 1e-2 < max(lrs)
    assert {d["train.seed"] for d in draws} == {"0", "1", "2"}
    assert studies.grid("optimizer.qk_clip", [True, False]) == (
        {"optimizer.qk_clip": "true"}, {"optimizer.qk_clip": "false"})
    with pytest.raises(ConfigError, match="different numbers"):
        studies.zipped({"a": [1, 2], "b": [1]})
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        studies.parse_axis("optimizer.lr")


def test_members_are_named_readably_and_keyed_by_resolved_config():
    axes = [studies.parse_axis("optimizer.lr=0.003,3e-3,0.03"),
            studies.parse_axis("optimizer.name=adamw")]
    members = studies.plan("tiny", ["train.steps=5"], axes)
    # 0.003 and 3e-3 resolve to one config: one member
    assert [m.name.rsplit("-", 1)[0] for m in members] == ["lr=0.003_name=adamw",
                                                           "lr=0.03_name=adamw"]
    again = studies.plan("tiny", ["train.steps=5"], axes)
    assert [m.name for m in again] == [m.name for m in members]
    changed = studies.plan("tiny", ["train.steps=6"], axes)
    assert not {m.name for m in changed} & {m.name for m in members}
    # a differently spelled value finds the member already in the directory
    known = {members[0].name.rsplit("-", 1)[1]: members[0].name}
    respelled = studies.plan("tiny", ["train.steps=5"],
                           [studies.parse_axis("optimizer.lr=3e-3"), axes[1]], known)
    assert respelled[0].name == members[0].name
    # two keys ending alike keep their full names; unsafe characters are replaced
    assert studies.readable({"model.dtype": "a/b", "model.param_dtype": "x"}) == \
        "dtype=a-b_param_dtype=x"
    assert studies.readable({"optimizer.lr": "1", "train.lr": "2"}) == \
        "optimizer.lr=1_train.lr=2"
    bad = studies.plan("tiny", [], [studies.parse_axis("optimizer.name=bogus")])
    assert len(bad) == 1 and bad[0].name.startswith("name=bogus-")


def test_ray_resources_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert sweep.ray_options(["TPU=4,CPU=2", "memory=1e9"]) == {
        "num_cpus": 2.0, "memory": 1e9, "resources": {"TPU": 4.0}, "max_retries": 0}
    assert sweep.ray_options([]) == {"num_cpus": 1, "max_retries": 0}
    for args, msg in [
        (["tiny_ladr"], "did you mean 'tiny_ladder'"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--grid", "optimizer.lr"],
         "expected KEY=V1,V2"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "optimizer.lrr=1"],
         "did you mean 'optimizer.lr'"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--ray", "auto",
          "--resources", "TPU"], "expected NAME=AMOUNT"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--workers", "0"], ">= 1"),
        (["--config", "tiny"], "--config and --workdir are required"),
        (["--config", "tiny", "--workdir", str(tmp_path)], "not a sweep directory"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--grid", "optimizer.lr=,"],
         "no values"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--grid", "optimizer.lr=1",
          "--grid", "optimizer.lr=2"], "optimizer.lr: set by more than one axis"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--grid",
          "optimizer.lrr=0.1,0.2"], "did you mean 'optimizer.lr'"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--resources", "CPU=1"],
         "--resources needs --ray"),
        (["--config", "tiny", "--workdir", str(tmp_path / "s"), "--ray", "auto",
          "--workers", "2"], "--workers is for local runs"),
    ]:
        (tmp_path / "other").write_text("x")
        assert sweep.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, (args, err)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------
# running (subprocesses training tiny models)


def test_dry_run_prints_one_runnable_command_per_member(tmp_path):
    out = tmp_path / "sweep"
    args = ["--config", "tiny", "--workdir", str(out), "--grid", "optimizer.lr=0.01,0.02",
            "--grid", "optimizer.name=adamw,muon", *TINY]
    res = _sweep(*args, "--dry-run")
    assert res.returncode == 0, res.stderr
    commands = res.stdout.strip().splitlines()
    assert len(commands) == 4 and not out.exists()  # nothing written
    members = studies.plan("tiny", TINY, [studies.parse_axis(a) for a in args[5:8:2]])
    assert [shlex.split(c)[6] for c in commands] == [str(out / m.name) for m in members]
    env = {**ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    run = subprocess.run(commands[-1], shell=True, cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    row = sweeps.run_summary(out / members[-1].name)
    assert row["steps"] == 5 and row["optimizer"] == "muon" and row["lr"] == 0.02


@pytest.fixture
def ray_cluster():
    """A real local Ray instance on the loopback address, stopped (only it) afterwards."""
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    ray = shutil.which("ray", path=os.path.dirname(sys.executable))
    head = subprocess.Popen(  # --block: the head lives as long as this process
        [ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
         "--disable-usage-stats"], env={**ENV, "RAY_ADDRESS": ""}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start exited"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # the head and every Ray process it started
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # what a clean stop leaves (it can
            os.killpg(head.pid, signal.SIGKILL)  # take 30 s)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_failures_are_isolated_and_ray_gives_the_local_table(tmp_path, request):
    """A bad member fails (retried once) while the others finish, the exit status says
    so; the same sweep through a local Ray instance writes the same table."""
    grid = ["--grid", "optimizer.name=muon,bogus", "--grid", "optimizer.lr=0.01,0.03", *TINY,
            "model.num_hidden_layers=1", "model.first_k_dense_replace=0"]
    local, remote = tmp_path / "local", tmp_path / "ray"
    res = _sweep("--config", "tiny", "--workdir", str(local), "--workers", "2", *grid)
    assert res.returncode == 1, res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("sweep: 4 members, 2 ok, 2 failed")
    table = _table(local)
    assert len(table) == 4
    for name, row in table.items():
        if "bogus" in name:
            assert row["status"] == "failed" and row["attempts"] == "2"
            assert row["error"] == ("exit 2: optimizer.name='bogus': must be one of "
                                    "'adamw', 'muon'")
            assert not (local / name).exists() and row["final_train_loss"] == ""
        else:
            assert row["status"] == "ok" and row["attempts"] == "1" and row["error"] == ""
            assert row["steps"] == "5" and float(row["final_train_loss"]) > 0
    ray_cluster = request.getfixturevalue("ray_cluster")  # skipped here without ray
    res = _sweep("--config", "tiny", "--workdir", str(remote), "--ray", ray_cluster,
                 "--resources", "CPU=1", *grid)
    assert res.returncode == 1, res.stdout + res.stderr
    assert _table(remote) == table


def test_study_runs_resumes_and_feeds_the_notebook(tmp_path):
    """The tiny_ladder study's quick form: 8 members, a report; a re-run runs nothing;
    notebooks/sweep_analysis.ipynb executes on it."""
    out = tmp_path / "ladder"
    res = _sweep("tiny_ladder", "--quick", "--workdir", str(out), "--workers", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    df = sweeps.load(out)
    assert len(df) == 8 and (df["status"] == "ok").all()
    assert set(df["optimizer"]) == {"adamw", "muonclip"} and set(df["seed"]) == {0}
    assert set(df["model.hidden_size"]) == {32, 64} and set(df["optimizer.lr"]) == {0.01, 0.03}
    assert (df["tokens"] == 6 * 8 * 32).all() and (df["flops"] > 0).all()
    assert df["diverged"].dtype == bool and (out / "report.md").is_file()
    logs = sorted(os.listdir(out / "logs"))
    mtimes = {m: os.path.getmtime(out / m / "metrics.jsonl") for m in df["member"]}
    again = _sweep("tiny_ladder", "--quick", "--workdir", str(out), "--workers", "2")
    assert again.returncode == 0, again.stderr
    assert "8 finished before, running 0" in again.stdout
    assert sorted(os.listdir(out / "logs")) == logs
    assert {m: os.path.getmtime(out / m / "metrics.jsonl") for m in df["member"]} == mtimes
    _, images = execute_notebook("sweep_analysis.ipynb", K2JAX_SWEEP=str(out))
    assert images >= 3


def test_a_retry_resumes_from_a_checkpoint_or_keeps_the_failed_attempt(tmp_path):
    run = tmp_path / "m"
    assert sweep_member._prepare(str(run)) is False and not run.exists()
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert sweep_member._prepare(str(run)) is False  # no checkpoint: moved aside, kept
    assert not run.exists() and (tmp_path / "m.failed-1" / "config.json").is_file()
    (run / "checkpoints" / "3").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert sweep_member._prepare(str(run)) is True and (run / "config.json").is_file()
    (run / "checkpoints" / "3").rmdir()
    assert sweep_member._prepare(str(run)) is False and (tmp_path / "m.failed-2").is_dir()


def test_a_divergence_stop_is_retried_from_its_checkpoint_and_recorded(tmp_path):
    """lr 1e30 blows the weights up at step 2; the step-1 checkpoint survives, the retry
    resumes from it (and diverges again): one failed member, two attempts, both logged."""
    member = studies.Member("m-0", {}, ("optimizer.lr=1e30", "optimizer.warmup_steps=0",
                                       "optimizer.schedule=constant",
                                       "train.max_nonfinite_steps=1", "train.checkpoint_every=1",
                                       "model.num_hidden_layers=1",
                                       "model.first_k_dense_replace=0", *TINY[:2]))
    job = sweep_member.Job(member, "tiny", str(tmp_path), ROOT)
    old = dict(os.environ)
    os.environ.update({"XLA_FLAGS": "", "PYTHONPATH": ROOT})
    try:
        status = sweep_member.execute(job)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert status["status"] == "failed" and status["attempts"] == 2, status
    assert "non-finite steps in a row" in status["error"]
    first, second = (open(tmp_path / "logs" / f"m-0.{k}.log").readline() for k in (1, 2))
    assert "--resume" not in first and "--resume" in second
    assert sweep_member.read_status(job) == status
    row = sweeps.run_summary(tmp_path / "m-0")
    assert row["diverged"] and row["steps"] >= 2


def _fake_train(tmp_path, monkeypatch, stop_first_at: int, rc: int = 0):
    """``execute`` with experiments.train replaced by a script that writes config.json,
    a checkpoint and metrics up to ``stop_first_at`` (exit ``rc``; 75: preempted), then,
    resumed, to the end (4 steps; exit 0)."""
    script = (
        "import json, os, sys\n"
        "d = sys.argv[sys.argv.index('--workdir') + 1]\n"
        "resume = '--resume' in sys.argv\n"
        "os.makedirs(os.path.join(d, 'checkpoints', '1'), exist_ok=True)\n"
        "json.dump({'train': {'steps': 4}}, open(os.path.join(d, 'config.json'), 'w'))\n"
        f"last = 4 if resume else {stop_first_at}\n"
        "with open(os.path.join(d, 'metrics.jsonl'), 'a') as f:\n"
        "    for s in range(1, last + 1):\n"
        "        f.write(json.dumps({'step': s, 'train/loss': 1.0}) + '\\n')\n"
        f"sys.exit(0 if resume else {rc})\n")
    monkeypatch.setattr(sweep_member, "command", lambda job, resume, python="python": [
        sys.executable, "-c", script, "--workdir", sweep_member._paths(job)[0],
        *(["--resume"] if resume else [])])
    member = studies.Member("m-0", {}, ())
    return sweep_member.Job(member, "tiny", str(tmp_path), ROOT)


def test_a_preempted_member_is_resumed_not_counted_finished(tmp_path, monkeypatch):
    job = _fake_train(tmp_path, monkeypatch, stop_first_at=2)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "m-0.1.log").write_text("an attempt that never recorded its end\n")
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "m-0.json").write_text("{not json")  # unreadable: runs again
    status = sweep_member.execute(job)
    assert status["status"] == "ok" and status["attempts"] == 2, status
    logs = sorted(os.listdir(tmp_path / "logs"))
    assert logs == ["m-0.1.log", "m-0.2.log", "m-0.3.log"]
    resumed = f"--workdir {tmp_path / 'm-0'} --resume"
    assert resumed not in (tmp_path / "logs" / "m-0.2.log").read_text()
    assert resumed in (tmp_path / "logs" / "m-0.3.log").read_text()
    assert [r["step"] for r in sweeps.train_rows(tmp_path / "m-0")] == [1, 2, 3, 4]
    assert sweep_member._unfinished(str(tmp_path / "m-0")) == ""
    # killed between the run's end and its record: kept as finished, not trained again
    (tmp_path / "status" / "m-0.json").unlink()
    again = sweep_member.execute(job)
    assert again["status"] == "ok" and len(os.listdir(tmp_path / "logs")) == 3
    assert not [n for n in os.listdir(tmp_path) if ".failed-" in n]


def test_exit_75_is_preempted_resumed_and_never_failed(tmp_path, monkeypatch):
    job = _fake_train(tmp_path, monkeypatch, stop_first_at=2, rc=sweep_member.PREEMPTED)
    status = sweep_member.execute(job)  # preempted, then resumed to the end
    assert status["status"] == "ok" and status["attempts"] == 2, status
    assert [r["step"] for r in sweeps.train_rows(tmp_path / "m-0")] == [1, 2, 3, 4]
    job = _fake_train(tmp_path / "stopping", monkeypatch, stop_first_at=2,
                      rc=sweep_member.PREEMPTED)
    monkeypatch.setattr(sweep_member, "STOP", type("Stop", (), {  # stopped once it ran
        "is_set": lambda self: bool(os.listdir(tmp_path / "stopping" / "logs"))})())
    status = sweep_member.execute(job)
    assert status["status"] == "preempted" and status["attempts"] == 1, status
    assert status["error"] == "preempted: stopped at step 2 of 4"


def test_an_error_inside_execute_is_that_members_failure(tmp_path, monkeypatch):
    job = _fake_train(tmp_path, monkeypatch, stop_first_at=4)
    monkeypatch.setattr(sweep_member, "_prepare", lambda run_dir: (_ for _ in ()).throw(
        PermissionError("read-only file system")))
    status = sweep_member.execute(job)
    assert status["status"] == "failed"
    assert status["error"] == "PermissionError: read-only file system"
    assert sweep_member.read_status(job) == status


def test_results_of_other_members_are_kept_and_the_directory_is_locked(tmp_path, capsys):
    rows = [{"member": "old-1", "status": "ok", "seed": 3}, {"member": "new-2"}]
    sweeps.write_results(tmp_path / "results.csv", rows, [])
    sweep.Results(str(tmp_path), [studies.Member("new-2", {}, ())], [])
    assert not (tmp_path / "results.csv").exists()
    assert "results.before-1.csv" in capsys.readouterr().out
    os.replace(tmp_path / "results.before-1.csv", tmp_path / "results.csv")
    df = sweeps.load(tmp_path)  # kept whole; integers with a gap stay integers
    assert list(df["member"]) == ["old-1", "new-2"] and str(df["seed"].dtype) == "Int64"
    assert df["seed"].iloc[0] == 3 and df["seed"].isna().iloc[1]
    (tmp_path / "sweep.jsonl").write_text("")
    with sweep.lock(str(tmp_path)):
        assert sweep.main(["--config", "tiny", "--workdir", str(tmp_path), "--grid",
                           "optimizer.lr=0.01"]) == 2
    assert "in use by another sweep" in capsys.readouterr().err
