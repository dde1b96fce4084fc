"""The base of the library's errors that a user can act on.

Each carries a `hint` (what to do about it), which the command line prints after the message on the one error
line of the product contract; Python callers get the same text from the exception.
"""


class HintedError(Exception):
    """A failure with a reason the user can fix; `hint` says how, or is None."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
