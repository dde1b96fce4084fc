"""`efm sampler`: measure a capacitor's NFE–error curve on held-out images, name the cheapest sampler setting within
the bound, and with `--write` store it in the capacitor's config.json; a thin shell over
`efm_cli.capacitor.sampler`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from efm_cli.cli import console
from efm_cli.cli.console import ExitCode
from efm_cli.cli.options import DeviceOption, JsonOption, QuietOption, model_reference

if TYPE_CHECKING:
    from efm_cli.capacitor.sampler import Choice

DEFAULT_LIMIT = 16


def _positive(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise typer.BadParameter("must be a positive number of 8-bit levels")
    return value


def sampler_command(
    model: Annotated[
        str,
        typer.Argument(callback=model_reference, help="Capacitor: a folder, user/name on the Hub, or a name."),
    ],
    images: Annotated[
        Path,
        typer.Option(
            "--images", exists=True, file_okay=False, help="Held-out source images (searched recursively, sorted)."
        ),
    ],
    limit: Annotated[
        int, typer.Option(min=1, help="Measure on the first N images (more: a steadier 95th percentile, slower).")
    ] = DEFAULT_LIMIT,
    bound: Annotated[
        float,
        typer.Option(
            callback=_positive,
            help="Largest 95th-percentile endpoint error allowed, in 8-bit levels (RMS per image, vs the reference).",
        ),
    ] = 1.0,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Measure the direction that ends on this plate (default: source → target)."),
    ] = None,
    write: Annotated[
        bool,
        typer.Option(
            "--write",
            help="Store the chosen setting (and the curve) in the capacitor's config.json; your own folders only.",
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images integrated together.")] = 16,
    device: DeviceOption = "auto",
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Choose a capacitor's default sampler by measurement: the fewest field evaluations within the bound.

    The images are carried to the other plate by a tight reference (dopri5 at rtol = atol = 1e-6; float64 on
    CUDA, float32 on a CPU) and by each candidate: dopri5 at 1e-2 … 1e-5, Heun at 4 … 64 steps, Euler at 4 … 256
    steps (and refinements). Each candidate's error is the RMS difference of its final images to the reference's, in
    8-bit levels; the chosen setting is the cheapest whose 95th percentile over the images is at most --bound. With
    --write it becomes the capacitor's sampler (embedded capacitors and the Hub cache are never changed: copy them
    first). On one CPU core a 64×64 capacitor takes about two minutes an image, a 32×32 one about half a minute.

    Examples:
    efm sampler runs/h2z/model --images horse2zebra/testA --limit 16
    efm sampler runs/digits --images digits/test/two --bound 2 --write
    efm sampler horse2zebra --images horse2zebra/testA --limit 4 --json > curve.json
    """
    console.set_quiet(quiet)
    from efm_cli import devices
    from efm_cli.capacitor import registry
    from efm_cli.capacitor import sampler as choose
    from efm_cli.capacitor.model import Capacitor
    from efm_cli.errors import EfmError

    target = choose.writable_folder(model) if write else None  # refused before anything is measured
    capacitor = Capacitor.from_pretrained(target or registry.resolve(model), device=devices.choose(device))
    direction = capacitor.direction_to(to) if to is not None else "forward"
    found, skipped = choose.load_folder(capacitor, images, limit)
    for path, reason in skipped:
        console.warn(f"skipped {path}: {reason}")
    if not len(found):
        raise EfmError(f"no readable images in {images}", "point --images at a folder of JPEG/PNG/WebP files")
    console.info(f"measuring {len(found)} image(s) on {next(capacitor.network.parameters()).device}")
    choice = choose.measure(capacitor, found, direction=direction, bound=bound, batch_size=batch_size, say=console.info)
    if json_output:
        console.print_json(choice.to_json())
    else:
        _print_table(choice)
    if choice.chosen is None:
        raise EfmError(
            f"no setting stays within {bound:g} levels of the reference at the 95th percentile",
            "raise --bound, or keep the capacitor's sampler",
        )
    if target is not None:
        written = choose.write(target, choice)
        console.info(f"wrote sampler {choice.sampler()} to {written}")
    if skipped:
        raise typer.Exit(ExitCode.PARTIAL)


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _print_table(choice: Choice) -> None:
    from rich.table import Table

    reference = choice.reference
    title = (
        f"{choice.images} image(s), {choice.direction}; reference dopri5 at {reference['rtol']:g} "
        f"({reference['dtype']}, {reference['nfe']:g} NFE); error: RMS vs reference, 8-bit levels"
    )
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("setting", "left"),
        ("NFE", "right"),
        ("error mean", "right"),
        ("error p95", "right"),
        ("error max", "right"),
        ("failed", "right"),
        ("seconds", "right"),
        ("", "left"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)
    for point in sorted(choice.curve, key=lambda p: (p.nfe_mean, p.error_p95)):
        marks = [
            "chosen" if point is choice.chosen else "",
            f"≤ {choice.bound:g}" if point.within(choice.bound) else "",
            "current" if point.current else "",
        ]
        table.add_row(
            console.cell(point.setting.label),
            _number(point.nfe_mean, 1),
            _number(point.error_mean, 2),
            _number(point.error_p95, 2),
            _number(point.error_max, 2),
            str(point.failed),
            _number(point.seconds, 1),
            console.cell(", ".join(mark for mark in marks if mark)),
        )
    chosen = choice.chosen
    table.caption = (
        f"chosen: {chosen.setting.label} ({chosen.nfe_mean:.1f} NFE, p95 {chosen.error_p95:.2f} ≤ {choice.bound:g})"
        if chosen is not None
        else f"chosen: none (no setting within {choice.bound:g} levels)"
    )
    table.caption_justify = "left"
    console.out_console().print(table)
