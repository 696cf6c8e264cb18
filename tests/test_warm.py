"""The warm process runner the crash and CLI tests use (``tests/warm.py``) ends a child as a
fresh interpreter would: the same exit statuses, output, environment and working folder."""

import os
import subprocess
import sys

import pytest
import warm

PROGRAMS = [
    "print('out'); import sys; print('err', file=sys.stderr)",
    "raise SystemExit(2)",
    "raise SystemExit('a message')",
    "1 / 0",
    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    "import threading; threading.Timer(0.2, lambda: print('late')).start()",
    "import atexit; atexit.register(print, 'at exit')",
    "import os, sys; print(os.getcwd(), os.environ.get('WARM_TEST'), sys.argv)",
]


@pytest.mark.parametrize("code", PROGRAMS)
def test_a_child_ends_as_a_fresh_interpreter(code, tmp_path):
    env = {**os.environ, "WARM_TEST": "yes"}
    fresh = subprocess.run(
        [sys.executable, "-c", code, "an-arg"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    forked = warm.run(["-c", code, "an-arg"], cwd=tmp_path, env=env)
    assert forked.returncode == fresh.returncode
    assert forked.stdout == fresh.stdout
    assert forked.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:]


def test_the_cli_gives_the_same_one_line_error_and_a_timeout_kills_the_child(tmp_path):
    args = ["-m", "selfmod.cli", "train", "--set", "steps=0"]
    fresh = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    forked = warm.run(args)
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr)
    assert fresh.returncode == 2 and fresh.stderr.count("\n") == 1
    with pytest.raises(subprocess.TimeoutExpired):
        warm.run(["-c", "import time; time.sleep(30)"], timeout=0.5)
    assert warm.run(["-c", "print(1)"]).stdout == "1\n"  # the server goes on after a timeout
    with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
        warm.run(["-c", "pass"], env={**os.environ, "OMP_NUM_THREADS": "7"})


def test_a_child_takes_this_process_environment_and_folder_as_they_are_now(tmp_path, monkeypatch):
    warm.run(["-c", "pass"])  # the server has started before the change
    monkeypatch.setenv("WARM_LATER", "set after the server started")
    monkeypatch.chdir(tmp_path)
    out = warm.run(["-c", "import os; print(os.getcwd()); print(os.environ['WARM_LATER'])"])
    assert out.stdout.splitlines() == [os.path.realpath(tmp_path), "set after the server started"]
