"""Grain pipelines: packed fixed-length sequences, deterministic shuffle, per-process shares.

A sequence is a window of ``seq_len + 1`` consecutive tokens (inputs and
targets shifted by one); documents are packed back to back with <eos>
between them. The order is a grain shuffle of window indices from
``data.seed``, reshuffled every epoch, identical in every run and process.
Step s takes windows [s·G, (s+1)·G) of that order (G = global batch) and
process p of P reads rows [p·G/P, (p+1)·G/P) of it, so the P shares are
disjoint and together are exactly what one process would read.

The iterator is grain's: ``get_state()`` / ``set_state()`` give a small JSON-able
state that the checkpoint stores, so a resumed run sees the same batches.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from k2jax.config import DataConfig
from k2jax.data.errors import DataError
from k2jax.data.sources import TokenStream, load_tokens


def make_dataset(cfg: DataConfig, split: str = "train", *, process_index: int | None = None,
                 process_count: int | None = None, stream: TokenStream | None = None):
    """(grain IterDataset of {"inputs", "targets"} int32 [G/P, seq_len] batches, tokenizer).

    ``train`` repeats forever; ``validation`` is one deterministic pass in file order.
    """
    tok = None
    if stream is None:
        stream, tok = load_tokens(cfg, split)
    pc = jax.process_count() if process_count is None else process_count
    pi = jax.process_index() if process_index is None else process_index
    g, t = cfg.global_batch_size, cfg.seq_len
    if g % pc:
        raise DataError(f"data.global_batch_size={g} is not divisible by {pc} processes")
    if not 0 <= pi < pc:
        raise DataError(f"process_index={pi} is not in [0, {pc})")
    n = stream.num_sequences(t)
    if n == 0:
        raise DataError(f"{stream.name}: {stream.num_tokens()} tokens is smaller than one "
                        f"sequence of seq_len={t} + 1")
    if n < g:
        raise DataError(f"{stream.name}: {n} sequences of {t} tokens is fewer than one global "
                        f"batch of {g}")
    per = g // pc
    order = grain.MapDataset.range(n)
    if split == "train":
        order = order.shuffle(seed=cfg.seed).repeat(None)
    batches = order.batch(g, drop_remainder=True)

    def read(global_indices):
        w = stream.windows(np.asarray(global_indices)[pi * per:(pi + 1) * per], t)
        return {"inputs": w[:, :-1], "targets": w[:, 1:]}

    ds = batches.map(read).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
    return ds, tok


def make_iterator(cfg: DataConfig, split: str = "train", **kwargs):
    """(checkpointable iterator, tokenizer)."""
    ds, tok = make_dataset(cfg, split, **kwargs)
    return iter(ds), tok
