"""Analytic training FLOPs per token, peak FLOP/s per chip, and MFU (PaLM App. B).

MFU counts the FLOPs the model needs, not those the hardware ran, so it is
comparable across implementations: rematerialisation and padding do not raise it.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax

from k2jax import atomic
from k2jax.config import ModelConfig


def flops_breakdown(cfg: ModelConfig, seq_len: int, *, causal: bool = False) -> dict[str, float]:
    """Training FLOPs per token by part: 3 x forward (backward = 2 x forward), forward = 2 x MACs.

    This is the 6N + attention count of Kaplan et al. 2020 (arXiv 2001.08361, §2.1)
    and PaLM (Chowdhery et al. 2022, arXiv 2204.02311, App. B), with N the matmul
    weights a token actually passes through (so for MoE: the router,
    ``num_experts_per_tok`` routed and all shared experts). The embedding lookup is
    a gather, not a matmul, and is not counted; the LM head is. Norms, RoPE,
    softmax and SwiGLU's elementwise ops are ignored, as in both papers.

    Attention scores (q.k) and values (p.v) cost T x (per-head widths) MACs per
    token per head. By default T is the full ``seq_len``, as PaLM's 12·L·H·Q·T term
    counts it, so MFU compares with published numbers (and matches what k2jax's
    masked dense attention executes); ``causal=True`` uses the causal average T/2.
    """
    d, h, n_layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    t_eff = seq_len / 2 if causal else seq_len
    if cfg.attention == "mla":
        nope, rope, v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = (d * cfg.q_lora_rank + cfg.q_lora_rank * h * (nope + rope) if cfg.q_lora_rank
             else d * h * (nope + rope))
        proj = q + d * (cfg.kv_lora_rank + rope) + cfg.kv_lora_rank * h * (nope + v) + h * v * d
        attn = t_eff * h * (nope + rope) + t_eff * h * v
    else:
        hd, hkv = cfg.mha_head_dim, cfg.kv_heads
        proj = d * h * hd + 2 * d * hkv * hd + h * hd * d
        attn = 2 * t_eff * h * hd
    dense = 3 * d * cfg.intermediate_size
    moe = (d * cfg.n_routed_experts
           + (cfg.num_experts_per_tok + cfg.n_shared_experts) * 3 * d * cfg.moe_intermediate_size)
    macs = {
        "attn_proj": n_layers * proj,
        "attention": n_layers * attn,
        "mlp": cfg.first_k_dense_replace * dense + cfg.num_moe_layers * moe,
        "lm_head": d * cfg.vocab_size,
    }
    return {k: 6.0 * v for k, v in macs.items()}


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = False) -> float:
    """Training (forward + backward) FLOPs per token; see :func:`flops_breakdown`."""
    return sum(flops_breakdown(cfg, seq_len, causal=causal).values())


# Dense (no structured sparsity) bf16 peaks per chip, matched as substrings of the
# lower-cased jax device_kind, first match wins. Sources: cloud.google.com/tpu/docs/
# {v4,v5e,v5p,v6e}; NVIDIA H100 / H200 (SXM) and A100 datasheets on nvidia.com.
# H100 PCIe (756 TFLOP/s) is not distinguished: an MFU there reads low, never high.
KNOWN_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12), ("v5e", 197e12),
    ("v5p", 459e12), ("tpu v5", 459e12), ("tpu v4", 275e12),
    ("h100", 989e12), ("h200", 989e12), ("a100", 312e12))


def known_peak_flops(device_kind: str) -> float | None:
    """The :data:`KNOWN_PEAK_FLOPS` entry for a jax ``device_kind``, or None if unlisted."""
    kind = device_kind.lower()
    return next((v for key, v in KNOWN_PEAK_FLOPS if key in kind), None)


def _measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a jitted n x n matmul on device 0 (f32 on CPU, else bf16): 2n^3 / t,
    t the median of ``repeats`` timed calls after one untimed (compiling) call."""
    dtype = jax.numpy.float32 if jax.default_backend() == "cpu" else jax.numpy.bfloat16
    a = jax.device_put(jax.numpy.ones((n, n), dtype), jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / statistics.median(times)


def peak_flops_per_device(cache_dir: str = "~/.cache/k2jax",
                          override: float | None = None) -> float:
    """Peak FLOP/s of one device, the MFU denominator.

    ``override`` wins; known accelerators use :data:`KNOWN_PEAK_FLOPS`. A CPU (no
    meaningful spec number) or unknown chip is measured once by
    :func:`_measure_matmul_flops` (~125 GFLOP/s f32 on the 2-core dev box) and cached
    in ``cache_dir/peak_flops.json`` keyed by device kind + jax version + CPU count:
    comparable across runs, no startup cost after the first. A measured peak is an
    achievable one, so CPU MFU reads higher than a spec-sheet MFU would.
    """
    if override is not None:
        return float(override)
    kind = jax.devices()[0].device_kind
    if jax.default_backend() != "cpu" and (peak := known_peak_flops(kind)) is not None:
        return peak
    path = os.path.join(os.path.expanduser(cache_dir), "peak_flops.json")
    key = f"{kind}|jax-{jax.__version__}|cpus-{os.cpu_count()}"
    try:
        with open(path, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return float(cache[key])
    cache[key] = peak = _measure_matmul_flops()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic.write_text(path, json.dumps(cache, indent=1))  # concurrent runs never read half
    return peak


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float,
        n_devices: int) -> float:
    """Model FLOPs utilisation (PaLM App. B): model FLOP/s over aggregate peak.

    ``tokens_per_sec`` is global (all devices); rematerialisation is not counted.
    """
    return tokens_per_sec * flops_per_token / (peak_per_device * n_devices)
