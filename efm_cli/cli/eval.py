"""`efm eval`: parse the flags, run `efm_cli.evaluation.report.report`, print a table or one JSON document."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from efm_cli.cli import console
from efm_cli.cli.console import ExitCode
from efm_cli.cli.options import DeviceOption, JsonOption, QuietOption, choices, model_reference
from efm_cli.files import write_json

Features = choices("Features", ("classifier", "inception"))


def eval_command(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", callback=model_reference, help="Capacitor: a folder, user/name on the Hub, or a name."
        ),
    ],
    source: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False, help="Held-out source images to translate."),
    ],
    target: Annotated[
        Path,
        typer.Option(exists=True, file_okay=False, help="Held-out target images to compare with."),
    ],
    train_source: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="Source images the domain classifier trains on."),
    ] = None,
    train_target: Annotated[
        Path | None,
        typer.Option(exists=True, file_okay=False, help="Target images the domain classifier trains on."),
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Evaluate at most N images of each held-out folder.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images translated at once.")] = 64,
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(min=0, help="Seed of splits, subsets, noise and the classifier.")] = 0,
    features: Annotated[
        Features,
        typer.Option(help="Also report Inception FID/KID (needs torchvision's weights on this machine)."),
    ] = Features.classifier,
    against: Annotated[
        str | None,
        typer.Option(
            callback=model_reference,
            help="A second capacitor to translate the same images: the report adds its numbers and the differences "
            "(--model minus it) with paired standard errors.",
        ),
    ] = None,
    report_path: Annotated[
        Path | None,
        typer.Option(
            "--report",
            dir_okay=False,
            help="Also write the JSON document to FILE (atomically), whether stdout shows the table or the JSON.",
        ),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Report how well a capacitor translates held-out images: target rate, trick test, FD, structure, hue, speed.

    A small domain classifier is trained on the train folders (or, without them, on a seeded half of each given
    folder) and cached beside the capacitor, so the second run on the same data starts at once. With too few
    held-out images of a domain, or a classifier that misjudges too many of them, the report says its numbers mean
    nothing.

    Examples:
    efm eval -m cap --source d/test/two --target d/test/three --train-source d/train/two --train-target d/train/three
    efm eval -m runs/h2z/model --source h2z/testA --target h2z/testB --limit 100 --json
    efm eval -m runs/h2z/model --source h2z/testA --target h2z/testB --report runs/h2z/eval.json
    efm eval -m runs/h2z-distilled/model --against horse2zebra --source h2z/testA --target h2z/testB
    """
    console.set_quiet(quiet)
    if (train_source is None) != (train_target is None):
        raise typer.BadParameter("give both --train-source and --train-target, or neither")

    from efm_cli.evaluation.report import report as evaluate

    report = evaluate(
        model,
        source,
        target,
        train_source=train_source,
        train_target=train_target,
        limit=limit,
        batch_size=batch_size,
        device=device,
        seed=seed,
        features=features.value,
        against=against,
        say=console.info,
    )
    for item in report["classifier"]["skipped"]:
        console.warn(f"classifier training skipped {item['path']}: {item['reason']}")
    for item in report["skipped"]:
        console.warn(f"skipped {item['path']}: {item['reason']}")
    if not report["meaningful"]:
        console.warn(f"these numbers mean nothing: {'; '.join(report['meaningless_because'])}")
    if report_path is not None:
        write_json(report_path, report)
    if json_output:
        console.print_json(report)
    else:
        _print_table(report)
    if report["skipped"]:
        raise typer.Exit(ExitCode.PARTIAL)


