"""metrics.flops: FLOPs per token counted by hand, MFU against PaLM's published number,
the peak-FLOP/s table, measurement and cache."""

import json
import types

import pytest

from k2jax import metrics, params, presets
from k2jax.metrics import flops


def test_flops_tiny_mla_by_hand():
    cfg = presets.preset("tiny")
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
    cfg = presets.preset("tiny", "attention=mha", "num_key_value_heads=2", "head_dim=8")
    T = 32
    per_layer = 64 * 4 * 8 + 64 * 2 * 8 + 64 * 2 * 8 + 4 * 8 * 64 + T * 4 * 8 + T * 4 * 8
    mlp = 3 * 64 * 128 + 64 * 8 + 3 * 3 * 64 * 32
    assert metrics.flops_per_token(cfg, T) == 6 * (2 * per_layer + mlp + 64 * 512)
    cfg2 = presets.preset("tiny", "q_lora_rank=null")
    b1, b2 = metrics.flops_breakdown(presets.preset("tiny"), T), metrics.flops_breakdown(cfg2, T)
    assert b1["attn_proj"] - b2["attn_proj"] == 6 * 2 * (64 * 32 + 32 * 96 - 64 * 96)


def test_flops_kimi_k2_matches_6n_active():
    cfg = presets.preset("kimi-k2")
    _, active = params.count(cfg)
    embed = cfg.vocab_size * cfg.hidden_size  # a gather, not a matmul
    b = metrics.flops_breakdown(cfg, 4096)
    non_attn = sum(v for k, v in b.items() if k != "attention")
    # the only non-matmul params left in `active` are RMSNorm scales (~1M of 32B)
    assert non_attn == pytest.approx(6 * (active - embed), rel=1e-3)
    assert 6 * 31e9 < non_attn < 6 * 32e9  # 32.9B active less the 1.17B embedding


def test_mfu_reproduces_palm_540b():
    # PaLM (arXiv 2204.02311) Table 3 + App. B: 540B params on 6144 TPU v4 chips at
    # 238.3K tokens/s (global) is 46.2% MFU, with 6N + 12·L·H·Q·T FLOPs per token,
    # L=118 layers, H=48 heads, Q=256 head width, T=2048 tokens.
    fpt = 6 * 540e9 + 12 * 118 * 48 * 256 * 2048
    peak = metrics.known_peak_flops("TPU v4")
    assert metrics.mfu(238.3e3, fpt, peak, 6144) == pytest.approx(0.462, abs=5e-4)


def test_mfu_is_one_at_peak_and_linear():
    fpt, peak, n = 3.3e9, 197e12, 8
    at_peak = peak * n / fpt  # tokens/s that would keep every chip at its peak
    assert metrics.mfu(at_peak, fpt, peak, n) == pytest.approx(1.0, rel=1e-12)
    assert metrics.mfu(at_peak / 4, fpt, peak, n) == pytest.approx(0.25, rel=1e-12)
    assert metrics.mfu(at_peak, 2 * fpt, peak, n) == pytest.approx(2.0, rel=1e-12)
    assert metrics.mfu(at_peak, fpt, peak, 2 * n) == pytest.approx(0.5, rel=1e-12)
    assert metrics.mfu(at_peak, fpt, 2 * peak, n) == pytest.approx(0.5, rel=1e-12)


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
    monkeypatch.setattr(flops, "known_peak_flops", lambda kind: None)  # measured on any chip
    monkeypatch.setattr(flops, "_measure_matmul_flops", lambda: calls.append(1) or 1.25e11)
    (tmp_path / "peak_flops.json").write_text(json.dumps({"other chip|jax-0|cpus-1": 7.0}))
    assert metrics.peak_flops_per_device(cache_dir=str(tmp_path)) == 1.25e11
    assert metrics.peak_flops_per_device(cache_dir=str(tmp_path)) == 1.25e11
    assert len(calls) == 1
    cache = json.loads((tmp_path / "peak_flops.json").read_text())
    assert cache.pop("other chip|jax-0|cpus-1") == 7.0  # other machines' entries are kept
    (key, value), = cache.items()
    assert value == 1.25e11 and "jax-" in key and "cpus-" in key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peak_flops.json"]  # no temp file


def test_measure_matmul_flops_is_2n3_over_median_time(monkeypatch):
    # a fake clock: call i takes durations[i] s, so the FLOP/s is known exactly; the
    # median (3) differs from the mean (22.2), the min (1) and the last (2)
    durations = [5.0, 1.0, 3.0, 100.0, 2.0]
    ticks, t = [], 1000.0
    for d in durations:
        ticks += [t, t + d]
        t += d + 7.0
    clock = iter(ticks)
    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    n = 8
    assert flops._measure_matmul_flops(n=n, repeats=len(durations)) == 2 * n**3 / 3.0
    assert next(clock, None) is None  # exactly one start and one stop per repeat
