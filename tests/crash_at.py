"""Test harness: run the ``selfmod`` CLI and ``SIGKILL`` the process when the self-modifying
loop is about to take base step N (``python tests/crash_at.py N train --set ...``); fault
injection stays out of the library."""

import os
import signal
import sys

from selfmod import cli
from selfmod.introspect.loop import Loop

_step = int(sys.argv[1])
_base_step = Loop.base_step


def _base_step_or_die(self: Loop) -> None:
    if self.step == _step and self.tune:
        os.kill(os.getpid(), signal.SIGKILL)
    _base_step(self)


Loop.base_step = _base_step_or_die  # type: ignore[method-assign]
sys.argv = ["selfmod", *sys.argv[2:]]
cli.main()
