"""Options every command spells the same way."""

from enum import StrEnum
from typing import Annotated

import typer

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one machine-readable JSON document on stdout instead of a table."),
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing on stderr but errors.")]


class Precision(StrEnum):
    """Floating-point precision of the field network on accelerators."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
