"""k2jax.atomic: a write appears whole or not at all, and a finished result is never
overwritten."""

import os

import pytest

from k2jax import atomic


def test_file_replaces_whole_or_leaves_the_old_one(tmp_path):
    path = tmp_path / "cache.npy"
    path.write_text("old")
    with atomic.file(path) as tmp:
        assert tmp != str(path) and tmp.endswith(".npy")  # np.save keeps the name
        with open(tmp, "w") as f:
            f.write("new")
        assert path.read_text() == "old"  # nothing visible before the block ends
    assert path.read_text() == "new"
    with pytest.raises(RuntimeError), atomic.file(path) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["cache.npy"]


def test_occupied_says_why(tmp_path):
    assert atomic.occupied(tmp_path / "absent") is None
    assert atomic.occupied(tmp_path) is None  # empty
    (tmp_path / "f").write_text("x")
    assert "not empty" in atomic.occupied(tmp_path)
    assert "not a directory" in atomic.occupied(tmp_path / "f")


def test_directory_appears_whole_and_never_overwrites(tmp_path):
    out = tmp_path / "ckpt"
    with atomic.directory(out) as tmp:
        (tmp_path / tmp / "a.txt").write_text("a")
        assert not out.exists()
    assert sorted(os.listdir(out)) == ["a.txt"] and os.listdir(tmp_path) == ["ckpt"]
    with pytest.raises(FileExistsError, match="not empty"), atomic.directory(out):
        pass
    assert sorted(os.listdir(out)) == ["a.txt"]
    with pytest.raises(RuntimeError), atomic.directory(tmp_path / "other") as tmp:
        (tmp_path / tmp / "b.txt").write_text("b")
        raise RuntimeError("crash mid-save")
    assert os.listdir(tmp_path) == ["ckpt"]  # no half directory, no temp left
