"""`efm autoencoder`: train the autoencoder a latent capacitor lives in (the work is
`efm_cli.training.autoencoder.fit_autoencoder`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from efm_cli.cli import console
from efm_cli.cli.console import ExitCode
from efm_cli.cli.options import JsonOption, QuietOption, device_option
from efm_cli.cli.train import Reporter
from efm_cli.errors import EfmError, UsageError

_RUN = "Run"


def autoencoder_command(
    source: Annotated[
        Path | None,
        typer.Option(help="Source images, or a CycleGAN-style folder holding trainA/ and trainB/."),
    ] = None,
    target: Annotated[
        Path | None, typer.Option(help="Target images (both plates' images train one autoencoder).")
    ] = None,
    held_out: Annotated[
        list[Path] | None,
        typer.Option(help="A folder of held-out images to report reconstructions on (repeatable)."),
    ] = None,
    size: Annotated[int, typer.Option(help="Training resolution (a multiple of 8).")] = 128,
    architecture: Annotated[
        str,
        typer.Option(
            help="small: codes 8× smaller than the images (photos); small-4x: 4× smaller (e.g. 32×32 digits).",
        ),
    ] = "small",
    batch_size: Annotated[int, typer.Option(min=2, help="Images per step, half from each folder.")] = 16,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (Adam, cosine to 10%).")] = 1e-3,
    gradient_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the image-gradient L1 term (keeps edges and texture).")
    ] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of everything random.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Total steps (default 3000).", rich_help_panel=_RUN)] = None,
    max_minutes: Annotated[
        float | None, typer.Option(min=0.0, help="Stop this session after so many minutes.", rich_help_panel=_RUN)
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default runs/autoencoder).", rich_help_panel=_RUN)
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run in this folder from its latest checkpoint.", rich_help_panel=_RUN),
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1, help="Steps per checkpoint.", rich_help_panel=_RUN)] = 250,
    device: Annotated[str, device_option(_RUN)] = "auto",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> int:
    """Train an autoencoder on two image folders for latent capacitors (efm train --latent RUN/model).

    RUN/model is a diffusers AutoencoderTiny folder; RUN/samples/ shows images above their reconstructions and
    RUN/model/efm.json reports PSNR, SSIM and texture kept on the held-out images. --resume RUN continues step for step.

    Examples:
    efm autoencoder --source horse2zebra --held-out horse2zebra/testB --max-minutes 60
    efm autoencoder --resume runs/autoencoder --steps 6000
    """
    console.set_quiet(quiet)
    from efm_cli.training.autoencoder import AutoencoderSettings, fit_autoencoder, read_settings
    from efm_cli.training.data import cyclegan_folders
    from efm_cli.training.run import Budget

    if resume is not None:
        run = resume
        settings = read_settings(resume)
        if steps is not None:
            settings = replace(settings, steps=steps)
    else:
        if source is None:
            raise UsageError("say which images to learn from", "pass --source and --target, or a CycleGAN folder")
        if target is None:
            pair = cyclegan_folders(source)
            if pair is None:
                raise UsageError(f"{source} has no trainA/ and trainB/", "pass --target as well")
            source, target = pair
        settings = AutoencoderSettings(
            source=str(source),
            target=str(target),
            size=size,
            architecture=architecture,
            batch=batch_size,
            lr=lr,
            gradient_weight=gradient_weight,
            seed=seed,
            held_out=tuple(str(p) for p in held_out or ()),
            checkpoint_every=checkpoint_every,
            **({"steps": steps} if steps is not None else {}),
        )
        run = out if out is not None else Path("runs") / "autoencoder"
        if run.exists() and any(run.iterdir()):
            raise EfmError(f"{run} already holds files", f"continue it with --resume {run}, or pick another --out")
    reporter = Reporter(settings.steps, quiet or json_output)
    console.info(f"training an autoencoder on {settings.source} and {settings.target} in {run}")
    try:
        summary = fit_autoencoder(
            settings,
            run,
            budget=Budget(minutes=max_minutes),
            resume=resume is not None,
            device=device,
            on_progress=reporter.update,
            warn=console.warn,
        )
    finally:
        reporter.close()
    if json_output:
        from dataclasses import asdict

        console.print_json(asdict(summary))
    else:
        for name, report in summary.held_out.items():
            console.info(
                f"{name}: PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.3f}, texture kept {report['texture']:.2f}"
            )
        console.info(f"step {summary.step} ({summary.stopped}); autoencoder in {summary.model}")
    return ExitCode.OK
