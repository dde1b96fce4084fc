"""`efm models`, `efm download`, `efm push`: the Hub commands, thin shells over `efm_cli.capacitor.registry` and
`efm_cli.capacitor.hub`.

Nothing heavy is imported at module level: the library modules (which pull in huggingface_hub) load
inside each command, so `efm --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from efm_cli.cli import console
from efm_cli.cli.options import JsonOption, QuietOption, model_reference
from efm_cli.errors import EfmError

_REPO_HELP = "Hub repo to publish to, as USER/NAME (created if missing)."


def _repo_name(value: str) -> str:
    """Typer callback: a bad --repo is a usage error (exit 2), caught before anything is read or sent."""
    from efm_cli.capacitor.hub import parse_hub_ref

    parsed = parse_hub_ref(value)
    if parsed is None or parsed[1] is not None:
        raise typer.BadParameter(f"{value!r} is not USER/NAME")
    return value


OfflineOption = Annotated[
    bool,
    typer.Option("--offline", help="Use the local cache only and send no request (same as HF_HUB_OFFLINE=1)."),
]


def _quiet_hub(quiet: bool, json_output: bool) -> None:
    """Progress bars only for a person watching stderr in colour (huggingface_hub's bars move the cursor with escape
    codes, which NO_COLOR rules out); under --quiet not even huggingface_hub's retry warnings."""
    console.set_quiet(quiet)
    if quiet or json_output or not console.live_terminal():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if quiet:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()


def _without_empty_commit_warning() -> None:
    """Drop huggingface_hub's "No files have been modified…" warning: push reports that case in its own words."""
    from huggingface_hub.utils import logging as hub_logging

    for handler in hub_logging.get_logger("huggingface_hub").handlers:
        handler.addFilter(lambda record: not record.getMessage().startswith("No files have been modified"))


def _describe(name: str, path: Path, origin: str, config: dict[str, Any]) -> dict[str, Any]:
    from efm_cli.capacitor import hub, registry
    from efm_cli.capacitor.format import AUTOENCODER_DIR, AUTOENCODER_WEIGHTS, WEIGHTS_NAME

    weights = [path / WEIGHTS_NAME]
    latent = config.get("latent")
    if latent is not None:
        weights.append(path / AUTOENCODER_DIR / AUTOENCODER_WEIGHTS)
    return {
        "name": name,
        "origin": origin,
        "path": str(path),
        "domains": [config["domains"]["source"], config["domains"]["target"]],
        "resolution": config["image"]["size"],
        "channels": config["image"]["channels"],
        "field": config["field"]["kind"],
        "space": "latent" if latent else "pixels",
        "autoencoder": {"kind": latent["kind"], "factor": latent["factor"], "channels": latent["channels"]}
        if latent
        else None,
        "size_bytes": sum(file.stat().st_size for file in weights),
        "parameters": sum(hub.parameters(file) for file in weights),
        "sampler": {"solver": "dopri5", **config.get("sampler", {})},
        "distilled_from": registry.distilled_from(config),
    }


def _sampler_cell(row: dict[str, Any]) -> str:
    """The default sampler in a few words (`heun, 6 steps`, `dopri5, rtol 0.001`), and the teacher of a distilled
    capacitor."""
    sampler = row["sampler"]
    text = str(sampler["solver"])  # `_describe` fills in the default
    if "steps" in sampler:
        text += f", {sampler['steps']} steps"
    elif "rtol" in sampler:
        text += f", rtol {sampler['rtol']:g}"
    return f"{text}, distilled from {row['distilled_from']}" if row["distilled_from"] else text


def models_command(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Also describe these capacitor or training-run folders (origin 'path').", show_default=False
        ),
    ] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """List the capacitors this machine has: embedded ones (weights/) and Hub downloads in the HF cache.

    Columns: name (what --model accepts), domains, resolution, field kind, space (pixels or an autoencoder's
    latent), sampler (the default, and the teacher of a distilled capacitor, which --to picks only with --fast),
    size (the autoencoder's weights included), origin.
    PATHS (optional) adds capacitor or training-run folders, with origin "path".
    Nothing is downloaded; no network request is made.

    Examples:
    efm models
    efm models --json | jq '.models[].name'
    efm models runs/h2z
    """
    from efm_cli.capacitor import hub, registry
    from efm_cli.capacitor.format import CapacitorError

    console.set_quiet(quiet)
    rows = [_describe(entry.name, entry.path, entry.origin, entry.config) for entry in registry.known()]
    for path in paths or []:
        folder, _ = hub.locate_capacitor(path)
        try:
            config = hub.check_folder(folder)
        except CapacitorError as error:
            raise EfmError(f"{path}: {error}", "pass a capacitor folder or a training run folder") from error
        rows.append(_describe(str(path), folder, "path", config))
    if json_output:
        console.print_json({"models": rows, "hf_hub_cache": str(hub.cache_dir())})
        return
    if not rows:
        console.info("no capacitor found: train one with 'efm train', or fetch one with 'efm download USER/NAME'")
        return
    _print_models(rows)


