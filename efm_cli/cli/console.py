"""Output helpers shared by every command.

The product contract fixes where things go: data on stdout (a Rich table for people, or one JSON document
with `--json`), messages on stderr, errors as exactly one `error: WHAT — HINT` line. Keeping that in one
module means no command can get it subtly wrong. Rich is imported lazily so `efm --version` does not pay
for it.
"""

from __future__ import annotations

import json
import os
import sys
from enum import IntEnum
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


class ExitCode(IntEnum):
    """Process exit codes of every `efm` command (product contract)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    PARTIAL = 3
    INTERRUPTED = 130


_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence `info` and `warn` for the rest of the process (`-q/--quiet`: nothing but errors on stderr)."""
    global _quiet
    _quiet = quiet


def no_color() -> bool:
    """Whether the user asked for no colour (https://no-color.org: set and not empty)."""
    return bool(os.environ.get("NO_COLOR"))


def _make_console(stderr: bool) -> Console:
    from rich.console import Console

    # Rich already drops colour when the stream is not a terminal; under NO_COLOR it would still emit bold
    # and dim, so turn styling off entirely: NO_COLOR output must be free of escape codes.
    return Console(stderr=stderr, highlight=False, color_system=None if no_color() else "auto")


@cache
def out_console() -> Console:
    """Console for human-readable data on stdout (tables)."""
    return _make_console(stderr=False)


@cache
def err_console() -> Console:
    """Console for messages on stderr."""
    return _make_console(stderr=True)


def print_json(obj: Any) -> None:
    """Write one JSON document to stdout; plain `json`, so Rich can never wrap or colour machine output."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """Tell the user something on stderr, unless quiet. Markup is off (file names may contain brackets) and long
    lines are not wrapped at the console width (a path cut in two breaks logs and grep)."""
    if not _quiet:
        err_console().print(message, markup=False, soft_wrap=True)


def warn(message: str) -> None:
    """Report a problem that did not stop the command, as `warning: MESSAGE` on stderr, unless quiet."""
    if not _quiet:
        err_console().print(f"warning: {message}", markup=False, soft_wrap=True)


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def format_error(message: str, hint: str | None = None) -> str:
    """The single error line of the contract: `error: MESSAGE — HINT` (no ` — HINT` without a hint)."""
    line = f"error: {_one_line(message)}"
    if hint:
        line += f" — {_one_line(hint)}"
    return line


def print_error(message: str, hint: str | None = None) -> None:
    """Write the error line to stderr. Not through Rich, which would wrap a long line at the console width."""
    sys.stderr.write(format_error(message, hint) + "\n")
    sys.stderr.flush()
