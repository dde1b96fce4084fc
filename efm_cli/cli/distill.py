"""`efm distill`: a teacher capacitor in, a few-step (Euler 1, 2 or 4) student capacitor out; a thin shell over
`efm_cli.training.distill`."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import click
import typer

from efm_cli.cli import console
from efm_cli.cli.console import ExitCode
from efm_cli.cli.options import JsonOption, QuietOption, choices, device_option, model_reference
from efm_cli.errors import EfmError, UsageError

if TYPE_CHECKING:
    from efm_cli.training.distill import DistillSettings, DistillSummary

RESUMABLE = {"resume", "steps", "max_minutes", "nfe", "device", "json_output", "quiet"}
"""Options that may change when a run continues; everything else comes from RUN/config.json."""

_DATA = "Data"
_OPT = "Optimisation"
_RUN = "Run"


HeightsChoice = choices("HeightsChoice", ("euler", "uniform"))
"""`efm_cli.training.distill.HEIGHTS`, spelled out so that the command's help does not import torch."""


def _nfe(value: int | None) -> int | None:
    if value is not None and value not in (1, 2, 4):
        raise typer.BadParameter("must be 1, 2 or 4 (the Euler step counts that are measured)")
    return value


def _positive_minutes(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter("must be a positive number of minutes")
    return value


def distill_command(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            callback=model_reference,
            help="Teacher capacitor: a folder, user/name on the Hub, or a name (not needed with --resume).",
            show_default=False,
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Source-plate images, carried forward by the teacher (searched recursively).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Target-plate images, carried backward by the teacher.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    pairs: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Use at most N images in all, split evenly between --source and --target (default: all).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Training steps (default 1000, or what fits in --max-minutes); with --resume, the run's new length.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (Adam).", rich_help_panel=_OPT)] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Pairs per step.", rich_help_panel=_OPT)] = 16,
    seed: Annotated[int, typer.Option(min=0, help="Seed of everything random.", rich_help_panel=_OPT)] = 0,
    heights: Annotated[
        HeightsChoice,
        typer.Option(
            help="Train the student only where Euler with 1, 2 or 4 steps evaluates it (euler), or at every "
            "height of each line (uniform).",
            rich_help_panel=_OPT,
        ),
    ] = HeightsChoice.euler,
    nfe: Annotated[
        int | None,
        typer.Option(
            callback=_nfe,
            help="Euler steps of the exported sampler: 1, 2 or 4 (default 4, the closest to the teacher; 1 is "
            "the fastest).",
            rich_help_panel=_OPT,
        ),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            callback=_positive_minutes,
            help="Stop training after so many minutes (counted from the start), then measure and export. Without "
            "--steps the schedule is sized to end in this time.",
            rich_help_panel=_RUN,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (default runs/MODEL-distilled).", rich_help_panel=_RUN),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder: its pairs are reused, its student continues.", rich_help_panel=_RUN
        ),
    ] = None,
    device: Annotated[str, device_option(_RUN)] = "auto",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> int:
    """Distill a capacitor into a few-step one: straight field lines, translated by Euler with 1, 2 or 4 steps.

    The teacher carries the --source images forward and the --target images backward with its own sampler; each
    image and its endpoint make a pair. A copy of the teacher is then trained so that its field points straight from
    each pair's start to its end (reflow). 10 % of the pairs are held out to measure the student's and the teacher's
    Euler endpoint errors at 1, 2 and 4 steps. The run folder ends with RUN/model, a capacitor whose sampler is Euler
    with --nfe steps (default 4), RUN/distill.json (everything measured) and RUN/pairs.safetensors (reused by --resume).

    Examples:
    efm distill runs/h2z/model --source horse2zebra/trainA --target horse2zebra/trainB --max-minutes 30
    efm distill horse2zebra --source photos/ --pairs 500 --steps 2000 --out runs/h2z-fast --nfe 2
    efm distill --resume runs/h2z-fast --steps 4000
    efm translate ./horses -m runs/h2z-fast/model
    """
    started = time.monotonic()
    console.set_quiet(quiet)
    from efm_cli.training.distill import DistillSettings, distill, read_settings

    if resume is not None:
        _refuse_changes(ctx)
        run = resume
        settings = read_settings(resume)
        if model is not None and model != settings.teacher:
            raise UsageError(
                f"{resume} distils {settings.teacher}, not {model}", "leave MODEL out when continuing a run"
            )
        settings = _continued(settings, steps=steps, minutes=max_minutes, nfe=nfe)
    else:
        if model is None:
            raise UsageError("missing the teacher capacitor MODEL", "efm distill MODEL --source DIR [--target DIR]")
        if source is None and target is None:
            raise UsageError("give the teacher images to carry", "pass --source DIR, --target DIR or both")
        settings = DistillSettings(
            teacher=model,
            source=str(source) if source is not None else None,
            target=str(target) if target is not None else None,
            pairs=pairs,
            steps=steps,
            minutes=max_minutes,
            lr=lr,
            batch_size=batch_size,
            nfe=nfe,
            seed=seed,
            heights=heights.value,
        )
        run = out if out is not None else Path("runs") / f"{_model_name(model)}-distilled"
        if run.exists() and (not run.is_dir() or any(run.iterdir())):
            raise EfmError(f"{run} already holds files", f"continue it with --resume {run}, or pick another --out")
    console.info(f"distilling {settings.teacher} in {run}")
    reporter = _Progress(quiet or json_output)
    try:
        summary = distill(
            settings,
            run,
            resume=resume is not None,
            device=device,
            started=started,
            on_progress=reporter.update,
            say=console.info,
            warn=console.warn,
        )
    finally:
        reporter.close()
    for item in summary.skipped:
        console.warn(f"skipped {item['path']}: {item['reason']}")
    if json_output:
        from dataclasses import asdict

        console.print_json(asdict(summary))
    else:
        _print_summary(summary)
    partial = bool(summary.skipped) or (summary.dropped > 0 and not summary.reused_pairs)
    return ExitCode.PARTIAL if partial else ExitCode.OK


def _model_name(ref: str) -> str:
    """A short name for the default run folder: a folder's name (its run's, for RUN/model), a Hub repo's name."""
    path = Path(ref).expanduser()
    if path.name == "model" and path.parent.name:
        return path.parent.name
    name = ref.partition("@")[0].rstrip("/").rpartition("/")[2]
    return name or "capacitor"


def _continued(
    settings: DistillSettings, *, steps: int | None, minutes: float | None, nfe: int | None
) -> DistillSettings:
    """The run's settings with what may change on --resume; --steps turns the sizing to --max-minutes off, and with
    neither the run keeps its length (the last session's minutes were that session's: `--resume RUN --nfe 1` only
    exports again)."""
    from dataclasses import replace

    changes: dict[str, object] = {}
    if steps is not None:
        changes |= {"steps": steps, "minutes": minutes}
    elif minutes is not None:
        changes |= {"minutes": minutes, "steps": None}
    elif settings.steps is None:
        changes["minutes"] = None
    if nfe is not None:
        changes["nfe"] = nfe
    return replace(settings, **changes)


def _refuse_changes(ctx: typer.Context) -> None:
    """With --resume the settings come from the run; a changed setting would silently not apply, so refuse it."""
    given = [
        name
        for name in ctx.params
        if name not in RESUMABLE
        and name != "model"
        and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(
            f"{flags} cannot change when a run continues",
            "a resumed run keeps the settings in RUN/config.json; start a new run to change them",
        )


class _Progress:
    """`efm train`'s progress display (a bar on a terminal, else a line every 30 seconds), fed by `distill`."""

    def __init__(self, silent: bool) -> None:
        from efm_cli.cli.train import Reporter

        self.reporter = Reporter(None, silent)
        self.start = time.monotonic()
        self.first: int | None = None
        self.smoothed: float | None = None

    def update(self, step: int, total: int | None, loss: float) -> None:
        from efm_cli.training.run import Progress

        if self.first is None:  # the first step warms caches: the speed counts from its end
            self.first, self.start = step, time.monotonic()
        if math.isfinite(loss):
            self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        elapsed = time.monotonic() - self.start
        rate = (step - self.first) / elapsed if step > self.first else 0.0
        smoothed = self.smoothed if self.smoothed is not None else math.nan
        self.reporter.update(Progress(step, total, loss, smoothed, math.nan, math.nan, 0, rate, elapsed))

    def close(self) -> None:
        self.reporter.close()


_STOPS = {"steps": "the schedule is done", "time": "out of time", "interrupted": "interrupted"}


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _print_summary(summary: DistillSummary) -> None:
    """The held-out errors as a table on stdout, then one screen on stderr: what ran, where the student is."""
    from rich.table import Table

    table = Table(
        title=f"{summary.held_out} held-out pair(s); RMS endpoint error vs the teacher's sampler, 8-bit levels",
        title_justify="left",
    )
    for name in ("Euler steps", "student mean", "student p95", "teacher mean", "teacher p95", ""):
        table.add_column(name, justify="left" if not name or name == "Euler steps" else "right", no_wrap=True)
    for row in summary.errors:
        table.add_row(
            str(row.steps),
            _number(row.student_mean),
            _number(row.student_p95),
            _number(row.teacher_mean),
            _number(row.teacher_p95),
            "exported" if row.steps == summary.nfe else "",
        )
    console.out_console().print(table)
    stop = _STOPS.get(summary.stopped, summary.stopped)
    pairs = "reused" if summary.reused_pairs else "integrated"
    lines = [
        f"step {summary.step} of {summary.total} ({stop}) in {summary.seconds / 60:.1f} min, "
        f"{summary.steps_per_s:.2f} steps/s; loss {_number(summary.loss_start, 6)} → {_number(summary.loss_end, 6)}",
        f"  pairs        {summary.pairs} {pairs} ({summary.forward_pairs} forward, {summary.backward_pairs} backward, "
        f"{summary.dropped} dropped), {summary.held_out} held out",
        f"  sampler      euler {summary.nfe} step(s) ({summary.chosen_by})",
        f"  capacitor    {summary.model}",
        f"  next         efm translate IMAGES -m {summary.model}",
    ]
    for line in lines:
        console.info(line)
