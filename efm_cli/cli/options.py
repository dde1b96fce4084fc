"""Options every command spells the same way."""

from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from efm_cli import devices

JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print one machine-readable JSON document on stdout instead of a table."),
]
QuietOption = Annotated[bool, typer.Option("-q", "--quiet", help="Print nothing on stderr but errors.")]


def choices(name: str, values: Iterable[str]) -> type[StrEnum]:
    """An enum typer can offer as a choice, built from the library's own list of values so the two never drift."""
    return StrEnum(name, {value: value for value in values})


PrecisionChoice = choices("PrecisionChoice", devices.PRECISIONS)
"""Floating-point precision of the field network on accelerators (`efm_cli.devices.PRECISIONS`)."""


def _device_name(value: str) -> str:
    """A malformed device name is a usage error (exit 2), caught before torch is imported."""
    try:
        return devices.check(value)
    except devices.DeviceNameError as error:
        raise typer.BadParameter(f"{error.message}; {error.hint}") from error


def device_option(panel: str | None = None) -> object:
    """`--device`, the same name, help and check in every command (`panel`: the help section it is listed in)."""
    return typer.Option(callback=_device_name, help=devices.DEVICE_HELP, rich_help_panel=panel)


DeviceOption = Annotated[str, device_option()]


def model_reference(value: str | None) -> str | None:
    """A capacitor reference that names no folder but has a slash must be a Hub repo USER/NAME[@REV] that the Hub
    accepts: a usage error (exit 2) here, before anything is loaded, rather than a failed Hub request later."""
    repo = (value or "").partition("@")[0]
    if value is None or "/" not in repo or Path(value).expanduser().exists():
        return value
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from efm_cli.capacitor.hub import parse_hub_ref

    try:
        validate_repo_id(repo)
    except HFValidationError as error:
        reason = str(error).partition(": '")[0]  # the Hub's rule, without its copy of the name
        raise typer.BadParameter(f"{value!r} is neither a folder nor a valid Hub repo name ({reason})") from error
    if parse_hub_ref(value) is None:
        raise typer.BadParameter(f"{value!r} is neither a folder nor a Hub repo USER/NAME or USER/NAME@REV")
    return value
