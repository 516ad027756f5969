"""metrics.writers: jsonl + TensorBoard read back through TensorBoard's own reader; tag names."""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea

from k2jax import metrics


def _events(workdir):
    acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={
        ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def test_writer_tensorboard_roundtrip(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as w:
        w.write_scalars(1, {"train/loss": jnp.float32(2.5), "train/lr": np.float64(1e-3)})
        w.write_scalars(2, {"train/loss": 2.25, metrics.layer_tag("attn/max_logit", 3): 7})
        w.write_histogram(2, "moe/expert_load/layer_01", np.array([1.0, 2.0, np.nan, 5.0]))
        w.write_image(2, "attn/max_logit_heads", np.arange(8.0).reshape(2, 4))
    acc = _events(tmp_path)
    tags = acc.Tags()
    assert set(tags["scalars"]) == {"train/loss", "train/lr", "attn/max_logit/layer_03"}
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (2, 2.25)]
    assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-3)
    assert acc.Scalars("attn/max_logit/layer_03")[0].value == 7.0
    assert tags["histograms"] == ["moe/expert_load/layer_01"]
    h = acc.Histograms("moe/expert_load/layer_01")[0].histogram_value
    assert (h.num, h.min, h.max) == (3, 1.0, 5.0)  # the NaN is dropped
    assert tags["images"] == ["attn/max_logit_heads"]
    img = acc.Images("attn/max_logit_heads")[0]
    assert img.step == 2 and img.height >= 64 and img.width >= 64  # 2x4 upscaled


def test_jsonl_roundtrip_with_nonfinite_and_resume(tmp_path):
    with metrics.MetricsWriter(tmp_path, enabled=True) as w:
        w.write_scalars(0, {"train/loss": jnp.array(3.0), "x": float("nan")})
        w.write_scalars(1, {"train/loss": float("inf"), "x": -np.inf})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "NaN" in lines[0] and "Infinity" in lines[1]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # a crash mid-line
    with metrics.MetricsWriter(tmp_path, enabled=True) as w:  # resume appends
        w.write_scalars(2, {"train/loss": 1.5})
    with pytest.warns(UserWarning, match="1 malformed"):
        recs = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[0]["train/loss"] == 3.0 and type(recs[0]["train/loss"]) is float
    assert math.isnan(recs[0]["x"])
    assert recs[1] == {"step": 1, "train/loss": math.inf, "x": -math.inf}
    assert recs[2] == {"step": 2, "train/loss": 1.5}


def test_disabled_writer_writes_nothing(tmp_path):
    d = tmp_path / "run"
    with metrics.MetricsWriter(d, enabled=False) as w:
        w.write_scalars(0, {"train/loss": 1.0})
        w.write_histogram(0, "h", np.ones(3))
        w.write_image(0, "i", np.ones((2, 2)))
        w.flush()
    assert not d.exists()


# namespace/name[/name...]: lower-case words, as TensorBoard groups by the first part
_BASE = re.compile(r"[a-z][a-z_]*(/[a-z][a-z_]*)+")


def test_documented_tags_are_described_and_well_formed():
    # (that a real run writes exactly these tags is tests/test_loop.py's end-to-end check)
    for tag, why in metrics.DOCUMENTED_TAGS.items():
        assert isinstance(why, str) and why.strip(), f"{tag}: no description"
        base, _, last = tag.rpartition("/")
        if last == "layer_XX":  # per-layer tag: its worst-layer aggregate is documented too
            assert _BASE.fullmatch(base) and base in metrics.DOCUMENTED_TAGS, tag
        else:
            assert _BASE.fullmatch(tag), f"{tag}: not base or base/layer_XX"


def test_layer_tag_matches_documented_pattern_and_sorts_in_layer_order():
    per_layer = [t for t in metrics.DOCUMENTED_TAGS if t.endswith("/layer_XX")]
    assert per_layer
    for doc in per_layer:
        base = doc.removesuffix("/layer_XX")
        pattern = re.compile(re.escape(base) + r"/layer_\d\d")
        tags = [metrics.layer_tag(base, i) for i in range(100)]
        assert all(pattern.fullmatch(t) for t in tags), doc
        assert sorted(tags) == tags  # TensorBoard's string order is layer order past 10
    assert metrics.layer_tag("moe/load_imbalance", 7) == "moe/load_imbalance/layer_07"
