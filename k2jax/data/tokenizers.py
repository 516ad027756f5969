"""Tokenizers behind one small interface: ``encode``, ``decode``, ``vocab_size``, ``eos_id``.

- :class:`ByteTokenizer` (default): UTF-8 bytes 0..255 plus <eos> = 256 and <pad> = 257.
  Nothing to train or download; loss is in nats per byte.
- :class:`BPETokenizer`: byte-level BPE trained on the corpus with Hugging Face
  ``tokenizers`` and cached under ``cache_dir`` keyed by corpus hash and vocab size.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from k2jax import atomic
from k2jax.data.errors import DataError

EOS, PAD = "<|endoftext|>", "<|pad|>"


class ByteTokenizer:
    name = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in np.asarray(ids).ravel() if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation); ids < 256 are not bytes here."""

    name = "bpe"

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.token_to_id(EOS)
        self.pad_id = tokenizer.token_to_id(PAD)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> BPETokenizer:
        try:
            return cls(Tokenizer.from_file(path))
        except Exception as e:  # noqa: BLE001 - the library raises its own exception type
            raise DataError(f"{path}: not a readable tokenizer file ({e})") from None

    def save(self, path: str) -> None:
        with atomic.file(path) as tmp:  # concurrent processes never see half a file
            self._tok.save(tmp)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch(texts)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).ravel()])


def make_tokenizer(kind: str, *, texts_fn=None, corpus_hash: str = "", vocab_size: int = 4096,
                   cache_dir: str = "~/.cache/k2jax"):
    """The configured tokenizer; a BPE is trained once per (corpus, vocab size) and cached."""
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise DataError(f"unknown tokenizer {kind!r} (have byte, bpe)")
    directory = os.path.expanduser(cache_dir)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"bpe-{corpus_hash[:16]}-{vocab_size}.json")
    if os.path.exists(path):
        return BPETokenizer.load(path)
    tok = BPETokenizer.train(texts_fn(), vocab_size)
    tok.save(path)
    return tok
