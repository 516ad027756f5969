"""metrics.py: writers read back through TensorBoard's own reader, FLOPs by hand, curve checks."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator as ea

from k2jax import config, metrics, params


def _events(workdir):
    acc = ea.EventAccumulator(str(workdir / "tb"), size_guidance={
        ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------
# writers


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


def test_documented_tags():
    for tag in ("train/loss", "train/ce", "train/z_loss", "train/lr", "train/grad_norm",
                "train/update_rms/muon", "train/update_rms/adamw", "attn/max_logit",
                "attn/max_logit/layer_XX", "qk_clip/heads_clipped", "qk_clip/fraction_clipped",
                "qk_clip/min_gamma", "moe/load_imbalance", "moe/load_imbalance/layer_XX",
                "perf/tokens_per_sec", "perf/mfu", "train/nonfinite_steps", "eval/loss"):
        assert metrics.DOCUMENTED_TAGS[tag]
    assert metrics.layer_tag("moe/load_imbalance", 7) == "moe/load_imbalance/layer_07"


# ---------------------------------------------------------------------------
# FLOPs


def test_flops_tiny_mla_by_hand():
    cfg = config.preset("tiny")
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
            cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.vocab_size,
            cfg.intermediate_size, cfg.moe_intermediate_size, cfg.n_routed_experts,
            cfg.num_experts_per_tok, cfg.n_shared_experts, cfg.num_hidden_layers,
            cfg.first_k_dense_replace) == (64, 4, 32, 32, 16, 8, 16, 512, 128, 32, 8, 2, 1, 2, 1)
    T = 128
    # multiply-accumulates per token, matmul by matmul
    q_a = 64 * 32
    q_b = 32 * (4 * (16 + 8))
    kv_a = 64 * (32 + 8)
    kv_b = 32 * (4 * (16 + 16))
    o = (4 * 16) * 64
    scores = T * 4 * (16 + 8)  # q . k against all T keys, every head
    values = T * 4 * 16  # p . v
    attn_layer = q_a + q_b + kv_a + kv_b + o + scores + values
    dense_mlp = 64 * 128 + 64 * 128 + 128 * 64  # gate, up, down
    router = 64 * 8
    expert = 64 * 32 + 64 * 32 + 32 * 64
    moe_layer = router + 2 * expert + 1 * expert  # 2 routed + 1 shared
    head = 64 * 512
    macs = 2 * attn_layer + dense_mlp + moe_layer + head
    assert macs == 148992
    assert metrics.flops_per_token(cfg, T) == 2 * 3 * macs
    causal = metrics.flops_per_token(cfg, T, causal=True)
    assert causal == 6 * (macs - (scores + values))  # 2 layers x half


def test_flops_mha_and_no_q_lora_by_hand():
    cfg = config.preset("tiny", "attention=mha", "num_key_value_heads=2", "head_dim=8")
    T = 32
    per_layer = 64 * 4 * 8 + 64 * 2 * 8 + 64 * 2 * 8 + 4 * 8 * 64 + T * 4 * 8 + T * 4 * 8
    mlp = 3 * 64 * 128 + 64 * 8 + 3 * 3 * 64 * 32
    assert metrics.flops_per_token(cfg, T) == 6 * (2 * per_layer + mlp + 64 * 512)
    cfg2 = config.preset("tiny", "q_lora_rank=null")
    b1, b2 = metrics.flops_breakdown(config.preset("tiny"), T), metrics.flops_breakdown(cfg2, T)
    assert b1["attn_proj"] - b2["attn_proj"] == 6 * 2 * (64 * 32 + 32 * 96 - 64 * 96)


def test_flops_kimi_k2_matches_6n_active():
    cfg = config.preset("kimi-k2")
    _, active = params.count(cfg)
    embed = cfg.vocab_size * cfg.hidden_size  # a gather, not a matmul
    b = metrics.flops_breakdown(cfg, 4096)
    non_attn = sum(v for k, v in b.items() if k != "attention")
    # the only non-matmul params left in `active` are RMSNorm scales (~1M of 32B)
    assert non_attn == pytest.approx(6 * (active - embed), rel=1e-3)
    assert 6 * 31e9 < non_attn < 6 * 32e9  # 32.9B active less the 1.17B embedding


def test_mfu():
    assert metrics.mfu(1000.0, 6e9, 1e12, 2) == pytest.approx(3.0)


# ---------------------------------------------------------------------------
# peak FLOP/s


def test_peak_flops_override_and_table():
    assert metrics.peak_flops_per_device(override=1.5e12) == 1.5e12
    assert metrics.known_peak_flops("TPU v5 lite") == 197e12
    assert metrics.known_peak_flops("TPU v5") == 459e12
    assert metrics.known_peak_flops("TPU v5p") == 459e12
    assert metrics.known_peak_flops("TPU v6 lite") == 918e12
    assert metrics.known_peak_flops("TPU v4") == 275e12
    assert metrics.known_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.known_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert metrics.known_peak_flops("cpu") is None


def test_peak_flops_measured_once_then_cached(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(metrics, "_measure_matmul_flops", lambda: calls.append(1) or 1.25e11)
    assert metrics.peak_flops_per_device(cache_dir=str(tmp_path)) == 1.25e11
    assert metrics.peak_flops_per_device(cache_dir=str(tmp_path)) == 1.25e11
    assert len(calls) == 1
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    (key, value), = cache.items()
    assert value == 1.25e11 and "jax-" in key and "cpus-" in key


def test_measure_matmul_flops_is_plausible():
    assert 1e8 < metrics._measure_matmul_flops(n=256, repeats=3) < 1e14


# ---------------------------------------------------------------------------
# loss-curve checks


def _clean_curve(n=600, seed=0):
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return 2.0 + 3.0 * np.exp(-t / 100) + 0.02 * rng.standard_normal(n)


def test_spikes_clean_curve_has_none():
    assert metrics.detect_spikes(_clean_curve()).size == 0


def test_spikes_found_exactly():
    x = _clean_curve()
    where = [120, 121, 300, 555]
    x[where] *= 2.0
    assert metrics.detect_spikes(x).tolist() == where
    assert metrics.detect_spikes(x, warmup=200).tolist() == [300, 555]
    assert metrics.detect_spikes(x, ratio=3.0).size == 0


def test_nan_is_divergence_not_spike():
    x = _clean_curve()
    x[200] = np.nan
    x[400] = np.inf
    assert metrics.detect_spikes(x).size == 0
    assert metrics.detect_divergence(x) == 200
    assert metrics.detect_divergence([np.nan, 1.0]) == 0  # no grace for non-finite


def test_divergence_above_initial():
    x = _clean_curve()
    assert metrics.detect_divergence(x) is None
    x[3] = 10.0  # inside the grace period: noise, not divergence
    assert metrics.detect_divergence(x) is None
    assert metrics.detect_divergence(x, grace=0) == 3
    x[450:] = np.linspace(2.0, 8.0, 150)  # blows up past the start (~5.0)
    first = int(np.flatnonzero(x[450:] > x[0])[0]) + 450
    assert metrics.detect_divergence(x) == first
    assert metrics.detect_divergence(x, initial_loss=100.0) is None


def test_plateau():
    rng = np.random.default_rng(1)
    x = np.concatenate([np.linspace(5.0, 3.0, 200), 3.0 + 0.01 * rng.random(300)])
    start = metrics.detect_plateau(x, window=100, min_improvement=0.01)
    assert 190 <= start <= 200
    assert metrics.detect_plateau(np.linspace(5.0, 1.0, 500), window=100) is None
    assert metrics.detect_plateau(np.full(300, 2.0), window=100) == 0
    assert metrics.detect_plateau(np.full(50, 2.0), window=100) is None
    # a flat stretch followed by progress is not a plateau
    y = np.concatenate([np.full(200, 5.0), np.linspace(5.0, 2.0, 300)])
    assert metrics.detect_plateau(y, window=100) is None
