"""Host-side metrics: metrics.jsonl + TensorBoard writers, analytic FLOPs / MFU, loss-curve checks.

All of it runs outside ``jax.jit``. The jsonl file is the record of truth (read by
notebooks and tests); TensorBoard is for eyes. The curve checks are pure numpy, so
one code labels live runs, committed results and synthetic test curves alike.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import warnings
from typing import Any

import jax
import numpy as np

from k2jax.config import ModelConfig

# Scalar tags the training loop writes ("XX" = two-digit layer index, see layer_tag).
DOCUMENTED_TAGS: dict[str, str] = {
    "train/loss": "total training loss minimised (ce + z_loss + any aux loss)",
    "train/ce": "next-token cross-entropy, nats per token",
    "train/z_loss": "mean log(Z)^2 over tokens, before its weight (PaLM §5 z-loss)",
    "train/lr": "learning rate applied this step",
    "train/grad_norm": "global L2 norm of the gradient, before clipping",
    "train/update_rms/muon": "RMS of the parameter update over Muon-owned matrices",
    "train/update_rms/adamw": "RMS of the parameter update over AdamW-owned parameters",
    "attn/max_logit": "max pre-softmax attention logit over all layers and heads",
    "attn/max_logit/layer_XX": "max pre-softmax attention logit over the heads of layer XX",
    "qk_clip/heads_clipped": "number of heads whose max logit exceeded tau (QK-Clip fired)",
    "qk_clip/fraction_clipped": "heads_clipped / (layers * heads)",
    "qk_clip/min_gamma": "smallest QK-Clip factor gamma = min(1, tau / max_logit) this step",
    "moe/load_imbalance": "max/mean tokens per expert, worst MoE layer (1 = balanced)",
    "moe/load_imbalance/layer_XX": "max/mean tokens per expert in MoE layer XX",
    "perf/tokens_per_sec": "global training tokens per second (all devices)",
    "perf/mfu": "model FLOPs utilisation: analytic FLOPs / (peak * devices * time)",
    "train/nonfinite_steps": "steps so far whose loss or gradient was non-finite (update skipped)",
    "eval/loss": "mean next-token cross-entropy on held-out data",
}


def layer_tag(base: str, layer: int) -> str:
    """``layer_tag("attn/max_logit", 3) -> "attn/max_logit/layer_03"``: sorts right in TB."""
    return f"{base}/layer_{layer:02d}"


# ---------------------------------------------------------------------------
# writers


class MetricsWriter:
    """``workdir/metrics.jsonl`` plus TensorBoard events (tensorboardX, no TF) in ``workdir/tb/``.

    Metrics are global, so only process 0 writes (the ``enabled`` default); a
    disabled writer creates no files. jsonl: one ``{"step": int, **scalars}`` per
    :meth:`write_scalars`, python floats; non-finite values become the stdlib json
    ``NaN`` / ``Infinity`` / ``-Infinity`` tokens (not strict JSON, but ``json.loads``
    reads them back exactly: a NaN loss is what must survive). Append mode, flushed
    per line: a resumed run appends, a crash loses at most the line being written.
    A resumed run may repeat steps after its last checkpoint; keep the last.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = os.fspath(workdir)
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "metrics.jsonl")
        self._jsonl = open(path, "a", buffering=1, encoding="utf-8")
        if self._jsonl.tell() > 0:  # a crash may have cut the last line short
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._jsonl.write("\n")
        self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tb"))
        self._arrays: dict[str, Any] = {}

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(step)
        values = {}
        for k, v in scalars.items():
            if np.size(v) != 1:
                raise ValueError(f"write_scalars: {k!r} has shape {np.shape(v)}, want a scalar")
            values[k] = float(np.asarray(v).reshape(()))
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        for tag, v in values.items():
            self._tb.add_scalar(tag, v, global_step=step)

    def write_histogram(self, step: int, tag: str, values) -> None:
        """Histogram of the finite entries (TensorBoard cannot bin NaN); none finite: skipped."""
        if not self.enabled:
            return
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if x.size:
            self._tb.add_histogram(tag, x, global_step=int(step))

    def write_image(self, step: int, tag: str, array_HW, *, vmin: float | None = None,
                    vmax: float | None = None) -> None:
        """A 2-D array (e.g. max logits [layers, heads]) as a viridis heatmap.

        Values are mapped linearly from [vmin, vmax] (default: the array's finite
        min / max) to [0, 1]; non-finite cells show as 0. Pass fixed bounds (e.g.
        vmax = tau) to compare images across steps. Small arrays are upscaled
        (nearest neighbour) to at least 64 px a side so single cells are visible.
        """
        if not self.enabled:
            return
        import matplotlib

        x = np.asarray(array_HW, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"write_image wants a 2-D array, got shape {x.shape}")
        finite = x[np.isfinite(x)]
        lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
        hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
        ok = np.isfinite(x)
        span = hi - lo if hi > lo else 1.0  # a constant image is all 0
        x01 = np.where(ok, np.clip((np.where(ok, x, lo) - lo) / span, 0, 1), 0.0)
        x01 = np.repeat(np.repeat(x01, max(1, 64 // x.shape[0]), 0), max(1, 64 // x.shape[1]), 1)
        rgb_HWC = matplotlib.colormaps["viridis"](x01)[..., :3].astype(np.float32)
        self._tb.add_image(tag, rgb_HWC, global_step=int(step), dataformats="HWC")

    def write_array(self, step: int, name: str, array) -> None:
        """Append ``{"step", "value": nested list}`` to ``name.jsonl``: small per-step arrays
        such as per-head max logits [layers, heads], for heatmaps over time."""
        if not self.enabled:
            return
        if name not in self._arrays:
            self._arrays[name] = open(os.path.join(self.workdir, f"{name}.jsonl"), "a",
                                      buffering=1, encoding="utf-8")
        value = np.asarray(array, np.float64).tolist()
        self._arrays[name].write(json.dumps({"step": int(step), "value": value}) + "\n")

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()  # jsonl lines are flushed as written

    def close(self) -> None:
        if self.enabled and self._tb is not None:
            self._jsonl.close()
            self._tb.close()
            for f in self._arrays.values():
                f.close()
            self._jsonl = self._tb = None
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl, in file order; lines cut short by a crash are skipped."""
    records, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} malformed line(s)", stacklevel=2)
    return records


# ---------------------------------------------------------------------------
# FLOPs and MFU


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
    kind = device_kind.lower()
    return next((v for key, v in KNOWN_PEAK_FLOPS if key in kind), None)


def _measure_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """Achieved FLOP/s of a jitted n x n matmul on device 0 (f32 on CPU, else bf16): 2n^3 / t."""
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
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1)
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return peak


def mfu(tokens_per_sec: float, flops_per_token: float, peak_per_device: float,
        n_devices: int) -> float:
    """Model FLOPs utilisation (PaLM App. B): model FLOP/s over aggregate peak.

    ``tokens_per_sec`` is global (all devices); rematerialisation is not counted.
    """
    return tokens_per_sec * flops_per_token / (peak_per_device * n_devices)


# ---------------------------------------------------------------------------
# loss-curve checks: the claim under test is MuonClip's pre-training "with zero loss
# spike" (Kimi K2, arXiv 2507.20534, §2.1), so spikes need one precise definition


def detect_spikes(losses, *, ratio: float = 1.5, window: int = 50,
                  warmup: int = 50) -> np.ndarray:
    """Indices i >= warmup with a finite loss[i] > ratio x median(finite losses[i-window:i]).

    A median of the preceding window is robust to earlier spikes, so each spike is
    judged against the trend, not against its neighbours. Non-finite losses are
    never spikes (they are divergence, :func:`detect_divergence`) and are left out
    of the medians. Assumes positive losses (cross-entropy).
    """
    x = np.asarray(losses, dtype=np.float64).ravel()
    n = x.size
    f = np.where(np.isfinite(x), x, np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.concatenate([np.full(window, np.nan), f]), window)[:n]  # row i: f[i-window:i]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows -> NaN, never a spike
        med = np.nanmedian(windows, axis=1)
    spike = np.isfinite(x) & (np.arange(n) >= warmup) & (x > ratio * med)
    return np.flatnonzero(spike)


def detect_divergence(losses, initial_loss: float | None = None, *,
                      grace: int = 10) -> int | None:
    """First index whose loss is non-finite, or (from index ``grace`` on) above the initial loss.

    Initial = ``losses[0]`` unless given. The grace period skips the first noisy
    steps, where a loss may briefly exceed its starting value without anything
    being wrong; a non-finite loss diverges at any step.
    """
    x = np.asarray(losses, dtype=np.float64)
    init = float(x[0]) if initial_loss is None and x.size else initial_loss
    bad = ~np.isfinite(x)
    if init is not None and math.isfinite(init):
        bad |= (np.arange(x.size) >= grace) & (x > init)
    return int(np.argmax(bad)) if bad.any() else None


def detect_plateau(losses, *, window: int = 100, min_improvement: float = 0.01) -> int | None:
    """First step from which the curve has stopped improving, or None.

    With best[i] = min(finite losses[:i+1]) (the rolling minimum), window j is flat
    when best[j] - best[j+window] < min_improvement x |best[j]|: under that relative
    improvement in ``window`` steps. The plateau starts at the first j such that
    every window starting at j or later is flat; so a temporary flat stretch
    followed by progress is not a plateau. None if the last window is not flat or
    the curve is no longer than ``window``.
    """
    x = np.asarray(losses, dtype=np.float64)
    if x.size <= window:
        return None
    best = np.minimum.accumulate(np.where(np.isfinite(x), x, np.inf))
    with np.errstate(invalid="ignore"):
        flat = (best[:-window] - best[window:]) < min_improvement * np.abs(best[:-window])
    if not flat[-1]:
        return None
    not_flat = np.flatnonzero(~flat)
    return int(not_flat[-1] + 1) if not_flat.size else 0
