import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from k2jax import config, data
from k2jax.config import DataConfig
from k2jax.data import sources
from k2jax.data.errors import DataError

SMALL = DataConfig(seq_len=64, global_batch_size=8, seed=3)


def _digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(np.ascontiguousarray(b["inputs"]).tobytes())
        h.update(np.ascontiguousarray(b["targets"]).tobytes())
    return h.hexdigest()


_SCRIPT = """
import hashlib, sys, numpy as np
from k2jax import data
from k2jax.config import DataConfig
it, _ = data.make_iterator(DataConfig(seq_len=64, global_batch_size=8, seed=int(sys.argv[1])))
h = hashlib.sha256()
for _ in range(5):
    b = next(it)
    h.update(np.ascontiguousarray(b["inputs"]).tobytes())
print(h.hexdigest())
"""


def _fresh_process_digest(seed: int) -> str:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, str(seed)], capture_output=True,
                         text=True, check=True, cwd=os.getcwd(),
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return out.stdout.strip()


def test_same_seed_same_batches_across_fresh_processes():
    a, b, c = _fresh_process_digest(3), _fresh_process_digest(3), _fresh_process_digest(4)
    assert a == b and a != c


def test_targets_are_inputs_shifted_and_text_is_real():
    it, tok = data.make_iterator(SMALL)
    b = next(it)
    assert b["inputs"].shape == (8, 64) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    text = tok.decode(b["inputs"].ravel())
    assert sum(ch.isalpha() for ch in text) > len(text) / 3


def test_restored_iterator_continues_exactly():
    it, _ = data.make_iterator(SMALL)
    for _ in range(7):
        next(it)
    state = it.get_state()
    want = _digest(next(it) for _ in range(6))
    it2, _ = data.make_iterator(SMALL)
    it2.set_state(state)
    assert _digest(next(it2) for _ in range(6)) == want
    import json
    json.dumps(state)  # small and serialisable: the checkpoint stores it


