"""Data: tokenizers, token sources (built-in corpus, text files, llm.c shards), grain pipelines."""

from k2jax.data.errors import DataError
from k2jax.data.pipeline import make_dataset, make_iterator
from k2jax.data.shards import read_shard, write_shard
from k2jax.data.sources import load_tokens, stdlib_files
from k2jax.data.tokenizers import BPETokenizer, ByteTokenizer, make_tokenizer

__all__ = [
    "BPETokenizer", "ByteTokenizer", "DataError", "load_tokens", "make_dataset",
    "make_iterator", "make_tokenizer", "read_shard", "stdlib_files",
    "write_shard",
]
