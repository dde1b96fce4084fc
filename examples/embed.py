"""Embed a trained capacitor in `weights/`: weights (fp16 by default), eval metrics, a picture and a model card.

    python examples/embed.py runs/h2z/model horse2zebra --eval h2z-eval.json --picture grid.png --dataset horse2zebra

The eval file is the output of `efm eval --json`; its headline numbers go into config.json's training metrics, which
`efm models` and the card show. The folder is assembled beside its destination and renamed into place, so
`weights/NAME` is either the old capacitor or the complete new one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from efm_cli.capacitor import card
from efm_cli.capacitor.format import CARD_NAME, SAMPLE_NAME, WEIGHTS_NAME, CapacitorError
from efm_cli.capacitor.model import Capacitor

REPO = Path(__file__).resolve().parents[1]
SIZE_LIMIT = 25 * 2**20
"""Largest model.safetensors the package may carry (issue 6)."""


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of an `efm eval --json` report, flat and rounded for the card."""
    fd, speed = report.get("fd") or {}, report.get("speed") or {}
    values = {
        "target_rate": report.get("target_rate"),
        "target_rate_se": report.get("target_rate_se"),
        "robust_target_rate": report.get("robust_target_rate"),
        "classifier_accuracy": (report.get("classifier") or {}).get("accuracy"),
        "fd": fd.get("translated"),
        "fd_se": fd.get("translated_se"),
        "fd_no_op": fd.get("no_op"),
        "fd_noise_floor": fd.get("noise_floor"),
        "structure_ssim": report.get("structure_ssim"),
        "hue_difference_deg": report.get("hue_difference_deg"),
        "mean_abs_change": report.get("mean_abs_change"),
        "nfe_mean": speed.get("nfe_mean"),
    }
    return {k: round(float(v), 4) for k, v in values.items() if isinstance(v, int | float)}


def embed(
    model: Path,
    name: str,
    *,
    weights: Path,
    report: dict[str, Any] | None,
    picture: Path | None,
    datasets: list[str],
    fp16: bool,
) -> Path:
    capacitor = Capacitor.from_pretrained(model)
    training = capacitor.config.setdefault("training", {})
    if report is not None:
        training["metrics"] = metrics(report)
    if datasets:
        training["datasets"] = datasets
    picture = picture or model / SAMPLE_NAME
    sample = SAMPLE_NAME if picture.is_file() else None
    weights.mkdir(parents=True, exist_ok=True)
    destination = weights / name
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=weights) as staging:
        folder = capacitor.save_pretrained(Path(staging) / name, dtype=torch.float16 if fp16 else None)
        if sample:
            with Image.open(picture) as image:
                image.convert("RGB").save(folder / sample)
        (folder / CARD_NAME).write_text(
            card.render(capacitor.config, name, sample=sample, embedded=True), encoding="utf-8"
        )
        size = (folder / WEIGHTS_NAME).stat().st_size
        if size > SIZE_LIMIT:
            raise CapacitorError(f"model.safetensors is {size / 2**20:.1f} MiB, over the {SIZE_LIMIT >> 20} MiB limit")
        if destination.exists():
            shutil.rmtree(destination)
        folder.rename(destination)
    return destination


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="capacitor folder, e.g. runs/NAME/model")
    parser.add_argument("name", help="folder name under weights/ (the short name users type)")
    parser.add_argument("--eval", type=Path, help="efm eval --json output to record in the config and card")
    parser.add_argument("--picture", type=Path, help="image for the card (default: the model's sample.png)")
    parser.add_argument("--dataset", action="append", default=[], help="training dataset name (repeatable)")
    parser.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16, half the size)")
    parser.add_argument("--weights", type=Path, default=REPO / "weights", help="where embedded capacitors live")
    args = parser.parse_args()
    report = json.loads(args.eval.read_text(encoding="utf-8")) if args.eval else None
    try:
        folder = embed(
            args.model,
            args.name,
            weights=args.weights,
            report=report,
            picture=args.picture,
            datasets=args.dataset,
            fp16=not args.fp32,
        )
    except CapacitorError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(json.dumps({"folder": str(folder), "bytes": size, "files": sorted(f.name for f in folder.iterdir())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
