"""``python ARGS`` as a real process that skips torch's import: each child is forked from one
server per test process that has imported torch and the other third-party modules the CLI
loads. The child has its own pid, exit status (``-9`` when it kills itself), stdout and stderr,
and exits as an interpreter does (its threads joined, ``atexit`` run, its output flushed), so
:func:`run` stands in for :func:`subprocess.run`; selfmod itself is imported afresh in every
child, so a harness can still patch it before its modules bind names (``tests/crash_at.py``).
Used by the tests that start many processes, where torch's import and teardown were most of
each one's time.

    out = warm.run(["-m", "selfmod.cli", "train", "--set", "steps=10"], timeout=600)
    out.returncode, out.stdout, out.stderr
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

#: imported once by the server; nothing of selfmod, which each child imports itself
PRELOAD = ["torch", "torch.func", "numpy", "safetensors.torch", "rich.console", "typer", "pydantic"]
#: read by torch when it is imported (its threads, its devices, its own settings): a caller
#: cannot give a child another value of these
IMPORT_TIME_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_", "PYTORCH_", "CUDA_")

_server: subprocess.Popen | None = None


def run(
    args: Sequence[str],
    *,
    timeout: float = 600,
    cwd: str | Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """``subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=...)``
    forked from the warm server. ``args``: ``-m MODULE ...``, ``-c CODE ...`` or
    ``SCRIPT ...``; ``cwd``: the child's working folder (default this process's, now);
    ``env``: its whole environment (default this process's, now; its ``PYTHONPATH`` entries go
    first on ``sys.path``, as at an interpreter's start)."""
    if env is not None:  # the caller's changes to this process's environment
        changed = {k for k in {*env, *os.environ} if env.get(k) != os.environ.get(k)}
        if late := sorted(k for k in changed if k.startswith(IMPORT_TIME_ENV)):
            raise ValueError(f"warm.run: {late} are read when torch is imported; use subprocess")
    env = dict(os.environ if env is None else env)  # as subprocess: this process's, now
    server, command = _started(), [sys.executable, *args]
    with tempfile.TemporaryDirectory(prefix="warm-") as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        request = {"args": list(args), "out": out, "err": err, "cwd": str(cwd or os.getcwd())}
        server.stdin.write(json.dumps({**request, "env": env}) + "\n")
        server.stdin.flush()
        pid = int(server.stdout.readline())
        ready, _, _ = select.select([server.stdout], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            server.stdout.readline()
            raise subprocess.TimeoutExpired(command, timeout)
        code = int(server.stdout.readline())
        output = (Path(f).read_text(errors="replace") for f in (out, err))
        return subprocess.CompletedProcess(command, code, *output)


def _started() -> subprocess.Popen:
    """The server of this process, started at the first call."""
    global _server
    if _server is None or _server.poll() is not None:
        _server = subprocess.Popen(
            [sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        atexit.register(_server.stdin.close)  # the server ends at its input's end
    return _server


def _serve() -> None:
    """The server: one JSON request a line on stdin; for each, the child's pid and then its exit
    status (``-N`` for a signal) on stdout; the forked child runs the request and exits."""
    for name in PRELOAD:
        importlib.import_module(name)
    protocol = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _exit(_become, request)
        print(pid, file=protocol, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), file=protocol, flush=True)
    raise SystemExit(0)


def _exit(main, request: dict) -> None:
    """``main(**request)``, then the end of an interpreter: its exit status (``SystemExit``'s
    rules; a traceback and 1 for an uncaught exception), other threads joined, ``atexit`` run,
    stdout and stderr flushed; then ``os._exit``, which skips tearing down torch's modules (most
    of a second, and nothing a test reads)."""
    try:
        main(**request)
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
        if not isinstance(code, int):  # a message: printed, and status 1
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _become(args: list[str], out: str, err: str, cwd: str, env: dict[str, str]) -> None:
    """In the forked child: stdin from /dev/null, stdout and stderr into ``out`` and ``err``,
    then ``python ARGS``; an uncaught exception and ``SystemExit`` end it as they end Python."""
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out, write), (2, err, write)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[1:1] = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if args[0] == "-m":
        sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *args[2:]], ""
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv, sys.path[0] = list(args), str(Path(args[0]).resolve().parent)
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    _serve()
