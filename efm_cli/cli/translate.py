"""`efm translate`: parse the options, run the `efm_cli.translate` pipeline, print progress, summary and report.

Nothing heavy is imported at module level — the pipeline (torch, PIL) loads inside the command — so that
`efm translate --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from efm_cli.capacitor.format import SOLVER_NAMES
from efm_cli.cli import console
from efm_cli.cli.console import ExitCode
from efm_cli.cli.options import DeviceOption, JsonOption, PrecisionChoice, QuietOption, choices, model_reference

if TYPE_CHECKING:
    from efm_cli.translate import Record, Report

SHOWN = 16
"""Inputs shown in --grid; the first TRACED of them also get a --trajectory line."""
TRACED = 4


SolverChoice = choices("SolverChoice", SOLVER_NAMES)


FIXED_STEP = ("heun", "euler")


def parse_shard(text: str) -> tuple[int, int]:
    """`I/N` with 1 ≤ I ≤ N: this process takes shard I of N."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"{text!r} is not I/N, e.g. 1/4")
    shard = int(index), int(count)
    if not 1 <= shard[0] <= shard[1]:
        raise ValueError(f"{text!r}: I must be between 1 and N")
    return shard


def _positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter("must be greater than 0")
    return value


def translate_command(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files, folders (searched recursively) or quoted globs.", show_default=False),
    ],
    to: Annotated[
        str | None,
        typer.Option("--to", help="Domain to translate to; picks the capacitor with that plate, and the direction."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            callback=model_reference,
            help="Capacitor: a folder, a Hub repo USER/NAME or USER/NAME@REV, or a known short name.",
        ),
    ] = None,
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="With --to: pick the distilled capacitor of that domain (efm distill; a few network passes "
            "per image, several times faster, slightly less faithful).",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Output folder (default: FOLDER-to-DOMAIN beside the input folder, or the folder of the input files).",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images integrated together.")] = 16,
    device: DeviceOption = "auto",
    precision: Annotated[
        PrecisionChoice, typer.Option(help="Network precision; a sample that fails in bf16/fp16 is redone in fp32.")
    ] = PrecisionChoice.fp32,
    solver: Annotated[
        SolverChoice | None,
        typer.Option(help="Integrator (default: the capacitor's, usually dopri5).", show_default=False),
    ] = None,
    rtol: Annotated[
        float | None, typer.Option(callback=_positive, help="dopri5 relative tolerance (default: the capacitor's).")
    ] = None,
    atol: Annotated[
        float | None, typer.Option(callback=_positive, help="dopri5 absolute tolerance (default: the capacitor's).")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(min=1, help="Steps of the fixed-step solvers heun and euler.", show_default=False)
    ] = None,
    seed: Annotated[int, typer.Option(help="Picks the inputs shown by --grid and --trajectory.")] = 0,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Keep outputs that already exist: a rerun finishes the job.")
    ] = False,
    shard: Annotated[
        str | None,
        typer.Option(
            metavar="I/N",
            help="Translate only shard I of N (1-based): N processes split the inputs without overlap.",
            show_default=False,
        ),
    ] = None,
    detail: Annotated[
        bool,
        typer.Option(
            "--detail/--no-detail", help="Add the input's fine detail back at full size, where the field kept it."
        ),
    ] = True,
    grid: Annotated[
        Path | None, typer.Option(help="Write a before/after contact sheet to this image file.", show_default=False)
    ] = None,
    trajectory: Annotated[
        Path | None,
        typer.Option(help="Write a film strip of a few field lines to this image file.", show_default=False),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Translate images along a capacitor's field lines; the outputs mirror the input tree.

    One folder in: its tree lands directly in --out. Files: --out/NAME.
    A glob: its matches, named from its leading folder. Several folders: each keeps its own name under --out.
    Outputs keep the names, formats and pixel sizes of the inputs, which are never modified.
    Unreadable inputs are skipped with their reason, and the exit code is 3.

    Examples:
    efm translate ./horses --to zebra
    efm translate ./horses --to zebra --fast
    efm translate photos/ --model user/summer2winter --out winter/ --grid sheet.jpg
    efm translate 'scans/**/*.png' --to zebra --shard 2/4 --skip-existing --json > report.json
    """
    console.set_quiet(quiet)
    if to is None and model is None:
        raise _usage("say where to translate to: pass --to DOMAIN or --model REF")
    if fast and model is not None:
        raise _usage("--fast picks a distilled capacitor for --to; with --model, name the distilled capacitor itself")
    if solver is not None:
        _check_solver_flags(solver.value, steps, rtol, atol)
    try:
        parsed_shard = parse_shard(shard) if shard is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), click.get_current_context(silent=True), param_hint="'--shard'") from error
    request = _Request(
        inputs=inputs,
        to=to,
        model=model,
        fast=fast,
        out=out,
        batch_size=batch_size,
        device=device,
        precision=precision.value,
        solver_options={
            key: value
            for key, value in (("solver", solver and solver.value), ("rtol", rtol), ("atol", atol), ("steps", steps))
            if value is not None
        },
        seed=seed,
        skip_existing=skip_existing,
        shard=parsed_shard,
        detail=detail,
        pictures={key: path for key, path in (("grid", grid), ("trajectory", trajectory)) if path is not None},
        json_output=json_output,
        progress=sys.stderr.isatty() and not json_output and not quiet,
    )
    from efm_cli import translate as pipeline

    raise typer.Exit(_run(pipeline, request))


@dataclass(frozen=True)
class _Request:
    """The command's options, checked, as the pipeline wants them."""

    inputs: list[str]
    to: str | None
    model: str | None
    fast: bool
    out: Path | None
    batch_size: int
    device: str
    precision: str
    solver_options: dict[str, Any]
    seed: int
    skip_existing: bool
    shard: tuple[int, int] | None
    detail: bool
    pictures: dict[str, Path]
    json_output: bool
    progress: bool


def _usage(message: str) -> click.UsageError:
    """A usage error (exit 2) that points at `efm translate --help`."""
    return click.UsageError(message, ctx=click.get_current_context(silent=True))


def _check_solver_flags(name: str, steps: int | None, rtol: float | None, atol: float | None) -> None:
    """Flags the solver that will run (`--solver`, else the capacitor's own) would silently ignore are usage
    errors."""
    if steps is not None and name not in FIXED_STEP:
        raise _usage("--steps needs --solver heun or euler")
    if name in FIXED_STEP and (rtol is not None or atol is not None):
        raise _usage(f"--rtol and --atol do not apply to --solver {name}")


def _run(pipeline: Any, request: _Request) -> int:
    """Load, plan, translate, write the pictures, print; return the exit code."""
    from efm_cli import devices

    device = devices.choose(request.device)
    if device.type == "cpu" and devices.cpu_native(request.precision) is False:
        console.warn(
            f"this CPU has no {request.precision} instructions: torch emulates them, many times slower than fp32 "
            "(the CPU's fastest; drop --precision)"
        )
    capacitor, direction, name = pipeline.open_capacitor(
        model=request.model, to=request.to, device=device, fast=request.fast
    )
    given = request.solver_options
    if "solver" not in given:
        own = capacitor.config.get("sampler", {}).get("solver", "dopri5")
        _check_solver_flags(own, given.get("steps"), given.get("rtol"), given.get("atol"))
    destination = capacitor.target if direction == "forward" else capacitor.source
    plan = pipeline.plan(request.inputs, domain=destination, out=request.out)
    if not plan.jobs:
        raise pipeline.TranslateError(
            f"no images found in {', '.join(request.inputs)}", "image files end in .jpg, .png, .webp, .bmp, .tif, .gif"
        )
    jobs = pipeline.shard(plan.jobs, *request.shard) if request.shard else plan.jobs
    pictures = {key: pipeline.check_sheet(path, plan.jobs, plan.out) for key, path in request.pictures.items()}
    if len(pictures) == 2 and os.path.realpath(pictures["grid"]) == os.path.realpath(pictures["trajectory"]):
        raise pipeline.PlanError("--grid and --trajectory name the same file", "give each picture its own file name")
    pipeline.prepare_out(plan)  # a folder nobody can write to stops the run now, not after every image
    options = {"direction": direction, "precision": request.precision, **request.solver_options}
    console.info(f"translating {len(jobs)} image(s) to {destination} with {name} on {device} → {plan.out}")
    with _progress_bar(len(jobs), request.progress) as advance:
        report = pipeline.translate_files(
            capacitor,
            jobs,
            batch_size=request.batch_size,
            detail=request.detail,
            skip_existing=request.skip_existing,
            show=SHOWN if pictures else 0,
            seed=request.seed,
            progress=advance,
            **options,
        )
    written = _write_pictures(pipeline, capacitor, report, pictures, options)
    _print_outcome(report, request, name, direction, destination, str(device), plan.out, written)
    code = _exit_code(report)
    if code == ExitCode.FAILED:
        console.print_error("nothing was translated: every input was skipped or failed", "see the reasons above")
    return code


def _write_pictures(
    pipeline: Any, capacitor: Any, report: Report, pictures: dict[str, Path], options: dict[str, Any]
) -> dict[str, str]:
    """--grid and --trajectory, from the shown inputs that were translated; none translated, none written."""
    written = {}
    if "grid" in pictures and report.pairs:
        pipeline.write_picture(pictures["grid"], pipeline.contact_sheet(report.pairs))
        written["grid"] = os.path.abspath(pictures["grid"])
    if "trajectory" in pictures and report.shown:
        import torch

        images = torch.stack([tensor for _, tensor in report.shown[:TRACED]])
        _, states = pipeline.trace(capacitor, images, **options)
        pipeline.write_picture(pictures["trajectory"], pipeline.film_strip(states))
        written["trajectory"] = os.path.abspath(pictures["trajectory"])
    for key in pictures.keys() - written.keys():
        console.warn(f"--{key} not written: no image was translated in this run")
    return written


@contextmanager
def _progress_bar(total: int, shown: bool) -> Iterator[Callable[[Record], None] | None]:
    """Rich progress (images, images/s, ETA) on stderr for a person watching; plain text under NO_COLOR."""
    if not shown:
        yield None
        return
    if not console.live_terminal():
        with _plain_progress(total) as advance:
            yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("translating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"))
    with Progress(*columns, TimeRemainingColumn(), console=console.err_console(), transient=True) as bar:
        task = bar.add_task("translate", total=total, rate="")

        def advance(record: Record) -> None:
            bar.advance(task)
            state = bar.tasks[0]
            if state.elapsed:  # the mean since the start: a window over fast skips and slow batches misleads
                bar.update(task, rate=f"{state.completed / state.elapsed:.1f} img/s")

        yield advance


