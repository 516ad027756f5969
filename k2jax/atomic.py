"""Writes that never leave half a file and never overwrite a finished result.

A run directory, a cache entry or a saved checkpoint either appears whole or not
at all: it is written under a temporary name beside its destination and moved
into place with one rename (atomic within a filesystem). A crash mid-write leaves
the old file, or nothing, never a truncated one that a later run would trust.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile


@contextlib.contextmanager
def file(path: str | os.PathLike):
    """Yield a temporary path beside ``path`` (same extension); when the block ends
    without error it replaces ``path``, otherwise it is removed. A concurrent reader
    sees the old file or the new one."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def occupied(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot become a new output directory (it is a file, or a directory
    with something in it), or None when it is absent or empty. What a killed run leaves
    before its first real file counts as empty: the ``.lock`` note of its workdir lock
    (k2jax.workdir_lock) and the temporary file of a :func:`file` write (``*.tmpPID*``)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return f"{path} exists and is not a directory"
    leftovers = {n for n in os.listdir(path) if n == ".lock" or re.search(r"\.tmp\d+", n)}
    if set(os.listdir(path)) - leftovers:
        return f"{path} is not empty"
    return None


@contextlib.contextmanager
def directory(path: str | os.PathLike):
    """Yield a temporary directory beside ``path`` that becomes ``path`` when the block
    ends without error (removed otherwise). ``path`` must be absent or empty."""
    path = os.fspath(path)
    if (why := occupied(path)) is not None:
        raise FileExistsError(f"{why}; refusing to overwrite")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)  # empty (checked above)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from other users
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
