"""One run per workdir: an exclusive lock that a killed process can never leave stuck.

The lock is an ``flock`` on the workdir itself (its directory file descriptor), so the
kernel drops it the moment its holder dies, SIGKILL included: a stale lock cannot
block. Taking it writes nothing; the holder then writes ``.lock`` (pid, host, start
time), which only serves to name it to a second run. A ``.lock`` left by a killed run
is such a note and nothing more (:func:`k2jax.atomic.occupied` ignores it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import sys

from k2jax import atomic

NOTE = ".lock"


class Busy(RuntimeError):
    """The workdir is held by another live run (the message names it)."""


@contextlib.contextmanager
def hold(path: str | os.PathLike, *, create: bool = False):
    """Hold ``path`` exclusively for the block; ``create`` makes the directory first.
    Raises Busy at once (no waiting) when another process holds it."""
    path = os.fspath(path)
    if create:
        os.makedirs(path, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"--workdir {path} is in use by {holder(path)}; wait for it to "
                       f"finish or stop it") from None
        except OSError as e:  # no flock here (NFS refuses it on a directory, Lustre may)
            print(f"warning: --workdir {path}: cannot lock it ({e.strerror}); nothing "
                  f"stops a second run from using it", file=sys.stderr)
        note = os.path.join(path, NOTE)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        atomic.write_text(note, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.remove(note)
    finally:
        os.close(fd)  # releases the flock


def holder(path: str | os.PathLike) -> str:
    """Who holds ``path``'s lock, from its ``.lock`` note ("another process" if unreadable)."""
    try:
        with open(os.path.join(os.fspath(path), NOTE), encoding="utf-8") as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"
