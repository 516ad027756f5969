"""What a run's data must hold before its first step, checked without building a batch.

The tokens read here are the ones the run then trains on: :func:`load_tokens` caches
them per (config, split) in the process, so the check moves the loading earlier and
adds only the shards' max token id.
"""

from __future__ import annotations

from k2jax.config import DataConfig
from k2jax.data.errors import DataError
from k2jax.data.pipeline import make_dataset
from k2jax.data.shards import read_shard
from k2jax.data.sources import expand, load_tokens

SHARD_ID_LIMIT = 2**16  # uint16 shards hold no larger id


def check(cfg: DataConfig, *, vocab_size: int, splits=("train",)) -> None:
    """Raise DataError (one line) unless each split in ``splits`` reads (UTF-8 text,
    well-formed shards), holds one global batch in every process's share, and has
    every token id below ``vocab_size``: an id past the embedding table makes every
    step's loss NaN, with no error anywhere."""
    for split in splits:
        try:
            stream, tok = load_tokens(cfg, split)
            make_dataset(cfg, split, stream=stream)
        except DataError as e:
            if split == "train":
                raise
            raise DataError(f"{e} (evaluation data; train.eval_batches=0 runs without "
                            f"it)") from None
        if cfg.source == "shards":
            check_shard_ids(cfg.paths if split == "train" else cfg.val_paths, vocab_size)
        elif tok.vocab_size > vocab_size:
            raise DataError(f"model.vocab_size={vocab_size} is smaller than the {tok.name} "
                            f"tokenizer's {tok.vocab_size}")


def check_shard_ids(patterns: tuple[str, ...], vocab_size: int) -> None:
    """Every shard's largest token id is < ``vocab_size`` (a memory-mapped max per shard)."""
    if vocab_size >= SHARD_ID_LIMIT:
        return
    for _, path in expand(patterns):
        tokens = read_shard(path)
        top = int(tokens.max()) if tokens.size else -1
        if top >= vocab_size:
            raise DataError(f"{path}: token id {top} >= model.vocab_size={vocab_size} (no "
                            f"embedding row for it: every step's loss would be NaN)")
