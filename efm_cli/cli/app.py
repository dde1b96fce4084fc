"""The `efm` command line: the Typer app and `main`, which owns exit codes and error lines.

`main` runs the app with click's `standalone_mode=False` instead of letting Typer exit by itself, because
Typer's standalone mode prints usage errors as Rich panels and unexpected errors as tracebacks, while the
product contract wants exactly one `error: WHAT — HINT` line on stderr and fixed exit codes (0 ok, 1 failed,
2 usage, 3 partial, 130 interrupted). Heavy imports (torch, huggingface_hub) happen inside commands so that
`efm --help` stays fast.
"""

import errno
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Annotated, Any

import click
import typer

from efm_cli import __version__
from efm_cli import env as env_info
from efm_cli.cli import console
from efm_cli.cli.autoencoder import autoencoder_command
from efm_cli.cli.console import ExitCode
from efm_cli.cli.distill import distill_command
from efm_cli.cli.eval import eval_command
from efm_cli.cli.hub import download_command, models_command, push_command
from efm_cli.cli.options import JsonOption, QuietOption
from efm_cli.cli.sampler import sampler_command
from efm_cli.cli.train import train_command
from efm_cli.cli.translate import translate_command
from efm_cli.errors import EfmError, UsageError
from efm_cli.threads import share_cores

app = typer.Typer(
    name="efm",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# click >= 8.4 already suggests close command names, and typer 0.20 appends the same "Did you mean ...?"
# again. Set as an attribute, not a constructor argument, because typer < 0.20 has no such parameter.
app.suggest_commands = False


def _print_version(value: bool) -> None:
    if value:
        print(f"efm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version of efm and exit."),
    ] = False,
) -> None:
    """Unpaired image-to-image translation with Electrostatic Field Matching.

    Data goes to stdout, messages to stderr.
    Exit codes: 0 done, 1 failed, 2 usage error, 3 some inputs skipped.
    Set EFM_DEBUG=1 to see the traceback of an unexpected error.

    Example: efm env --json > efm-env.json
    """


@app.command("env")
def env_command(json_output: JsonOption = False, quiet: QuietOption = False) -> None:
    """Show versions, devices, cache paths and Hub settings, for bug reports.

    HF_TOKEN is reported as set or not set, never shown.

    Examples:
    efm env
    efm env --json > efm-env.json
    """
    console.set_quiet(quiet)
    report = env_info.gather()
    for problem in report["problems"]:
        console.warn(problem)
    if json_output:
        console.print_json(report)
    else:
        _print_env_tables(report)


app.command("translate")(translate_command)
app.command("train")(train_command)
app.command("models")(models_command)
app.command("download")(download_command)
app.command("push")(push_command)
app.command("eval")(eval_command)
app.command("autoencoder")(autoencoder_command)
app.command("sampler")(sampler_command)
app.command("distill")(distill_command)


