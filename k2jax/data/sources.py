"""Token sources: the built-in corpus, user text files, and token shards.

The built-in corpus is the running interpreter's standard library (.py files
under ``sysconfig``'s stdlib path, site-packages and the few non-UTF-8 test
modules excluded): ~30 MB of real
text that every Python installation ships, so a study runs on a fresh
machine with no download. Train / validation split *by file*, by a hash of
the file's relative path: stable across runs and machines, no file in both.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import sysconfig

import numpy as np

from k2jax import atomic
from k2jax.config import DataConfig
from k2jax.data.errors import DataError
from k2jax.data.shards import read_shard
from k2jax.data.tokenizers import ByteTokenizer, make_tokenizer


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, absolute path) of every stdlib .py file, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for path in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, root)
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        out.append((rel, path))
    return sorted(out)


def expand(patterns: tuple[str, ...]) -> list[tuple[str, str]]:
    """Files named by paths or globs; a missing path or empty glob is an error."""
    out = []
    for pattern in patterns:
        pattern = os.path.expanduser(pattern)
        if glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not found:
                raise DataError(f"{pattern}: glob matched no files")
        elif os.path.isfile(pattern):
            found = [pattern]
        elif os.path.isdir(pattern):
            raise DataError(f"{pattern}: is a directory; name files or a glob, e.g. {pattern}/*")
        else:
            raise DataError(f"{pattern}: no such file")
        out.extend((p, p) for p in found)
    return out


def is_validation(name: str, fraction: float) -> bool:
    """Stable per-file split: the first 8 hex digits of sha1(name) as a number in [0, 1)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def read_text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


class TokenStream:
    """Token arrays (one per document group or shard), cut into windows of seq_len + 1."""

    def __init__(self, arrays: list[np.ndarray], name: str):
        self.arrays = [a for a in arrays if len(a)]
        self.name = name

    def num_tokens(self) -> int:
        return sum(len(a) for a in self.arrays)

    def counts(self, seq_len: int) -> np.ndarray:
        return np.array([(len(a) - 1) // seq_len for a in self.arrays], np.int64)

    def num_sequences(self, seq_len: int) -> int:
        return int(self.counts(seq_len).sum())

    def windows(self, indices, seq_len: int) -> np.ndarray:
        """[len(indices), seq_len + 1] int32: window i starts at token i·seq_len of its array."""
        ends = np.cumsum(self.counts(seq_len))
        out = np.empty((len(indices), seq_len + 1), np.int32)
        for row, i in enumerate(np.asarray(indices)):
            a = int(np.searchsorted(ends, i, side="right"))
            start = (int(i) - (int(ends[a - 1]) if a else 0)) * seq_len
            out[row] = self.arrays[a][start:start + seq_len + 1]
        return out


def _is_utf8(path: str) -> bool:
    try:
        read_text(path)
        return True
    except DataError:
        return False


def _text_corpus(cfg: DataConfig) -> list[tuple[str, str]]:
    """Files of the corpus. The stdlib ships a few deliberately non-UTF-8 test modules
    (test/encoded_modules): those are left out; in user text they are an error."""
    if cfg.source == "stdlib":
        return [(n, p) for n, p in stdlib_files() if _is_utf8(p)]
    return expand(cfg.paths)


def _corpus_hash(files: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, path in files:
        h.update(name.encode())
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def load_tokens(cfg: DataConfig, split: str = "train"):
    """(TokenStream, tokenizer) for ``split`` in {"train", "validation"}.

    Text: each file is encoded and followed by <eos>, files concatenated in sorted order.
    Shards: ``paths`` (train) / ``val_paths`` (validation), read memory-mapped.
    Cached per (config, split) in the process: evaluation and sweeps reuse the tokens.
    """
    if split not in ("train", "validation"):
        raise DataError(f"unknown split {split!r} (have train, validation)")
    if cfg.source == "shards":
        patterns = cfg.paths if split == "train" else cfg.val_paths
        if not patterns:
            raise DataError("data.val_paths: shards need validation shards for evaluation")
        arrays = [read_shard(path) for _, path in expand(patterns)]
        return TokenStream(arrays, f"shards:{split}"), ByteTokenizer()
    files = _text_corpus(cfg)
    if not files:
        raise DataError(f"{cfg.source}: found no text files")
    chosen = [(n, p) for n, p in files if is_validation(n, cfg.val_fraction) == (split != "train")]
    if not chosen:
        raise DataError(f"{cfg.source}: no files in the {split} split "
                        f"(val_fraction={cfg.val_fraction}, {len(files)} files)")
    corpus_hash = _corpus_hash(files)
    train_texts = lambda: (read_text(p) for n, p in files  # noqa: E731
                           if not is_validation(n, cfg.val_fraction))
    tok = make_tokenizer(cfg.tokenizer, texts_fn=train_texts, corpus_hash=corpus_hash,
                         vocab_size=cfg.bpe_vocab_size, cache_dir=cfg.cache_dir)
    if cfg.tokenizer == "byte":
        tokens = _encode_files(chosen, tok)
    else:  # BPE encoding of ~30 MB takes a while: cache the token array
        cache = os.path.join(os.path.expanduser(cfg.cache_dir),
                             f"tokens-{corpus_hash[:16]}-bpe{cfg.bpe_vocab_size}-"
                             f"{cfg.val_fraction}-{split}.npy")
        if os.path.exists(cache):
            tokens = np.load(cache, mmap_mode="r")
        else:
            tokens = _encode_files(chosen, tok)
            with atomic.file(cache) as tmp:
                np.save(tmp, tokens)
    return TokenStream([tokens], f"{cfg.source}:{split}"), tok


def _encode_files(files: list[tuple[str, str]], tok) -> np.ndarray:
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
    parts = []
    for _, path in files:
        parts.append(tok.encode(read_text(path)).astype(dtype))
        parts.append(np.array([tok.eos_id], dtype))
    return np.concatenate(parts)
