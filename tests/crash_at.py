"""Test harness: run the ``selfmod`` CLI (or ``-c CODE``) and ``SIGKILL`` the process at a
chosen point; fault injection stays out of the library.

    python tests/crash_at.py step=N  train --set ...   # when the loop is about to take step N
    python tests/crash_at.py write=TEXT meta-train ...  # halfway through writing a file whose
                                                        # name contains TEXT (half its bytes in
                                                        # the temp file, as kill -9 would leave)
    python tests/crash_at.py write=TEXT -c CODE ARGS    # the same around Python code
    python tests/crash_at.py time=SECONDS meta-train .. # after SECONDS of wall time, wherever
                                                        # the process is (a file write too)

With ``step=N`` under ``torchrun`` and ``CRASH_RANK=R`` set, only rank R dies, and only in
the job's first attempt (a ``--max-restarts`` restart runs to the end).
"""

import os
import signal
import sys
import tempfile
from pathlib import Path

import selfmod.files as files  # patched before any module binds atomic_write_bytes

_where, _, _what = sys.argv[1].partition("=")
_write = files.atomic_write_bytes
_write_file = files.atomic_write_file


def _die() -> None:
    rank = os.environ.get("CRASH_RANK")
    if rank is not None and (
        os.environ.get("RANK") != rank or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"
    ):
        return
    os.kill(os.getpid(), signal.SIGKILL)


def _write_or_die(path, data: bytes) -> None:
    path = Path(path)
    if _what in path.name:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[: len(data) // 2])
        os.fsync(fd)
        _die()
    _write(path, data)


def _write_file_or_die(path, fill):
    """The streamed writer (a checkpoint's tensors): the whole file into the temp file, cut to
    half its bytes, then the kill."""
    path = Path(path)
    if _what in path.name:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        fill(tmp)
        os.truncate(tmp, os.path.getsize(tmp) // 2)
        _die()
    return _write_file(path, fill)


if _where == "write":
    files.atomic_write_bytes = _write_or_die
    files.atomic_write_file = _write_file_or_die
elif _where == "time":
    import threading

    threading.Timer(float(_what), _die).start()
elif _where == "step":
    from selfmod.introspect.loop import Loop

    _base_step = Loop.base_step

    def _base_step_or_die(self: Loop) -> None:
        if self.step == int(_what) and self.tune:
            _die()
        _base_step(self)

    Loop.base_step = _base_step_or_die  # type: ignore[method-assign]
else:
    raise SystemExit(f"crash_at: expected step=N, write=TEXT or time=S (got {sys.argv[1]!r})")

if sys.argv[2] == "-c":
    code = sys.argv[3]
    sys.argv = ["-c", *sys.argv[4:]]
    exec(compile(code, "<crash_at -c>", "exec"), {"__name__": "__main__"})
else:
    from selfmod import cli

    sys.argv = ["selfmod", *sys.argv[2:]]
    cli.main()
