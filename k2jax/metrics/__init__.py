"""Host-side metrics: metrics.jsonl + TensorBoard writers, analytic FLOPs / MFU, loss-curve checks.

All of it runs outside ``jax.jit``. The jsonl file is the record of truth (read by
notebooks and tests); TensorBoard is for eyes. The curve checks are pure numpy, so
one code labels live runs, committed results and synthetic test curves alike.

- :mod:`~k2jax.metrics.writers`: what a run records, and the tags it records under.
- :mod:`~k2jax.metrics.flops`: analytic FLOPs per token, peak FLOP/s, MFU.
- :mod:`~k2jax.metrics.curves`: spike / divergence / plateau labels for a loss curve.
"""

from k2jax.metrics.curves import detect_divergence, detect_plateau, detect_spikes
from k2jax.metrics.flops import (
    KNOWN_PEAK_FLOPS,
    flops_breakdown,
    flops_per_token,
    known_peak_flops,
    mfu,
    peak_flops_per_device,
)
from k2jax.metrics.writers import DOCUMENTED_TAGS, MetricsWriter, layer_tag, read_jsonl

__all__ = [
    "DOCUMENTED_TAGS", "KNOWN_PEAK_FLOPS", "MetricsWriter", "detect_divergence",
    "detect_plateau", "detect_spikes", "flops_breakdown", "flops_per_token",
    "known_peak_flops", "layer_tag", "mfu", "peak_flops_per_device", "read_jsonl",
]