def test_epochs_reshuffle_and_cover_everything(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("".join(chr(97 + i % 26) for i in range(8 * 16 * 4 + 10)))
    # the split hashes the file's path (a tmp dir): at 0.001 one run in a thousand would
    # put the only file in validation; 1e-9 never does in practice
    cfg = DataConfig(source="text", paths=(str(f),), seq_len=16, global_batch_size=8,
                     val_fraction=1e-9)
    stream, _ = sources.load_tokens(cfg)
    n = stream.num_sequences(16)
    it, _ = data.make_iterator(cfg)
    rows = [tuple(r) for _ in range(2 * n // 8) for r in next(it)["inputs"]]
    epoch1, epoch2 = rows[:n], rows[n:2 * n]
    all_windows = {tuple(w[:-1]) for w in stream.windows(np.arange(n), 16)}
    assert set(epoch1) == all_windows and set(epoch2) == all_windows
    assert epoch1 != epoch2


def test_two_processes_split_the_global_batch():
    one, _ = data.make_iterator(SMALL, process_index=0, process_count=1)
    p0, _ = data.make_iterator(SMALL, process_index=0, process_count=2)
    p1, _ = data.make_iterator(SMALL, process_index=1, process_count=2)
    for _ in range(4):
        full, a, b = next(one)["inputs"], next(p0)["inputs"], next(p1)["inputs"]
        assert a.shape == b.shape == (4, 64)
        assert not {tuple(r) for r in a} & {tuple(r) for r in b}
        np.testing.assert_array_equal(np.concatenate([a, b]), full)
    with pytest.raises(DataError, match="not divisible by 3 processes"):
        data.make_iterator(SMALL, process_index=0, process_count=3)


def test_builtin_corpus_split_has_no_overlap():
    files = sources.stdlib_files()
    assert len(files) > 500
    val = {n for n, _ in files if sources.is_validation(n, 0.02)}
    train = {n for n, _ in files if not sources.is_validation(n, 0.02)}
    assert val and train and not val & train and len(val) < len(files) * 0.05
    assert sources.is_validation("json/decoder.py", 0.5) == sources.is_validation(
        "json/decoder.py", 0.5)
    t, _ = sources.load_tokens(DataConfig(), "train")
    v, _ = sources.load_tokens(DataConfig(), "validation")
    assert t.num_tokens() > 20 * v.num_tokens() > 0


def test_validation_is_finite_and_deterministic():
    a = list(data.make_dataset(SMALL, "validation")[0])
    b = list(data.make_dataset(SMALL, "validation")[0])
    assert len(a) > 3 and _digest(a) == _digest(b)


def test_shard_round_trip_and_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    toks = [rng.integers(0, 50000, size=n) for n in (1000, 777)]
    paths = []
    for i, t in enumerate(toks):
        paths.append(str(tmp_path / f"train_{i:03d}.bin"))
        data.write_shard(paths[-1], t)
    data.write_shard(tmp_path / "val_000.bin", toks[0][:300])
    np.testing.assert_array_equal(data.read_shard(paths[1]), toks[1])
    cfg = DataConfig(source="shards", paths=(str(tmp_path / "train_*.bin"),),
                     val_paths=(str(tmp_path / "val_*.bin"),), seq_len=50, global_batch_size=4)
    it, _ = data.make_iterator(cfg)
    b = next(it)
    corpus = {tuple(t[i:i + 51]) for t in toks for i in range(0, len(t) - 50, 50)}
    for x, y in zip(b["inputs"], b["targets"]):
        assert tuple(x) + (y[-1],) in corpus
    assert len(list(data.make_dataset(cfg, "validation")[0])) == 1
    with pytest.raises(FileExistsError):
        data.write_shard(paths[0], toks[0])  # never overwrite silently


def test_shard_corruption_is_rejected(tmp_path):
    good = tmp_path / "good.bin"
    data.write_shard(good, np.arange(100))
    raw = good.read_bytes()
    bad_magic = tmp_path / "magic.bin"
    bad_magic.write_bytes(b"\x00\x00\x00\x00" + raw[4:])
    with pytest.raises(DataError, match=r"magic.bin: bad magic 0"):
        data.read_shard(bad_magic)
    truncated = tmp_path / "trunc.bin"
    truncated.write_bytes(raw[:-10])
    with pytest.raises(DataError, match=r"trunc.bin: header says 100 tokens .*truncated"):
        data.read_shard(truncated)
    short = tmp_path / "short.bin"
    short.write_bytes(raw[:100])
    with pytest.raises(DataError, match="short.bin: 100 bytes is shorter"):
        data.read_shard(short)


def test_bpe_round_trips_and_is_cached(tmp_path):
    texts = ["def f(x):\n    return x * 2  # doubled\n", "naïve café — ünïcödé ✓\n",
             "for i in range(10):\n    print(i, f(i))\n"] * 20
    tok = data.BPETokenizer.train(texts, vocab_size=320)
    for text in texts[:3] + ["unseen: λx. x + 1 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size <= 320 and tok.eos_id is not None
    for i, t in enumerate(texts[:3]):
        (tmp_path / f"doc{i}.txt").write_text(t * 30)
    cfg = DataConfig(source="text", paths=(str(tmp_path / "doc*.txt"),), tokenizer="bpe",
                     bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"), seq_len=16,
                     global_batch_size=2, val_fraction=0.001)
    _, tok1 = sources.load_tokens(cfg)
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert any(c.startswith("bpe-") for c in cached) and any(c.startswith("tokens-")
                                                             for c in cached)
    _, tok2 = sources.load_tokens(cfg)
    assert tok2.encode(texts[1]).tolist() == tok1.encode(texts[1]).tolist()


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    s = "héllo\n✓"
    assert tok.decode(tok.encode(s)) == s and tok.vocab_size == 258


def test_bad_inputs_have_one_line_errors(tmp_path):
    def err(**kw):
        with pytest.raises(DataError) as e:
            data.make_iterator(DataConfig(**{"source": "text", "seq_len": 16,
                                             "global_batch_size": 2, "val_fraction": 1e-9,
                                             **kw}))
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "missing.txt: no such file" in err(paths=(str(tmp_path / "missing.txt"),))
    assert "glob matched no files" in err(paths=(str(tmp_path / "*.nothing"),))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1") * 100)
    assert "latin.txt: not UTF-8 text" in err(paths=(str(latin),))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    assert "smaller than one sequence" in err(paths=(str(tiny),))
    with pytest.raises(config.ConfigError, match="data.paths"):
        DataConfig(source="text")
