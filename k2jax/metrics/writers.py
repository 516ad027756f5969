"""What a run records: ``metrics.jsonl`` + TensorBoard events, and the scalar tags written.

The jsonl file is the record of truth (notebooks, tests and the sweep summaries
read it back with :func:`read_jsonl`); TensorBoard is for eyes.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any

import jax
import numpy as np
from tensorboardX import SummaryWriter

from k2jax import atomic

# Every scalar tag the training loop writes ("XX" = two-digit index, see layer_tag).
DOCUMENTED_TAGS: dict[str, str] = {
    "train/loss": "total training loss minimised (ce + z_loss + any aux loss)",
    "train/ce": "next-token cross-entropy, nats per token",
    "train/z_loss": "mean log(Z)^2 over tokens, before its weight (PaLM §5 z-loss)",
    "train/lr": "learning rate applied this step",
    "train/grad_norm": "global L2 norm of the gradient, before clipping",
    "train/update_rms/muon": "RMS of the parameter update over Muon-owned matrices",
    "train/update_rms/adamw": "RMS of the parameter update over AdamW-owned parameters",
    "train/nonfinite_steps": "steps so far whose loss or gradient was non-finite (update skipped)",
    "attn/max_logit": "max pre-softmax attention logit over all layers and heads",
    "attn/max_logit/layer_XX": "max pre-softmax attention logit over the heads of layer XX",
    "qk_clip/heads_clipped": "number of heads whose max logit exceeded tau (QK-Clip fired)",
    "qk_clip/fraction_clipped": "heads_clipped / (layers * heads)",
    "qk_clip/fraction_ever_clipped": "fraction of heads QK-Clip has fired on at least once so far",
    "qk_clip/min_gamma": "smallest QK-Clip factor gamma = min(1, tau / max_logit) this step",
    "moe/load_imbalance": "max/mean tokens per expert, worst MoE layer (1 = balanced)",
    "moe/load_imbalance/layer_XX": "max/mean tokens per expert in the XX-th MoE layer "
                                   "(counting MoE layers only, from 00)",
    "perf/tokens_per_sec": "global training tokens per second (all devices)",
    "perf/mfu": "model FLOPs utilisation: analytic FLOPs / (peak * devices * time)",
    "eval/loss": "mean next-token cross-entropy on held-out data",
}


def layer_tag(base: str, layer: int) -> str:
    """``layer_tag("attn/max_logit", 3) -> "attn/max_logit/layer_03"``: two digits, so
    TensorBoard's string sort is layer order (for up to 100 layers; Kimi K2 has 61)."""
    return f"{base}/layer_{layer:02d}"


class MetricsWriter:
    """``workdir/metrics.jsonl`` plus TensorBoard events (tensorboardX, no TF) in ``workdir/tb/``.

    Metrics are global, so only process 0 writes (the ``enabled`` default); a
    disabled writer creates no files. jsonl: one ``{"step": int, **scalars}`` per
    :meth:`write_scalars`, python floats; non-finite values become the stdlib json
    ``NaN`` / ``Infinity`` / ``-Infinity`` tokens (not strict JSON, but ``json.loads``
    reads them back exactly: a NaN loss is what must survive). Append mode, flushed
    per line: a resumed run appends, a crash loses at most the line being written.

    ``resume_from=S`` (a run resumed from step S's checkpoint) first drops the records of
    steps after S from :attr:`RECORDS` (``metrics.jsonl`` and the loop's
    ``max_logits.jsonl``) and tells TensorBoard to purge its events
    from step S+1 (``purge_step``): the resumed run writes those steps again, so each step
    appears once however often the run is interrupted. ``dropped`` counts the records.
    """

    RECORDS = ("metrics.jsonl", "max_logits.jsonl")  # the step records a resume trims

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool | None = None,
                 resume_from: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = os.fspath(workdir)
        self._jsonl = self._tb = None
        self.dropped = 0
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_from is not None:
            self.dropped = sum(_drop_after(path, resume_from) for name in self.RECORDS
                               if os.path.isfile(path := os.path.join(self.workdir, name)))
        self._jsonl = _open_append(os.path.join(self.workdir, "metrics.jsonl"))
        self._tb = SummaryWriter(  # a unique file: tensorboardX names it by the second
            logdir=os.path.join(self.workdir, "tb"), filename_suffix=f".{time.time_ns()}",
            purge_step=None if resume_from is None else resume_from + 1)
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

    def write_image(self, step: int, tag: str, array_2d, *, vmin: float | None = None,
                    vmax: float | None = None) -> None:
        """A 2-D array (e.g. max logits [layers, heads]) as a viridis heatmap.

        Values are mapped linearly from [vmin, vmax] (default: the array's finite
        min / max) to [0, 1]; non-finite cells show as 0. Pass fixed bounds (e.g.
        vmax = tau) to compare images across steps. Small arrays are upscaled
        (nearest neighbour) to at least 64 px a side so single cells are visible.
        """
        if not self.enabled:
            return
        import matplotlib  # optional heavy import, deferred until an image is drawn

        x = np.asarray(array_2d, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"write_image wants a 2-D array, got shape {x.shape}")
        finite = x[np.isfinite(x)]
        lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
        hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
        ok = np.isfinite(x)
        span = hi - lo if hi > lo else 1.0  # a constant image is all 0
        x01 = np.where(ok, np.clip((np.where(ok, x, lo) - lo) / span, 0, 1), 0.0)
        x01 = np.repeat(np.repeat(x01, max(1, 64 // x.shape[0]), 0), max(1, 64 // x.shape[1]), 1)
        rgb = matplotlib.colormaps["viridis"](x01)[..., :3].astype(np.float32)
        self._tb.add_image(tag, rgb, global_step=int(step), dataformats="HWC")

    def write_array(self, step: int, name: str, array) -> None:
        """Append ``{"step", "value": nested list}`` to ``name.jsonl``: small per-step arrays
        such as per-head max logits [layers, heads], for heatmaps over time."""
        if not self.enabled:
            return
        if name not in self._arrays:
            self._arrays[name] = _open_append(os.path.join(self.workdir, f"{name}.jsonl"))
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


def _open_append(path: str):
    """``path`` opened to append lines; a last line a crash cut short is ended first, so
    the next record starts on its own line."""
    f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (the writer owns it)
    if f.tell() > 0:
        with open(path, "rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write("\n")
    return f


def _drop_after(path: str, step: int) -> int:
    """Rewrite ``path`` (atomically) without the records of steps after ``step`` (and
    without lines a crash cut short); returns how many records were dropped."""
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
        try:
            s = json.loads(ln).get("step", step)
        except (json.JSONDecodeError, AttributeError):
            continue  # cut short by a crash
        if not isinstance(s, int) or s <= step:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if keep != lines:
        atomic.write_text(path, "".join(keep))
    return len(lines) - len(keep)


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
