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
import unicodedata
from enum import IntEnum
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


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


WIDE = 10_000
"""Console width when the stream is not a terminal: a table piped to a file or `grep` is never wrapped."""


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def live_terminal() -> bool:
    """Whether stderr may be redrawn in place (Rich progress bars): a terminal, and colour not refused.

    Under NO_COLOR a progress bar's cursor movements are escape codes too, so callers fall back to plain text.
    """
    return _is_terminal(sys.stderr) and not no_color()


def _make_console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if _is_terminal(stream) or os.environ.get("COLUMNS") else WIDE
    if no_color():
        # Rich drops colour under NO_COLOR but keeps bold and dim, and redraws progress bars with cursor movements:
        # no colour system means no styles, and no terminal means no redrawing, so not one escape code is written.
        return Console(stderr=stderr, highlight=False, color_system=None, force_terminal=False, width=width)
    return Console(stderr=stderr, highlight=False, width=width)


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


_UNSAFE = frozenset({"Cc", "Cf", "Zl", "Zp"})
"""Unicode categories `escape` shows escaped: controls, invisible formatting, line and paragraph separators."""


def escape(text: object) -> str:
    """`text` safe to print: control and format characters become Python escapes (`\\x1b`, `\\n`, `\\u202e`).

    Names that come from files, capacitor configs or the Hub reach the terminal through here, so that none can
    restyle it (escape sequences), forge or split a line (newlines, carriage returns) or reorder what is shown
    (bidirectional overrides). Rich markup needs no escaping on top: messages are printed with markup off, and
    table cells are `Text` (`cell`).
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(repr(char)[1:-1] if unicodedata.category(char) in _UNSAFE else char for char in text)


def cell(value: object) -> Text:
    """A table cell: `escape`d, and a Rich `Text`, so brackets in names are shown as they are, not read as markup."""
    from rich.text import Text

    return Text(escape(value))


def info(message: str) -> None:
    """Tell the user something on stderr, unless quiet: one line, escaped (`escape`), markup off (file names may
    contain brackets), not wrapped at the console width (a path cut in two breaks logs and grep)."""
    if not _quiet:
        err_console().print(escape(message), markup=False, soft_wrap=True)


def warn(message: str) -> None:
    """Report a problem that did not stop the command, as one `warning: MESSAGE` line on stderr, unless quiet."""
    info(f"warning: {message}")


def _one_line(text: str) -> str:
    """Lines joined with spaces (a multi-line exception message), then anything else unprintable escaped."""
    return escape(" ".join(line.strip() for line in text.splitlines() if line.strip()))


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
