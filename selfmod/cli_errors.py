"""The command line's errors as one line on stderr with exit code 2, never a traceback or a
boxed usage message::

    error: selfmod train: no such option: --bogus (selfmod train --help lists what it takes)
    error: steps must be an integer in [1, 1000000] (got -5)

:func:`run` drives the ``typer`` app in non-standalone mode, so that usage errors come back
as exceptions and are printed here, in the same form as a bad config value.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from typer import Abort

from selfmod.errors import SelfmodError

try:  # typer vendors click from 0.2x on; older ones use click itself
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

#: the longest error line printed (a 10,000-character value is cut, with its length said)
MAX_LINE = 500


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` on one line: line breaks and other control characters escaped, cut at
    ``limit`` characters (saying how long it was)."""
    flat = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text.strip())
    if len(flat) <= limit:
        return flat
    return f"{flat[: limit - 40]}... ({len(flat)} characters in all)"


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (one line) to stderr and exit with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def usage(err: Any) -> str:
    """A click usage error as one line naming the command and where its help is."""
    ctx = getattr(err, "ctx", None)
    path = getattr(ctx, "command_path", None) or "selfmod"
    text = one_line(err.format_message()).rstrip(".")
    text = text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text
    return f"{path}: {text} ({path} --help lists what it takes)"


@functools.cache
def _command(app: Any) -> Any:
    """The click command of a ``typer`` app, built once (typer builds it on every call, from
    every command's signature: two thirds of the time of a refused ``--set``)."""
    import typer.main

    return typer.main.get_command(app)


def run(app: Any, argv: Sequence[str] | None = None) -> None:
    """Run ``app`` on ``argv`` (default: ``sys.argv[1:]``); bad input of any kind is one line
    and exit code 2; an interrupted command exits 130."""
    from selfmod.validation import ConfigError

    try:
        code = _command(app).main(
            args=list(argv) if argv is not None else None,
            prog_name="selfmod",
            standalone_mode=False,
        )
    except UsageError as err:
        fail(usage(err))
    except ClickException as err:
        fail(err.format_message())
    except Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, SelfmodError) as err:
        fail(str(err))
    except OSError as err:  # a file the run needs is unreadable or unwritable (permissions, disk)
        where = f"{err.filename}: " if err.filename else ""
        fail(f"{where}{err.strerror or err}")
    if isinstance(code, int) and not isinstance(code, bool) and code:
        sys.exit(code)
