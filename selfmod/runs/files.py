"""Crash-safe file writes: a temp file in the same folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never a torn one, whenever the process dies.

For crash tests, ``SELFMOD_CRASH_DURING_WRITE=<text>`` kills the process with ``SIGKILL``
halfway through writing any file whose name contains ``<text>`` (after half the bytes reached
the temp file), exactly what ``kill -9`` at the worst moment does.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            crash = os.environ.get("SELFMOD_CRASH_DURING_WRITE")
            if crash and crash in path.name:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
