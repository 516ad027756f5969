"""Data pipeline throughput on the built-in corpus, against what training consumes.

    python -m benchmarks.bench_data [--batches 500] [--seq-len 128] [--batch 32]

Times the first batch (corpus read + tokenise + pipeline start) and then
tokens/s over ``--batches`` batches of the training iterator, consumed as
fast as possible (the prefetch threads stay ahead of a step that is slower).
``--bpe`` also times training the BPE tokenizer on the corpus and encoding it.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time

from k2jax import data
from k2jax.config import DataConfig


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=500)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bpe", action="store_true")
    args = ap.parse_args(argv)
    cfg = DataConfig(seq_len=args.seq_len, global_batch_size=args.batch)
    t0 = time.perf_counter()
    it, _ = data.make_iterator(cfg)
    next(it)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t0
    tokens = args.batches * args.batch * args.seq_len
    print(f"byte tokenizer, batch {args.batch} x {args.seq_len}: first batch {first:.2f} s, "
          f"then {tokens / dt:,.0f} tokens/s ({args.batches / dt:,.0f} batches/s)")
    if args.bpe:
        cache = tempfile.mkdtemp()
        try:
            bpe = DataConfig(seq_len=args.seq_len, global_batch_size=args.batch,
                             tokenizer="bpe", cache_dir=cache)
            t0 = time.perf_counter()
            it, tok = data.make_iterator(bpe)
            next(it)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            it, tok = data.make_iterator(bpe)
            next(it)
            warm = time.perf_counter() - t0
            print(f"bpe (vocab {tok.vocab_size}): train + encode + first batch {cold:.1f} s "
                  f"cold, {warm:.2f} s from cache")
        finally:
            shutil.rmtree(cache)


if __name__ == "__main__":
    main()
