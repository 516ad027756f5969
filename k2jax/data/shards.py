"""llm.c / modded-nanogpt token shards: 256 int32 header, then uint16 tokens.

Header (little-endian int32): [0] magic 20240520, [1] version 1, [2] token count;
the rest zero. Many Muon researchers hold FineWeb in this format
(K. Jordan's modded-nanogpt ``data/``; A. Karpathy's llm.c ``dev/data``).
Shards are read memory-mapped, so a 100M-token shard costs nothing until read.
"""

from __future__ import annotations

import os

import numpy as np

from k2jax.data.errors import DataError

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write ``tokens`` (ints < 65536) as a .bin shard; refuses to overwrite a file."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must be in [0, 65535] for uint16 shards")
    header = np.zeros(HEADER_INTS, "<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with open(path, "xb") as f:  # "x": never overwrite an existing shard silently
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-mapped uint16 tokens of a .bin shard, after checking its header and size."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such shard file")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, "<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if size != expected:
        raise DataError(f"{path}: header says {n} tokens ({expected} bytes) but the file has "
                        f"{size} bytes (truncated or corrupted)")
    return np.memmap(path, "<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
