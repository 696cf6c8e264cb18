"""One selfmod process per run directory: an exclusive ``flock`` on ``run_dir/.lock``.

The lock is advisory (only selfmod takes it) and held for the ``with`` block; the kernel drops
it when the process dies, so a ``kill -9`` never leaves a run locked. The holder's pid is
written into the file so that the second process can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selfmod.errors import SelfmodError

LOCK_NAME = ".lock"


class RunLockedError(SelfmodError):
    """Another selfmod process holds the run directory."""


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir/.lock`` exclusively for the block, or raise :class:`RunLockedError`
    at once (non-blocking) if another process holds it. Yields the lock file's path."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise SelfmodError(
            f"cannot lock {run_dir}: {err.strerror} ({path}); DIR must be a writable run directory"
        ) from None
    try:
        with contextlib.suppress(OSError):  # one policy for every file of a run: 0600
            os.fchmod(fd, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise RunLockedError(
                f"{run_dir} is in use by another selfmod process (pid {holder}); wait for it "
                "to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
