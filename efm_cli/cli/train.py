"""`efm train`: options in, a run folder out (the work is `efm_cli.training.run.fit`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from efm_cli.capacitor.format import MAX_SIZE, MIN_SIZE
from efm_cli.cli import console
from efm_cli.cli.console import ExitCode
from efm_cli.cli.options import JsonOption, PrecisionChoice, QuietOption, choices, device_option
from efm_cli.errors import EfmError, UsageError

if TYPE_CHECKING:
    from efm_cli.training.run import Progress, RunSettings, Summary

FieldChoice = choices("FieldChoice", ("coulomb", "tube"))
PlanChoice = choices("PlanChoice", ("independent", "ot"))
ResizeChoice = choices("ResizeChoice", ("resize", "crop"))
TargetChoice = choices("TargetChoice", ("repo", "phys"))
SchemeChoice = choices("SchemeChoice", ("uniform", "pfgm"))
NetworkChoice = choices("NetworkChoice", ("tiny", "small", "base"))
DecayChoice = choices("DecayChoice", ("constant", "cosine"))


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
        int | None,
        typer.Option(
            min=MIN_SIZE,
            max=MAX_SIZE,
            help="Image size, a multiple of 8 (default: the images' median shorter side, from 32 to 64).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    resize: Annotated[
        ResizeChoice,
        typer.Option(help="resize: squash to a square; crop: centre square.", rich_help_panel=_DATA),
    ] = ResizeChoice.resize,
    hflip: Annotated[
        bool | None,
        typer.Option(
            "--hflip/--no-hflip",
            help="Random horizontal flips (default: on when both plates look mirror-symmetric, as photos do; off "
            "for digits, text and other pictures whose mirror image the domain never shows).",
            show_default=False,
            rich_help_panel=_DATA,
        ),
    ] = None,
    field: Annotated[
        FieldChoice,
        typer.Option(help="tube: the interaction field of IFM; coulomb: EFM's field.", rich_help_panel=_FIELD),
    ] = FieldChoice.tube,
    latent: Annotated[
        str | None,
        typer.Option(
            help="Train in an autoencoder's latent space: an autoencoder folder (diffusers AutoencoderTiny or "
            "AutoencoderKL), an 'efm autoencoder' run, or a Hub repo user/name[@revision]. The capacitor ships it.",
            rich_help_panel=_DATA,
        ),
    ] = None,
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
    warmup: Annotated[
        int | None,
        typer.Option(min=0, help="Warm-up steps (default 10% of the steps, at most 1000).", rich_help_panel=_OPT),
    ] = None,
    lr_decay: Annotated[
        DecayChoice, typer.Option(help="After warm-up: constant, or cosine down to 10%.", rich_help_panel=_OPT)
    ] = DecayChoice.cosine,
    ema: Annotated[float, typer.Option(min=0.0, max=1.0, help="EMA decay.", rich_help_panel=_OPT)] = 0.9999,
    precision: Annotated[
        PrecisionChoice, typer.Option(help="Autocast precision on GPU (CPU trains in fp32).", rich_help_panel=_OPT)
    ] = PrecisionChoice.fp32,
    seed: Annotated[int, typer.Option(min=0, help="Seed of everything random.", rich_help_panel=_OPT)] = 0,
    steps: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Total steps of the schedule (default: what fits in --max-minutes, else 20000); with --resume, "
            "the run's new length.",
            rich_help_panel=_RUN,
        ),
    ] = None,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="Stop this session after so many minutes (checkpoint, export). Without --steps the schedule is "
            "sized to end in this time, from the speed measured over the first steps.",
            rich_help_panel=_RUN,
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default runs/SOURCE2TARGET).", rich_help_panel=_RUN)
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder from its latest checkpoint (an error if it has none).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    device: Annotated[str, device_option(_RUN)] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(min=0, help="Decoding processes (default: 0 when the data fits in memory).", rich_help_panel=_RUN),
    ] = None,
    log_every: Annotated[
        int,
        typer.Option(
            min=1, help="Steps per metrics line (a session's last step is always logged).", rich_help_panel=_RUN
        ),
    ] = 10,
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
    started = time.monotonic()
    console.set_quiet(quiet)
    from efm_cli.training.run import (
        Budget,
        fit,
        flips_message,
        new_settings,
        read_settings,
        with_minutes,
        with_steps,
    )

    if resume is not None:
        _refuse_changes(ctx)
        run = resume
        settings = read_settings(resume)
        if steps is not None:
            settings = with_steps(settings, steps)
        elif max_minutes is not None:
            settings = with_minutes(settings, max_minutes)
    else:
        settings = new_settings(
            source,
            target,
            source_name=source_name,
            target_name=target_name,
            size=size,
            resize=resize.value,
            hflip=hflip,
            field=field.value,
            L=plate_distance,
            plan=plan.value,
            mode=coulomb_target.value,
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
            steps=steps,
            minutes=max_minutes,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
            latent=latent,
        )
        run = out if out is not None else Path("runs") / f"{settings.source_name}2{settings.target_name}"
        if run.exists() and any(run.iterdir()):
            raise EfmError(f"{run} already holds files", f"continue it with --resume {run}, or pick another --out")
    reporter = Reporter(settings.schedule.total, quiet or json_output)
    console.info(f"training {settings.source_name} → {settings.target_name} in {run}")
    flips = flips_message(settings) if resume is None else None
    if flips is not None:
        console.info(flips)
    try:
        summary = fit(
            settings,
            run,
            budget=Budget(minutes=max_minutes, started=started),
            resume=resume is not None,
            device=device,
            workers=workers,
            on_progress=reporter.update,
            warn=console.warn,
            say=console.info,
        )
    finally:
        reporter.close()
    for item in summary.ignored:
        console.warn(f"skipped {item['path']}: {item['reason']}")
    if json_output:
        from dataclasses import asdict

        console.print_json(asdict(summary))
    else:
        _print_summary(summary, settings)
    return ExitCode.PARTIAL if summary.ignored else ExitCode.OK


_STOPS = {"steps": "the schedule is done", "time": "out of time", "interrupted": "interrupted"}


def _print_summary(summary: Summary, settings: RunSettings) -> None:
    """One screen on stderr: what the run did, where its results are, and what to run next."""
    loss = f"{summary.loss:.4f}" if summary.loss is not None else "-"
    lr = f"{summary.lr:.2e}" if summary.lr is not None else "-"
    of = f" of {summary.total}" if summary.total is not None else ""
    stop = _STOPS.get(summary.stopped, summary.stopped)
    if summary.stopped == "time" and summary.total is not None and summary.step < summary.total:
        stop += f"; continue with: efm train --resume {summary.run}"
    lines = [
        f"step {summary.step}{of} ({stop}) in {summary.seconds / 60:.1f} min, {summary.steps_per_s:.2f} steps/s",
        f"  loss {loss} (smoothed), last learning rate {lr}",
        f"  capacitor    {summary.model}",
    ]
    if summary.samples is not None:
        lines.append(f"  samples      {summary.samples} (left: inputs, right: their translations)")
    lines += [
        f"  loss curve   {Path(summary.run) / 'loss.png'}",
        f"  next         efm eval -m {summary.model} --source HELD_OUT_{settings.source_name.upper()} "
        f"--target HELD_OUT_{settings.target_name.upper()} --train-source {settings.source} "
        f"--train-target {settings.target}",
        f"               efm translate IMAGES -m {summary.model}",
    ]
    for line in lines:
        console.info(line)


def _refuse_changes(ctx: typer.Context) -> None:
    """With --resume the settings come from the run; a changed setting would silently not apply, so refuse it."""
    given = [
        name
        for name in ctx.params
        if name not in RESUMABLE and ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise UsageError(
            f"{flags} cannot change when a run continues",
            "a resumed run keeps the settings in RUN/config.json; start a new run to change them",
        )


class Reporter:
    """A Rich progress bar on a terminal; otherwise one plain line every 30 seconds (for logs of background runs)."""

    def __init__(self, total: int | None, silent: bool) -> None:
        self.total, self.silent = total, silent
        self.bar: Any = None
        self.task: Any = None
        self.last_line = 0.0
        if not silent and console.live_terminal():
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
        self.total = progress.total  # a time-sized schedule gets its length after the first steps
        if self.bar is not None:
            self.bar.update(self.task, completed=progress.step, total=progress.total, loss=loss, rate=rate)
        elif not self.silent and time.monotonic() - self.last_line >= 30:
            self.last_line = time.monotonic()
            of = f"/{self.total}" if self.total is not None else " (measuring the speed)"
            console.info(f"step {progress.step}{of}  loss {loss}  {rate} it/s  skipped {progress.skipped}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
