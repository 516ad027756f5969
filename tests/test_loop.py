"""The host loop: sharded == single device, resume == uninterrupted, the non-finite stop,
and the TensorBoard tags a run writes are exactly the documented ones."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_runs import deterministic, losses, tiny

from k2jax import checkpoint, loop, metrics
from k2jax.metrics import read_jsonl


def test_sharded_mesh_equals_single_device(tmp_path):
    steps = ["train.steps=20"]
    single = tiny(*steps, "mesh.fsdp=1")
    mesh8 = tiny(*steps, "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2")
    loop.run(single, str(tmp_path / "one"), progress=False)
    loop.run(mesh8, str(tmp_path / "eight"), progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert len(a) == len(b) == 20 and a[-1] < a[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resume_is_bit_identical(tmp_path):
    cfg = tiny("train.steps=12", "train.checkpoint_every=3", "optimizer.qk_clip=true",
               "optimizer.tau=0.05", "train.micro_batches=2")
    loop.run(cfg, str(tmp_path / "full"), progress=False)
    loop.run(cfg, str(tmp_path / "split"), stop_after=6, progress=False)
    loop.run(cfg, str(tmp_path / "split"), resume=True, progress=False)
    full = deterministic(read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    split = deterministic(read_jsonl(tmp_path / "split" / "metrics.jsonl"))
    assert [r["step"] for r in split if "train/loss" in r] == list(range(1, 13))
    assert split == full  # steps 7..12 after the resume, bit for bit
    assert max(r.get("qk_clip/heads_clipped", 0) for r in full) > 0


def test_resume_takes_the_lr_from_the_config(tmp_path):
    loop.run(tiny("train.steps=4"), str(tmp_path), stop_after=2, progress=False)
    loop.run(tiny("train.steps=4", "optimizer.lr=0.02"), str(tmp_path), resume=True,
             progress=False)
    lrs = losses(tmp_path, "train/lr")
    assert lrs[1] == pytest.approx(0.01) and lrs[2] == pytest.approx(0.02)


def test_run_stops_after_consecutive_nonfinite_steps(tmp_path):
    cfg = tiny("train.steps=20", "train.checkpoint_every=2", "train.max_nonfinite_steps=3")

    def poison_late(g, step):  # steps 1-2 train normally, 3 onwards have NaN gradients
        return jax.tree.map(lambda x: jnp.where(step >= 2, x * jnp.nan, x), g)

    with pytest.raises(loop.TrainingError, match="3 non-finite steps in a row"):
        loop.run(cfg, str(tmp_path), grad_hook=poison_late, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["train/nonfinite_steps"] == 3 and rows[-1]["step"] == 5
    assert all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    with checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_every=2, keep=3) as ck:
        assert ck.all_steps() == [2]  # the last good checkpoint, and nothing after it


def _documented(tag: str) -> bool:
    """``tag`` is in DOCUMENTED_TAGS, per-layer tags matching their ``layer_XX`` entry."""
    return re.sub(r"/layer_\d\d$", "/layer_XX", tag) in metrics.DOCUMENTED_TAGS


def test_tensorboard_tags_are_exactly_the_documented_ones(tmp_path):
    """Both directions: every documented tag is written by a MuonClip run with eval, and
    every scalar written (TensorBoard and metrics.jsonl) is documented."""
    cfg = tiny("train.steps=4", "train.eval_every=4", "train.histogram_every=2")
    loop.run(cfg, str(tmp_path), progress=False)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "histograms": 0,
                                                                "scalars": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    jsonl = {k for r in read_jsonl(tmp_path / "metrics.jsonl") for k in r if k != "step"}
    assert scalars == jsonl
    undocumented = sorted(t for t in scalars if not _documented(t))
    assert not undocumented, undocumented
    patterns = {t.replace("XX", r"\d\d") for t in metrics.DOCUMENTED_TAGS}
    unwritten = sorted(p for p in patterns if not any(re.fullmatch(p, t) for t in scalars))
    assert not unwritten, unwritten
    assert {"attn/max_logit/layer_01", "moe/load_imbalance/layer_00"} <= scalars
    assert acc.Tags()["histograms"] and acc.Tags()["images"]
    loss = [e.value for e in acc.Scalars("train/loss")]
    assert loss == pytest.approx(losses(tmp_path), rel=1e-6)