@contextmanager
def _plain_progress(total: int) -> Iterator[Callable[[Record], None]]:
    """Images done and images/s as one line of plain text, rewritten after a carriage return and wiped at the end:
    progress for a terminal under NO_COLOR, where a Rich bar's cursor movements would be escape codes."""
    start = last = time.monotonic()
    done = width = 0

    def advance(record: Record) -> None:
        nonlocal done, last, width
        done += 1
        now = time.monotonic()
        if now - last < 0.25 and done < total:
            return
        last = now
        line = f"translating {done}/{total}  {done / max(now - start, 1e-9):.1f} img/s"
        sys.stderr.write("\r" + line.ljust(width))
        sys.stderr.flush()
        width = max(width, len(line))

    try:
        yield advance
    finally:
        if width:
            sys.stderr.write("\r" + " " * width + "\r")
            sys.stderr.flush()


def _print_outcome(
    report: Report,
    request: _Request,
    name: str,
    direction: str,
    destination: str,
    device: str,
    out: Path,
    pictures: dict[str, str],
) -> None:
    """Skips and failures one per line, the summary on stderr; the --json report on stdout."""
    for record in report.records:
        if record.status in ("skipped", "failed"):
            console.warn(f"{record.status} {record.path}: {record.reason}")
    summary = report.summary()
    console.info(
        f"done: {summary['translated']} translated, {summary['existing']} kept, {summary['skipped']} skipped, "
        f"{summary['failed']} failed"
    )
    timing = f"{summary['seconds']:.1f} s"
    if summary["translated"]:  # with nothing translated, a mean NFE and a rate would be made-up zeros
        timing = f"mean NFE {summary['nfe_mean']:.1f} · {timing} · {summary['images_per_second']:.2f} img/s"
    console.info(timing)
    if request.json_output:
        console.print_json(
            {
                "model": name,
                "direction": direction,
                "to": destination,
                "out": os.path.abspath(out),
                "device": device,
                "precision": request.precision,
                "shard": list(request.shard) if request.shard else None,
                "pictures": pictures,
                "summary": summary,
                "inputs": [record.to_json() for record in report.records],
            }
        )


def _exit_code(report: Report) -> int:
    """0 all done; 3 some inputs skipped or failed; 1 nothing usable (no input translated or kept)."""
    usable = report.count("translated") + report.count("existing")
    if usable == len(report.records):
        return ExitCode.OK
    return ExitCode.PARTIAL if usable else ExitCode.FAILED
