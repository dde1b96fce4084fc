"""`efm train`: options in, a run folder out (the work is `efm_cli.runs.fit`)."""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from efm_cli import console
from efm_cli.commands.options import JsonOption, Precision, QuietOption
from efm_cli.console import EfmError, ExitCode

if TYPE_CHECKING:
    from efm_cli.runs import Progress, RunSettings

DEFAULT_STEPS = 20000


class FieldChoice(StrEnum):
    coulomb = "coulomb"
    tube = "tube"


class PlanChoice(StrEnum):
    independent = "independent"
    ot = "ot"


class ResizeChoice(StrEnum):
    resize = "resize"
    crop = "crop"


class TargetChoice(StrEnum):
    repo = "repo"
    phys = "phys"


class SchemeChoice(StrEnum):
    uniform = "uniform"
    pfgm = "pfgm"


class NetworkChoice(StrEnum):
    tiny = "tiny"
    small = "small"
    base = "base"


class DecayChoice(StrEnum):
    constant = "constant"
    cosine = "cosine"


RESUMABLE = {"resume", "steps", "max_minutes", "device", "workers", "json_output", "quiet"}
"""Options that may change when a run continues; everything else comes from RUN/config.json."""

_DATA = "Data"
_FIELD = "Field"
_OPT = "Optimisation"
_RUN = "Run"


