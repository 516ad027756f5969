"""Tiny training runs shared by the tests of the step, the loop and the CLI."""

import os

from k2jax import presets
from k2jax.metrics import read_jsonl

BASE = ["model.num_hidden_layers=2", "data.seq_len=32", "data.global_batch_size=8",
        "optimizer.qk_clip=true", "optimizer.lr=0.01", "optimizer.warmup_steps=2",
        "train.eval_every=1000", "train.eval_batches=2", "train.checkpoint_every=1000",
        "train.peak_flops=1e11"]


def tiny(*extra):
    """MuonClip on the tiny preset, 2 layers, 8 x 32 tokens per step."""
    return presets.load("tiny", [*BASE, *extra])


def losses(workdir, key="train/loss"):
    return [r[key] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if key in r]


def deterministic(rows):
    """metrics.jsonl rows without the wall-clock ``perf/*`` entries."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
