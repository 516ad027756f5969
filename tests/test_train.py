"""The training machine: sharded == single device, multi-process == one process,
resume == uninterrupted, the non-finite guard, TensorBoard tags, the CLI's refusals."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from k2jax import checkpoint, config, loop, metrics, train
from k2jax.metrics import read_jsonl

BASE = ["model.num_hidden_layers=2", "data.seq_len=32", "data.global_batch_size=8",
        "optimizer.lr=0.01", "optimizer.warmup_steps=2", "train.eval_every=1000",
        "train.eval_batches=2", "train.checkpoint_every=1000", "train.peak_flops=1e11"]


def _cfg(*extra):
    return config.load("tiny", [*BASE, *extra])


def _losses(workdir, key="train/loss"):
    return [r[key] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if key in r]


def _deterministic(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def test_sharded_mesh_equals_single_device(tmp_path):
    steps = ["train.steps=20"]
    single = _cfg(*steps, "mesh.fsdp=1")
    mesh8 = _cfg(*steps, "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2")
    loop.run(single, str(tmp_path / "one"), progress=False)
    loop.run(mesh8, str(tmp_path / "eight"), progress=False)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(a) == len(b) == 20 and a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resume_is_bit_identical(tmp_path):
    cfg = _cfg("train.steps=12", "train.checkpoint_every=3", "optimizer.name=muonclip",
               "optimizer.tau=0.05", "train.micro_batches=2")
    loop.run(cfg, str(tmp_path / "full"), progress=False)
    loop.run(cfg, str(tmp_path / "split"), stop_after=6, progress=False)
    loop.run(cfg, str(tmp_path / "split"), resume=True, progress=False)
    full = _deterministic(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    split = _deterministic(read_jsonl(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in split if "train/loss" in r] == list(range(1, 13))
    assert split == full  # steps 7..12 after the resume, bit for bit
    assert max(r.get("qk_clip/heads_clipped", 0) for r in full) > 0


def _lowered(cfg):
    mesh = loop.make_mesh(cfg)
    tx = train.build_optimizer(cfg)
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings)
    batch = {"inputs": np.zeros((8, 32), np.int32), "targets": np.ones((8, 32), np.int32)}
    batch = train.global_batch(batch, mesh)
    init = jax.jit(train._init_fn(cfg, tx)).lower(jax.random.key(0), train.hyperparams(cfg))
    return init.as_text(), step.lower(state, batch).as_text(), step(state, batch)


def test_lr_sweep_compiles_one_program():
    """The peak lr is state, not a constant: every lr of a sweep lowers to the same init
    and step (one compile with the persistent cache), and each still trains at its own lr."""
    a = _lowered(_cfg("optimizer.name=muonclip", "optimizer.lr=0.01"))
    b = _lowered(_cfg("optimizer.name=muonclip", "optimizer.lr=0.03"))
    assert a[0] == b[0] and a[1] == b[1]
    (sa, ma), (sb, mb) = a[2], b[2]
    lr = lambda peak: float(train.optim.schedule(  # noqa: E731
        peak, total_steps=1000, warmup_steps=2)(0))
    assert float(ma["train/lr"]) == pytest.approx(lr(0.01)) and float(mb["train/lr"]) == (
        pytest.approx(lr(0.03)))
    assert float(sb.opt_state.hyperparams["lr"]) == pytest.approx(0.03)
    da = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(sa.params)]
    db = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(sb.params)]
    assert da != db


def test_resume_takes_the_lr_from_the_config(tmp_path):
    loop.run(_cfg("train.steps=4"), str(tmp_path), stop_after=2, progress=False)
    loop.run(_cfg("train.steps=4", "optimizer.lr=0.02"), str(tmp_path), resume=True,
             progress=False)
    lrs = _losses(tmp_path, "train/lr")
    assert lrs[1] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.02)


def test_nonfinite_gradients_are_skipped_and_counted():
    cfg = _cfg("train.steps=5")
    mesh = loop.make_mesh(cfg)
    tx = train.build_optimizer(cfg)
    state, shardings, graphdef = train.init_state(cfg, tx, mesh)
    before = jax.tree.map(np.asarray, (state.params, state.rest, state.opt_state))
    poison = lambda g, step: jax.tree.map(lambda x: x * jnp.nan, g)  # noqa: E731
    step = train.make_train_step(cfg, graphdef, tx, mesh, shardings, grad_hook=poison)
    batch = {"inputs": jnp.zeros((8, 32), jnp.int32), "targets": jnp.ones((8, 32), jnp.int32)}
    state, m = step(state, train.global_batch(jax.device_get(batch), mesh))
    assert int(m["train/nonfinite"]) == 1 and int(state.step) == 1
    after = jax.tree.map(np.asarray, (state.params, state.rest, state.opt_state))
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(x, y)


def test_run_stops_after_consecutive_nonfinite_steps(tmp_path):
    cfg = _cfg("train.steps=20", "train.checkpoint_every=2", "train.max_nonfinite_steps=3")

    def poison_late(g, step):  # steps 1-2 train normally, 3 onwards have NaN gradients
        return jax.tree.map(lambda x: jnp.where(step >= 2, x * jnp.nan, x), g)

    with pytest.raises(loop.TrainingError, match="3 non-finite steps in a row"):
        loop.run(cfg, str(tmp_path), grad_hook=poison_late, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["train/nonfinite_steps"] == 3 and rows[-1]["step"] == 5
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    with checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=2, keep=3) as ck:
        assert ck.all_steps() == [2]  # the last good checkpoint, and nothing after it


def test_tensorboard_has_documented_tags(tmp_path):
    cfg = _cfg("train.steps=4", "train.eval_every=4", "train.histogram_every=2")
    loop.run(cfg, str(tmp_path), progress=False)
    tb = tmp_path / "tb"
    acc = EventAccumulator(str(tb), size_guidance={"images": 0, "histograms": 0,
                                                   "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    documented = {t for t in metrics.DOCUMENTED_TAGS if "XX" not in t}
    assert documented <= scalars, documented - scalars
    assert "attn/max_logit/layer_01" in scalars and "moe/load_imbalance/layer_00" in scalars
    assert acc.Tags()["histograms"] and acc.Tags()["images"]
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx(_losses(tmp_path), rel=1e-6)


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


def test_training_starts_from_a_hugging_face_checkpoint(tmp_path):
    """``--config HF_DIR``: the architecture from config.json, the weights loaded into
    their shards, and training goes on from there."""
    from flax import nnx

    from k2jax import hf

    fixture = "tests/fixtures/hf_tiny_k2"
    cfg = config.load(fixture, ["mesh.fsdp=2", "mesh.expert=2", "data.seq_len=16",
                                "data.global_batch_size=4", "train.steps=3",
                                "optimizer.name=muonclip", "train.eval_batches=1"])
    assert cfg.train.init_from == os.path.abspath(fixture)
    mesh = loop.make_mesh(cfg)
    tx = train.build_optimizer(cfg)
    state, shardings, _ = train.init_state(cfg, tx, mesh)
    state = train.init_from_hf(state, shardings, cfg, mesh)
    _, model = hf.load(fixture)
    want = jax.tree.leaves(nnx.split(model, nnx.Param, ...)[1:])
    got = jax.tree.leaves((state.params, state.rest))
    assert len(want) == len(got)
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)
    out = loop.run(cfg, str(tmp_path), progress=False)
    assert out["step"] == 3 and np.isfinite(out["last"]["train/loss"])
    with pytest.raises(hf.HFError, match="model.hidden_size=48"):
        train.init_from_hf(state, shardings, config.load(fixture, ["model.hidden_size=48"]),
                           mesh)


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
    a, b = _losses(tmp_path / "single"), _losses(tmp_path / "multi")
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    cfg = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert cfg["mesh"]["num_processes"] == 2


def test_loss_curves_notebook_executes(tmp_path):
    """notebooks/loss_curves.ipynb runs headless on a tiny run; any cell error fails."""
    import nbformat
    from nbclient import NotebookClient

    run = tmp_path / "tiny_run"
    loop.run(_cfg("train.steps=6"), str(run), progress=False)
    nb = nbformat.read("notebooks/loss_curves.ipynb", as_version=4)
    os.environ["K2JAX_RUNS"] = str(run)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": os.getcwd()}}).execute()
    finally:
        del os.environ["K2JAX_RUNS"]
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "1 runs:" in text and "tiny_run" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