def train_command(
    ctx: typer.Context,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            help="Folder of source images (plate z=0), searched recursively; 'noise' for generation; or a folder "
            "with trainA/ and trainB/ (CycleGAN layout), which then gives both plates.",
            rich_help_panel=_DATA,
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option("--target", help="Folder of target images (plate z=L).", rich_help_panel=_DATA),
    ] = None,
    source_name: Annotated[
        str | None, typer.Option(help="Name of the source plate (default: from the folder).", rich_help_panel=_DATA)
    ] = None,
    target_name: Annotated[
        str | None, typer.Option(help="Name of the target plate (default: from the folder).", rich_help_panel=_DATA)
    ] = None,
    size: Annotated[
        int, typer.Option(min=8, max=1024, help="Image size (a multiple of 8).", rich_help_panel=_DATA)
    ] = 64,
    resize: Annotated[
        ResizeChoice,
        typer.Option(help="resize: squash to a square; crop: centre square.", rich_help_panel=_DATA),
    ] = ResizeChoice.resize,
    hflip: Annotated[
        bool, typer.Option("--hflip/--no-hflip", help="Random horizontal flips.", rich_help_panel=_DATA)
    ] = True,
    field: Annotated[
        FieldChoice,
        typer.Option(help="tube: the interaction field of IFM; coulomb: EFM's field.", rich_help_panel=_FIELD),
    ] = FieldChoice.tube,
    plate_distance: Annotated[
        float | None,
        typer.Option(
            "--plate-distance", "--L", help="L (default 10 for coulomb, 20 for tube).", rich_help_panel=_FIELD
        ),
    ] = None,
    plan: Annotated[
        PlanChoice,
        typer.Option(
            help="Pairing of the two batches: minibatch optimal transport or by index.", rich_help_panel=_FIELD
        ),
    ] = PlanChoice.ot,
    coulomb_target: Annotated[
        TargetChoice,
        typer.Option(help="repo: the official EFM target; phys: the exact field's direction.", rich_help_panel=_FIELD),
    ] = TargetChoice.repo,
    gamma: Annotated[float, typer.Option(min=0.0, help="γ of the repo target.", rich_help_panel=_FIELD)] = 5.0,
    tube_width: Annotated[
        float | None,
        typer.Option(
            min=1e-6,
            help="S, the tube field's width scale (default 5 × size/32: 5 at 32, 10 at 64).",
            rich_help_panel=_FIELD,
        ),
    ] = None,
    scheme: Annotated[
        SchemeChoice, typer.Option(help="How training heights are drawn.", rich_help_panel=_FIELD)
    ] = SchemeChoice.uniform,
    network: Annotated[
        NetworkChoice, typer.Option(help="Field network preset (tiny, small, base).", rich_help_panel=_OPT)
    ] = NetworkChoice.small,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Points per step (b).", rich_help_panel=_OPT)] = 32,
    charges: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65536,
            help="Charges per plate per step (B ≥ b; default 64 for coulomb, 256 for tube).",
            rich_help_panel=_OPT,
        ),
    ] = None,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (Adam).", rich_help_panel=_OPT)] = 2e-4,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up steps.", rich_help_panel=_OPT)] = 1000,
    lr_decay: Annotated[
        DecayChoice, typer.Option(help="After warm-up: constant, or cosine down to 10%.", rich_help_panel=_OPT)
    ] = DecayChoice.cosine,
    ema: Annotated[float, typer.Option(min=0.0, max=1.0, help="EMA decay.", rich_help_panel=_OPT)] = 0.9999,
    precision: Annotated[
        Precision, typer.Option(help="Autocast precision on GPU (CPU trains in fp32).", rich_help_panel=_OPT)
    ] = Precision.fp32,
    seed: Annotated[int, typer.Option(min=0, help="Seed of everything random.", rich_help_panel=_OPT)] = 0,
    steps: Annotated[
        int | None, typer.Option(min=1, help=f"Total steps (default {DEFAULT_STEPS}).", rich_help_panel=_RUN)
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            min=0.0, help="Stop this session after so many minutes (checkpoint, export).", rich_help_panel=_RUN
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default runs/SOURCE2TARGET).", rich_help_panel=_RUN)
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this folder from its latest checkpoint.", rich_help_panel=_RUN),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", rich_help_panel=_RUN)
    ] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Decoding processes (default: 0 when the data fits in memory).", rich_help_panel=_RUN),
    ] = None,
    log_every: Annotated[int, typer.Option(min=1, help="Steps per metrics line.", rich_help_panel=_RUN)] = 10,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps per checkpoint.", rich_help_panel=_RUN)] = 500,
    sample_every: Annotated[int, typer.Option(min=1, help="Steps per sample grid.", rich_help_panel=_RUN)] = 500,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> int:
    """Train a capacitor between two image folders; the run folder ends with a ready capacitor in RUN/model.

    The run folder holds config.json, checkpoints/, samples/, metrics.jsonl, loss.png and model/. Ctrl-C or
    --max-minutes stop cleanly (checkpoint and export); --resume RUN continues step for step.
    Under torchrun (python -m torch.distributed.run --nproc_per_node K -m efm_cli train ...) it trains data-parallel.

    Examples:
    efm train --source horse2zebra --size 64 --max-minutes 60
    efm train --source photos/summer --target photos/winter --out runs/s2w --steps 50000
    efm train --resume runs/s2w --max-minutes 120
    """
    console.set_quiet(quiet)
    from efm_cli.runs import Budget, RunError, fit, read_settings

    if resume is not None:
        _refuse_changes(ctx)
        try:
            settings = read_settings(resume)
        except RunError as error:
            raise EfmError(str(error), error.hint) from error
        run = resume
        total = steps or settings.schedule.total or DEFAULT_STEPS
    else:
        settings = _new_settings(
            source,
            target,
            source_name,
            target_name,
            size=size,
            resize=resize.value,
            hflip=hflip,
            field=field.value,
            L=plate_distance,
            plan=plan.value,
            target_mode=coulomb_target.value,
            gamma=gamma,
            S=tube_width,
            scheme=scheme.value,
            network=network.value,
            points=batch_size,
            charges=charges,
            lr=lr,
            warmup=warmup,
            decay=lr_decay.value,
            ema=ema,
            precision=precision.value,
            seed=seed,
            total=steps or DEFAULT_STEPS,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
        )
        run = out if out is not None else Path("runs") / f"{settings.source_name}2{settings.target_name}"
        if run.exists() and any(run.iterdir()):
            raise EfmError(f"{run} already holds files", f"continue it with --resume {run}, or pick another --out")
        total = steps or DEFAULT_STEPS
    reporter = _Reporter(total, quiet or json_output)
    console.info(f"training {settings.source_name} → {settings.target_name} in {run}")
    try:
        summary = fit(
            settings,
            run,
            budget=Budget(steps=total, minutes=max_minutes),
            resume=resume is not None,
            device=device,
            workers=workers,
            on_progress=reporter.update,
        )
    except RunError as error:
        raise EfmError(str(error), error.hint) from error
    finally:
        reporter.close()
    for item in summary.ignored:
        console.warn(f"skipped {item['path']}: {item['reason']}")
    if json_output:
        from dataclasses import asdict

        console.print_json(asdict(summary))
    else:
        loss = f"{summary.loss:.4f}" if summary.loss is not None else "-"
        console.info(
            f"step {summary.step} ({summary.stopped}), loss {loss}, {summary.steps_per_s:.2f} steps/s; "
            f"capacitor in {summary.model}"
        )
    return ExitCode.PARTIAL if summary.ignored else ExitCode.OK