def _number(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _plus_minus(value: float | None, error: float | None, digits: int) -> str:
    """`value ± error`, or the value alone where the error is unknown."""
    shown, spread = _number(value, digits), _number(error, digits)
    return shown if "-" in (shown, spread) else f"{shown} ± {spread}"


def _signed(value: float | None, error: float | None, digits: int) -> str:
    """`+value ± error` for a difference, whose sign is the point."""
    shown = _plus_minus(value, error, digits)
    return shown if shown == "-" or shown.startswith("-") else "+" + shown


def _against_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The second capacitor's headline numbers and the paired differences, for the table."""
    other = report["against"]
    if other is None:
        return []
    difference, ref = other["difference"], other["model"]["ref"]
    return [
        (f"against {ref}", "", "the same images, classifier and targets"),
        ("  target rate", _plus_minus(other["target_rate"], other["target_rate_se"], 3), ""),
        ("  robust target rate", _plus_minus(other["robust_target_rate"], other["robust_target_rate_se"], 3), ""),
        ("  FD", _plus_minus(other["fd"], other["fd_se"], 2), ""),
        ("  structure (SSIM)", _number(other["structure_ssim"]), ""),
        ("  hue difference", _number(other["hue_difference_deg"], 1), ""),
        ("  NFE", _number(other["speed"]["nfe_mean"], 1), f"{other['speed']['landed']} landed"),
        ("  images/s", _number(other["speed"]["images_per_second"], 2), ""),
        (
            "difference: target rate",
            _signed(difference["target_rate"], difference["target_rate_se"], 3),
            f"--model minus {ref}, ± paired standard error (the same images)",
        ),
        (
            "difference: robust",
            _signed(difference["robust_target_rate"], difference["robust_target_rate_se"], 3),
            "",
        ),
        ("difference: FD", _signed(difference["fd"], difference["fd_se"], 2), "paired bootstrap standard error"),
    ]


def _print_table(report: dict[str, Any]) -> None:
    """One table: metric, value, and what the value is measured against."""
    from rich.table import Table
    from rich.text import Text

    model, data, cls, tricks = report["model"], report["data"], report["classifier"], report["trick_test"]
    fd, speed = report["fd"], report["speed"]
    target = model["target"]
    title = (
        f"{model['source']} → {target}: {data['images']['source']} source and {data['images']['target']} "
        f"target images ({'given train folders' if data['split'] == 'given' else 'folders split in half'})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("meaning", overflow="fold")
    if not report["meaningful"]:
        trust = "MEANINGLESS: " + "; ".join(report["meaningless_because"])
    elif tricks["trustworthy"]:
        trust = "trustworthy"
    else:
        trust = f"UNTRUSTWORTHY: fooled by {', '.join(tricks['fooled_by'])}"
    rows = [
        ("classifier accuracy", _number(cls["accuracy"]), "held-out, mean of both domains"),
        (
            "target rate",
            _plus_minus(report["target_rate"], report["target_rate_se"], 3),
            f"translations called {target!r}, ± one standard error; {trust}",
        ),
        (
            "robust target rate",
            _plus_minus(report["robust_target_rate"], report["robust_target_rate_se"], 3),
            "called so untouched and under every trick",
        ),
        ("source target rate", _number(tricks["source_rate"]), "untouched source images (no translation)"),
        *(
            (f"  trick: {name}", _number(rate), "source images after the trick; must stay within +0.10")
            for name, rate in tricks["rates"].items()
        ),
        ("mean abs change", _number(report["mean_abs_change"], 1), "per pixel and channel, levels of 255"),
        (
            "FD",
            _plus_minus(fd["translated"], fd["translated_se"], 2),
            "translations vs target, classifier features; ± bootstrap standard error",
        ),
        ("FD no-op", _number(fd["no_op"], 2), "source vs target"),
        ("FD noise floor", _number(fd["noise_floor"], 2), "target train vs target test"),
        ("structure (SSIM)", _number(report["structure_ssim"]), "luminance of input vs output at 64×64"),
        ("hue difference", _number(report["hue_difference_deg"], 1), f"degrees, over {report['hue_images']} images"),
        ("NFE", _number(speed["nfe_mean"], 1), f"field evaluations per image; {speed['landed']} landed"),
        ("images/s", _number(speed["images_per_second"], 2), f"on {speed['device']}"),
    ]
    if report["autoencoder"] is not None:
        ceiling = report["autoencoder"]
        rows += [
            ("autoencoder: target rate", _number(ceiling["target_rate"]), f"real {target!r} after encode, decode"),
            ("autoencoder: robust", _number(ceiling["robust_target_rate"]), "the same under every trick"),
            ("autoencoder: source", _number(ceiling["source_target_rate"]), "source images after encode, decode"),
            ("autoencoder: FD", _number(ceiling["fd"], 2), "real targets after encode, decode vs as they are"),
            ("autoencoder: SSIM", _number(ceiling["ssim"]), "real targets vs their reconstructions"),
        ]
    rows += _against_rows(report)
    if report["inception"] is not None:
        for metric, values in report["inception"].items():
            for name, value in values.items():
                rows.append((f"{metric.upper()} {name.replace('_', ' ')}", _number(value, 4), "Inception v3 pool"))
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    console.out_console().print(table)
