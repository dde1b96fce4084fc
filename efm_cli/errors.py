"""The one base of the library's errors that a user can act on, and its usage-error branch.

Each error carries a `hint` (what to do about it), which the command line prints after the message on the one
error line of the product contract; Python callers get the same text from the exception. The command line turns
a `UsageError` into exit code 2 and every other `EfmError` into exit code 1, in one place (`efm_cli.cli.app`).
"""


class EfmError(Exception):
    """A failure with a reason the user can fix; `hint` says how (a subclass may give a default), or is None."""

    default_hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint


class UsageError(EfmError):
    """A request that is wrong as given (a bad value, a clash between options or paths), not a failure of the work."""
