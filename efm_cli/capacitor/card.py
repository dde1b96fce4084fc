"""Model cards: the README.md that `efm push` puts beside a capacitor on the Hub.

The YAML header is what the Hub indexes (`library_name: efm-cli`, `pipeline_tag: image-to-image`, tags, datasets,
metrics); the body shows the sample grid, summarises training from config["training"] and tells a reader how to use
the capacitor with `efm`. Every value from the config is written as a JSON string or number, which YAML reads
verbatim, so a domain name can never break the header. Built from the config alone: no torch, no network.
"""

from __future__ import annotations

import json
import re
from typing import Any

LIBRARY_NAME = "efm-cli"
PIPELINE_TAG = "image-to-image"
BASE_TAGS = ("efm", "electrostatic-field-matching", "unpaired-image-to-image")
FIELD_NAMES = {
    "coulomb": "Electrostatic Field Matching (Coulomb field)",
    "tube": "Interaction Field Matching (tube field)",
}


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _scalar(value: Any) -> str:
    """A YAML scalar that reads back as exactly this value."""
    return json.dumps(value, ensure_ascii=False)


def _yaml_list(key: str, values: list[Any]) -> list[str]:
    return [f"{key}:", *(f"- {_scalar(value)}" for value in values)] if values else []


def _metrics(training: dict[str, Any]) -> dict[str, float]:
    metrics = training.get("metrics")
    if not isinstance(metrics, dict):
        return {}
    return {str(k): v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _datasets(training: dict[str, Any]) -> list[str]:
    datasets = training.get("datasets")
    if isinstance(datasets, str):
        return [datasets]
    if isinstance(datasets, list):
        return [item for item in datasets if isinstance(item, str) and item]
    return []


def header(config: dict[str, Any]) -> str:
    """The YAML front matter, between `---` lines."""
    source, target = config["domains"]["source"], config["domains"]["target"]
    training = config.get("training") or {}
    tags = [*BASE_TAGS, f"{config['field']['kind']}-field"]
    tags += [tag for tag in (_tag(source), _tag(target)) if tag and tag not in tags]
    lines = ["---", f"library_name: {LIBRARY_NAME}", f"pipeline_tag: {PIPELINE_TAG}"]
    lines += _yaml_list("tags", tags)
    lines += _yaml_list("datasets", _datasets(training))
    lines += _yaml_list("metrics", list(_metrics(training)))
    return "\n".join([*lines, "---"]) + "\n"


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    if not rows:
        return []
    return ["| | |", "| --- | --- |", *(f"| {name} | {_cell(value)} |" for name, value in rows)]


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text.replace("|", "\\|").replace("\n", " ")


def _latent_rows(config: dict[str, Any]) -> list[tuple[str, Any]]:
    """A latent capacitor names the autoencoder its field lives in (shipped in the repo's autoencoder/ folder)."""
    latent = config.get("latent")
    if latent is None:
        return [("space", "pixels")]
    size = config["image"]["size"] // latent["factor"]
    where = f"{latent['kind']} in autoencoder/, {latent['factor']}× smaller, {latent['channels']}×{size}×{size} codes"
    rows = [("space", "latent"), ("autoencoder", where)]
    if latent.get("origin"):
        rows.append(("autoencoder origin", latent["origin"]))
    return rows


def _distilled_lines(config: dict[str, Any]) -> list[str]:
    """What a distilled capacitor (`efm distill`) was made from and how near its few steps land to its teacher."""
    record = config.get("distilled")
    if not isinstance(record, dict):
        return []
    rows = [
        ("teacher", record.get("teacher")),
        ("Euler steps (network passes per image)", record.get("nfe")),
        ("training pairs", record.get("pairs")),
        ("held-out pairs", record.get("held_out")),
        ("training steps", record.get("steps")),
    ]
    errors = record.get("errors") if isinstance(record.get("errors"), dict) else {}
    for steps, pair in errors.items():
        if isinstance(pair, dict):
            label = f"held-out endpoint error at {steps} step(s): student / teacher's field"
            rows.append((label, f"{pair.get('student')} / {pair.get('teacher')}"))
    lines = ["", "## Distilled", ""]
    lines += [
        "This capacitor was distilled from its teacher by `efm distill`: its field lines are straight, so a few",
        "Euler steps carry an image to the other plate. Errors are RMS differences from the teacher's own endpoints,",
        "in 8-bit levels.",
        "",
    ]
    return lines + _table([(name, value) for name, value in rows if value is not None])


def render(config: dict[str, Any], repo_id: str, *, sample: str | None = None, embedded: bool = False) -> str:
    """The whole README.md of a capacitor published as `repo_id`; `sample` names the grid image beside it.

    With `embedded`, `repo_id` is the capacitor's folder name in `weights/`, and the usage section shows `--to`
    and the short name instead of a download.
    """
    source, target = config["domains"]["source"], config["domains"]["target"]
    field, image = config["field"], config["image"]
    training = config.get("training") or {}
    lines = [header(config), f"# {repo_id.split('/')[-1]}: {source} ↔ {target}", ""]
    lines += [
        f"An `efm` capacitor trained with {FIELD_NAMES.get(field['kind'], field['kind'])}: images of *{source}* sit on",
        f"one plate, images of *{target}* on the other, and translation follows the learned field lines from one plate",
        "to the other. The same capacitor translates in both directions.",
        "",
    ]
    distilled = config.get("distilled") is not None
    passes = (config.get("sampler") or {}).get("steps")
    if distilled and passes is not None:
        lines += [f"Distilled for speed: translation takes {passes} network passes.", ""]
    if sample:
        lines += [f"![Sample grid: {source} inputs and their {target} translations]({sample})", ""]
    lines += ["## Capacitor", ""]
    lines += _table(
        [
            ("domains", f"{source} (source plate) ↔ {target} (target plate)"),
            ("field", field["kind"]),
            ("plate distance L", field["L"]),
            ("image size", f"{image['size']}×{image['size']}, {image['channels']} channels"),
            ("network", config["network"].get("kind", "-")),
            *_latent_rows(config),
        ]
    )
    scalars = [
        (k, v) for k, v in training.items() if k not in ("metrics", "datasets") and not isinstance(v, dict | list)
    ]
    datasets, metrics = _datasets(training), _metrics(training)
    lines += _distilled_lines(config)
    if scalars or datasets:
        lines += ["", "## Training of the teacher" if distilled else "## Training", ""]
        lines += _table([*scalars, *([("datasets", ", ".join(datasets))] if datasets else [])])
    if metrics:
        lines += ["", "## Metrics", ""]
        lines += _table(list(metrics.items()))
    source_dir, target_dir = f"{_tag(source) or 'source'}-images", f"{_tag(target) or 'target'}-images"
    fast = " --fast" if distilled else ""
    shell = (
        [
            f"efm translate ./{source_dir} --to {target}{fast}  # embedded in efm: no download",
            f"efm translate ./{target_dir} --to {source}{fast}  # and back",
        ]
        if embedded
        else [
            "pip install efm-cli",
            f"efm download {repo_id}",
            f"efm translate ./{source_dir} --model {repo_id} --out ./{target_dir}",
        ]
    )
    lines += ["", "## Use it with efm", "", "```bash", *shell, "```"]
    lines += [
        "",
        "From Python (images are [b, C, H, W] tensors in [-1, 1] at the capacitor's size):",
        "",
        "```python",
        "from efm_cli.capacitor import Capacitor",
        "",
        f"capacitor = Capacitor.from_pretrained({_scalar(repo_id)})",
        f"out = capacitor.translate(images, to={_scalar(target)})  # to={_scalar(source)} goes backwards",
        "out.images",
        "```",
        "",
        "Loading reads only config.json and model.safetensors; nothing is unpickled.",
        "",
    ]
    return "\n".join(lines)
