"""Options every command spells the same way."""

from typing import Annotated

import typer

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one machine-readable JSON document on stdout instead of a table."),
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing on stderr but errors.")]