def _human(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _print_env_tables(report: dict[str, Any]) -> None:
    """One two-column table per section; cells are `console.cell`s: paths may hold brackets or control characters."""
    from rich.table import Table

    for section in ("versions", "devices", "paths", "hub"):
        table = Table(title=section, title_justify="left", show_header=False)
        table.add_column("name", no_wrap=True)
        table.add_column("value", overflow="fold")
        for name, value in report[section].items():
            if name == "cuda_devices":
                for device in value or []:
                    description = f"{device['name']}, capability {device['capability']}, {device['memory_gib']} GiB"
                    table.add_row(console.cell(f"cuda:{device['index']}"), console.cell(description))
            else:
                table.add_row(console.cell(name), console.cell(_human(value)))
        console.out_console().print(table)


def _debug() -> bool:
    return os.environ.get("EFM_DEBUG", "") not in ("", "0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run `efm` and return its exit code (the console script hands it to `sys.exit`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    share_cores()  # before any command imports torch
    if console.no_color():
        _plain_help()
    try:
        result = typer.main.get_command(app).main(args=args, prog_name="efm", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        # `efm` alone: Typer has already printed the help to stdout; exit 2 as Typer does, no error line.
        return ExitCode.USAGE
    except click.UsageError as exc:
        command_path = exc.ctx.command_path if exc.ctx is not None else "efm"
        console.print_error(exc.format_message(), f"see '{command_path} --help'")
        return ExitCode.USAGE
    except click.ClickException as exc:
        console.print_error(exc.format_message())
        return exc.exit_code
    except EfmError as exc:
        # Every error a user can act on, from the library or a command: one line with its hint, never a traceback.
        if _invalid_hub_name(exc.__cause__):  # the Hub's own reason says more than "Hub request failed"
            return _fail(*_hub_name_failure(exc.__cause__))
        return _fail(exc.message, exc.hint, ExitCode.USAGE if isinstance(exc, UsageError) else ExitCode.FAILED)
    except (KeyboardInterrupt, click.Abort):
        console.print_error("interrupted")
        return ExitCode.INTERRUPTED
    except SystemExit as exc:
        if _reader_gone(exc.__context__):
            return _stdout_gone()
        return _system_exit_code(exc)
    except Exception as exc:
        if _reader_gone(exc):
            return _stdout_gone()
        known = _known_failure(exc)
        if known is not None:
            return _fail(*known)
        hint = None if _debug() else "rerun with EFM_DEBUG=1 for the traceback"
        return _fail(f"{type(exc).__name__}: {exc}", hint, ExitCode.FAILED)
    # Without standalone mode, an Exit (from --help, --version or typer.Exit) comes back as its code, and
    # Typer turns Ctrl-C during a command into Exit(130); any other return value is the command's result.
    if isinstance(result, int):
        if result == ExitCode.INTERRUPTED:
            console.print_error("interrupted")
        return result
    return ExitCode.OK


def _fail(message: str, hint: str | None, code: int) -> int:
    """The error line, last on stderr even under EFM_DEBUG=1 (which prints the traceback first); return `code`."""
    if _debug():
        traceback.print_exc()
    console.print_error(message, hint)
    return code


def _known_failure(exc: Exception) -> tuple[str, str | None, int] | None:
    """Message, hint and exit code of failures from outside efm that still have a plain cause a user can act on."""
    if _invalid_hub_name(exc):
        return _hub_name_failure(exc)
    if isinstance(exc, RecursionError):
        return (
            "a file is nested too deeply to be read (maximum recursion depth exceeded)",
            "check the JSON files involved (a capacitor's config.json, a run's config.json or trainer.json)",
            ExitCode.FAILED,
        )
    if isinstance(exc, tuple(_FILE_FAILURES)):
        what = next(text for kind, text in _FILE_FAILURES.items() if isinstance(exc, kind))
        if isinstance(exc.filename, str | os.PathLike):
            return f"{os.fspath(exc.filename)}: {what}", "check the path", ExitCode.FAILED
        return f"a path efm had to use: {what}", "check the files and folders given", ExitCode.FAILED
    return None


def _hub_name_failure(exc: BaseException) -> tuple[str, str, int]:
    return f"not a valid Hub name: {exc}", "write a Hub repo as user/name or user/name@revision", ExitCode.USAGE


def _invalid_hub_name(exc: BaseException | None) -> bool:
    """Whether huggingface_hub refused a repo or revision name (only possible once it was imported)."""
    validation = getattr(sys.modules.get("huggingface_hub.errors"), "HFValidationError", None)
    return validation is not None and isinstance(exc, validation)


_FILE_FAILURES = {
    IsADirectoryError: "is a folder, not a file",
    NotADirectoryError: "part of the path is a file, not a folder",
    FileNotFoundError: "no such file or folder",
    PermissionError: "permission denied",
}
"""File-system errors whose cause is the path itself, as said on the error line."""


def _reader_gone(exc: BaseException | None) -> bool:
    """Whether `exc` is the broken pipe of writing to a reader that has gone (`efm --help | head -1`).

    Click turns that error into `SystemExit(1)`, so it arrives as the exit's context.
    """
    return isinstance(exc, OSError) and exc.errno == errno.EPIPE


def _stdout_gone() -> int:
    """Stop quietly and successfully, as Unix filters do when their reader has what it wants; stdout now goes to
    /dev/null, so the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # a stdout without a file descriptor (tests capturing output) needs nothing
        pass
    return ExitCode.OK


def _plain_help() -> None:
    """Typer draws help and usage with its own Rich console, which keeps bold and dim under NO_COLOR: turn styles
    and terminal control off there too, so that NO_COLOR output holds no escape code at all."""
    from typer import rich_utils

    rich_utils.COLOR_SYSTEM = None
    rich_utils.FORCE_TERMINAL = False


def _system_exit_code(exc: SystemExit) -> int:
    """Mirror the interpreter: None is success, an int is the code, anything else is printed as a failure."""
    if exc.code is None:
        return ExitCode.OK
    if isinstance(exc.code, int):
        return exc.code
    console.print_error(str(exc.code))
    return ExitCode.FAILED