def _refuse_changes(ctx: typer.Context) -> None:
    """With --resume the settings come from the run; a changed setting would silently not apply, so refuse it."""
    given = [
        name
        for name in ctx.params
        if name not in RESUMABLE and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise EfmError(
            f"{flags} cannot change when a run continues",
            "a resumed run keeps the settings in RUN/config.json; start a new run to change them",
            ExitCode.USAGE,
        )


def _new_settings(
    source: str | None,
    target: str | None,
    source_name: str | None,
    target_name: str | None,
    *,
    size: int,
    resize: str,
    hflip: bool,
    field: str,
    L: float | None,
    plan: str,
    target_mode: str,
    gamma: float,
    S: float | None,
    scheme: str,
    network: str,
    points: int,
    charges: int | None,
    lr: float,
    warmup: int,
    decay: str,
    ema: float,
    precision: str,
    seed: int,
    total: int,
    **every: int,
) -> RunSettings:
    from efm_cli.datasets import NOISE, Preprocessing, cyclegan_folders, domain_names
    from efm_cli.runs import RunSettings
    from efm_cli.train import DEFAULT_CHARGES, DEFAULT_L, FieldSpec, Schedule, default_tube_width

    if source is None:
        raise EfmError("nothing to train on", "pass --source A --target B, or --resume RUN", ExitCode.USAGE)
    root = None
    if target is None:
        layout = cyclegan_folders(Path(source)) if source != NOISE else None
        if layout is None:
            raise EfmError(
                "--target is missing", f"{source} has no trainA/ and trainB/ folders to use instead", ExitCode.USAGE
            )
        root = Path(source)
        source, target = str(layout[0]), str(layout[1])
    for folder in (source, target):
        if folder != NOISE and not Path(folder).is_dir():
            raise EfmError(f"{folder} is not a folder", "pass folders of images (or 'noise' as the source)")
    if source == target or (NOISE not in (source, target) and Path(source).resolve() == Path(target).resolve()):
        raise EfmError("--source and --target are the same", "a capacitor needs two different domains", ExitCode.USAGE)
    if NOISE not in (source, target):
        # Folders are searched recursively: a plate inside the other would put its pictures on both plates.
        for inner, outer, inner_flag, outer_flag in (
            (target, source, "--target", "--source"),
            (source, target, "--source", "--target"),
        ):
            if Path(inner).resolve().is_relative_to(Path(outer).resolve()):
                raise EfmError(
                    f"{inner_flag} {inner} is inside {outer_flag} {outer}",
                    "pass two separate folders: the outer one is searched recursively",
                    ExitCode.USAGE,
                )
    if size % 8:
        raise EfmError(f"--size {size} is not a multiple of 8", "use 32, 64, 128 or 256", ExitCode.USAGE)
    charges = charges if charges is not None else DEFAULT_CHARGES[field]
    if charges < points:
        raise EfmError(
            f"--charges {charges} is below --batch-size {points}", "points lie between charges", ExitCode.USAGE
        )
    names = domain_names(source, target, root)
    source_name, target_name = source_name or names[0], target_name or names[1]
    if source_name == target_name:
        raise EfmError(
            f"both plates would be called {source_name!r}",
            "name them with --source-name and --target-name",
            ExitCode.USAGE,
        )
    try:
        spec = FieldSpec(
            kind=field,  # type: ignore[arg-type]
            L=L if L is not None else DEFAULT_L[field],
            target=target_mode,  # type: ignore[arg-type]
            gamma=gamma,
            S=S if S is not None else default_tube_width(size),
            scheme=scheme,  # type: ignore[arg-type]
            plan=plan,  # type: ignore[arg-type]
        )
    except ValueError as error:
        raise EfmError(str(error), "see 'efm train --help'", ExitCode.USAGE) from error
    return RunSettings(
        source=source,
        target=target,
        source_name=source_name,
        target_name=target_name,
        prep=Preprocessing(size=size, resize=resize, hflip=hflip),  # type: ignore[arg-type]
        field=spec,
        schedule=Schedule(lr=lr, warmup=warmup, decay=decay, total=total, ema=ema),  # type: ignore[arg-type]
        network=network,
        charges=charges,
        points=points,
        seed=seed,
        precision=precision,  # type: ignore[arg-type]
        **every,
    )


class _Reporter:
    """A Rich progress bar on a terminal; otherwise one plain line every 30 seconds (for logs of background runs)."""

    def __init__(self, total: int, silent: bool) -> None:
        self.total, self.silent = total, silent
        self.bar: Any = None
        self.task: Any = None
        self.last_line = 0.0
        if not silent and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} it/s"),
                TimeRemainingColumn(),
                console=console.err_console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, loss="-", rate="-")

    def update(self, progress: Progress) -> None:
        loss, rate = f"{progress.smoothed:.4f}", f"{progress.steps_per_s:.2f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=progress.step, loss=loss, rate=rate)
        elif not self.silent and time.monotonic() - self.last_line >= 30:
            self.last_line = time.monotonic()
            console.info(f"step {progress.step}/{self.total}  loss {loss}  {rate} it/s  skipped {progress.skipped}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
