"""experiments.train: one-line refusals before anything is written, and two processes on
127.0.0.1 equal one."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from tiny_runs import BASE, losses


def _cli(*args, workdir):
    return subprocess.run([sys.executable, "-m", "experiments.train", "--workdir", str(workdir),
                           "--no-progress", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["--config", "tiny", "model.hiden_size=3"], "did you mean 'model.hidden_size'"),
    (["--config", "tiny", "optimizer.lr=fast"], "optimizer.lr='fast': expected float"),
    (["--config", "tiny", "model.n_group=3"], "n_group=3"),
    (["--config", "tiny", "data.source=text", "data.paths=/nonexistent/corpus.txt"],
     "/nonexistent/corpus.txt: no such file"),
    (["--config", "nosuchpreset"], "neither a preset"),
    (["--config", "tests/fixtures/hf_tiny_k2", "model.n_routed_experts=16"],
     "model.n_routed_experts=16 (checkpoint: 8)"),
])
def test_cli_rejects_bad_input_before_writing(tmp_path, args, message):
    workdir = tmp_path / "run"
    r = _cli(*args, workdir=workdir)
    assert r.returncode == 2, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not workdir.exists()


def test_cli_refuses_non_empty_workdir(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    r = _cli("--config", "tiny", workdir=tmp_path)
    assert r.returncode == 2 and "not empty" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    """2 processes x 4 CPU devices on 127.0.0.1 == 1 process x 8 devices, same mesh."""
    args = ["--config", "tiny", *BASE, "train.steps=6", "mesh.data=2", "mesh.fsdp=2",
            "mesh.expert=2"]
    single = _cli(*args, workdir=tmp_path / "single")
    assert single.returncode == 0, single.stderr[-2000:]
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--workdir", str(tmp_path / "multi"),
         "--no-progress", *args, "mesh.distributed=true",
         f"mesh.coordinator_address=127.0.0.1:{port}", "mesh.num_processes=2",
         f"mesh.process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=540) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert cfg["mesh"]["num_processes"] == 2


def test_a_preset_name_wins_over_a_directory_of_that_name(tmp_path, monkeypatch):
    from experiments.train import load_config

    (tmp_path / "tiny").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny", ["train.steps=3"])
    assert cfg.model.hidden_size == 64 and not cfg.train.init_from