def _print_models(rows: list[dict[str, Any]]) -> None:
    """One row per capacitor; names, domains and paths come from folders and configs, so every cell is escaped."""
    from rich.table import Table

    table = Table()
    for column in ("name", "domains", "resolution", "field", "space", "sampler", "size", "origin"):
        table.add_column(column, overflow="fold")
    for row in rows:
        size = f"{row['size_bytes'] / 1e6:.1f} MB / {row['parameters'] / 1e6:.2f} M params"
        domains = f"{row['domains'][0]} ↔ {row['domains'][1]}"
        space = "pixels" if row["autoencoder"] is None else f"latent ({row['autoencoder']['kind']})"
        resolution = f"{row['resolution']}×{row['resolution']}"
        cells = (row["name"], domains, resolution, row["field"], space, _sampler_cell(row), size, row["origin"])
        table.add_row(*(console.cell(cell) for cell in cells))
    console.out_console().print(table)


def download_command(
    ref: Annotated[
        str,
        typer.Argument(callback=model_reference, help="USER/NAME or USER/NAME@REVISION (branch, tag or commit hash)."),
    ],
    offline: OfflineOption = False,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Fetch a capacitor from the Hugging Face Hub into the shared HF cache and print its local folder.

    REF is USER/NAME or USER/NAME@REVISION (a branch, tag or full commit hash).
    Only config.json, model.safetensors, README.md and sample.png are fetched.
    A revision already in the cache is not fetched again.
    HF_TOKEN: token for private repos. HF_ENDPOINT: a mirror.
    HF_HUB_OFFLINE=1 or --offline: use the cache only, send no request.

    Examples:
    efm download alice/horse2zebra
    efm download alice/horse2zebra@v1.0 --json
    HF_HUB_OFFLINE=1 efm download alice/horse2zebra
    """
    from efm_cli.capacitor import hub, registry

    _quiet_hub(quiet, json_output)
    if hub.parse_hub_ref(ref) is not None and not Path(ref).is_dir():
        folder = hub.download(ref, offline=offline)
    else:
        folder = registry.resolve(ref)
    config = hub.check_folder(folder)
    if json_output:
        files = sorted(path.name for path in folder.iterdir() if path.is_file())
        domains = [config["domains"]["source"], config["domains"]["target"]]
        console.print_json({"ref": ref, "path": str(folder), "files": files, "domains": domains})
    else:
        print(console.escape(folder))


def push_command(
    folder: Annotated[
        Path, typer.Argument(help="A training run folder (its model/ is pushed) or a capacitor folder.", exists=True)
    ],
    repo: Annotated[str, typer.Option("--repo", help=_REPO_HELP, callback=_repo_name, show_default=False)],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private (if it is new).")] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to (created if missing); default main.")
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    json_output: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Publish a capacitor to the Hugging Face Hub, with a model card and its sample grid.

    FOLDER is a training run folder (its model/ is pushed) or a capacitor folder.
    Uploads config.json, model.safetensors, README.md and sample.png.
    The model card is generated, unless the capacitor folder has its own README.md.
    Needs a token with write access: HF_TOKEN, or a login stored by 'hf auth login'.
    Prints the commit URL (the branch's head when it already held these files: no empty commit is made).

    Examples:
    efm push runs/horse2zebra --repo alice/horse2zebra
    efm push runs/horse2zebra --repo alice/horse2zebra --private --revision experiment-2
    """
    from efm_cli.capacitor import hub

    _quiet_hub(quiet, json_output)
    _without_empty_commit_warning()
    result = hub.push(folder, repo, private=private, revision=revision, commit_message=message)
    if json_output:
        console.print_json(
            {
                "repo": result.repo_id,
                "revision": result.revision,
                "commit": result.commit,
                "url": result.url,
                "files": list(result.files),
                "changed": result.changed,
            }
        )
    else:
        if result.changed:
            console.info(f"pushed {', '.join(result.files)} to {result.repo_id} ({result.revision})")
        else:
            console.info(f"{result.repo_id} ({result.revision}) already holds these files: nothing to commit")
        print(console.escape(result.url))
