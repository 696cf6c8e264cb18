"""Crash-safe file writes: a temp file in the same folder, fsync, rename, fsync the folder.

A reader sees the old file or the new one, never a torn one, whenever the process dies.

One permission policy for what selfmod writes: files 0600, folders 0700 (:data:`FILE_MODE`,
:data:`DIR_MODE`); :func:`open_private` and :func:`read_bytes` never follow a symbolic link
in the final component (``O_NOFOLLOW``).

(Crash tests kill a process halfway through a write with ``tests/crash_at.py``.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

FILE_MODE, DIR_MODE = 0o600, 0o700


def private_opener(path: str | os.PathLike[str], flags: int) -> int:
    """``open(..., opener=private_opener)``: never through a symlink; created 0600."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)


def open_private(path: str | os.PathLike[str], mode: str = "r", **kwargs):
    """``open(path, mode)`` that refuses a symlink (``OSError`` ELOOP) and creates 0600."""
    return open(path, mode, opener=private_opener, **kwargs)


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, never through a symlink (``OSError`` ELOOP)."""
    with open_private(path, "rb") as f:
        return f.read()


def private_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder (made 0700 if missing); ``NotADirectoryError`` if it is a link."""
    path = Path(path)
    if path.is_symlink():
        raise NotADirectoryError(20, "is a symbolic link, not a folder", str(path))
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[str]:
    """A temp file beside ``path`` for the caller to fill; then fsync'd, renamed over ``path``
    and the folder fsync'd (removed instead if the caller raises)."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
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


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with _replacing(Path(path)) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_file(path: str | os.PathLike[str], fill: Callable[[str], None]) -> tuple[str, int]:
    """Write ``path`` atomically through ``fill(temp_path)`` (a writer that takes a file name,
    such as ``safetensors.torch.save_file``: no whole-file ``bytes`` in memory); returns the
    written file's sha256 (hex) and size, read back in chunks."""
    with _replacing(Path(path)) as tmp:
        fill(tmp)
        digest, size = hashlib.sha256(), 0
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
