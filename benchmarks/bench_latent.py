"""Benchmark translation speed of latent capacitors against a pixel capacitor, on 256×256 photos.

Three capacitors translate the same horse2zebra testA photos through `efm_cli.translate.translate_files` (decode,
resize, [encode], integrate, [decode], bring back to 256×256 with the detail transfer, encode, write):

- `pixel-64`: a `small` UNet on 64×64 pixels, the embedded horse2zebra's shape;
- `latent-128`: `efm autoencoder`'s `small` autoencoder at 128×128 (codes 8×16×16) and a `small` UNet on the codes;
- `latent-256`: the same at 256×256 (codes 8×32×32).

Weights are random (the field climbs everywhere, as in bench_translate.py) and every line takes the same fixed
number of Euler steps, so the rows differ only in what a user pays for the space the field lives in. Reported per
row: `images_per_second`, `autoencoder_fraction` (share of the wall time inside encode and decode) and
`speed_vs_pixel` (images/s over pixel-64's, measured in the same process).

One JSON object on stdout, a table on stderr:

    OMP_NUM_THREADS=2 python benchmarks/bench_latent.py [--quick]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit
from bench_translate import random_capacitor, write_inputs

from efm_cli.autoencoder import Autoencoder
from efm_cli.capacitor.format import new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.network import preset
from efm_cli.training.autoencoder import PRESETS
from efm_cli.translate import translate_files


def latent_capacitor(size: int) -> Capacitor:
    """A random latent capacitor over a random `small` autoencoder, its field climbing everywhere."""
    torch.manual_seed(0)
    autoencoder = Autoencoder(PRESETS["small"]).eval()
    channels, side, _ = autoencoder.latent_shape(size)
    latent = {"kind": autoencoder.kind, "factor": autoencoder.factor, "channels": channels}
    latent |= {"mean": [0.0] * channels, "std": [1.0] * channels}
    config = new_config(
        source="horse",
        target="zebra",
        network=preset("small", channels=channels, size=side, L=20.0).to_dict(),
        field={"kind": "coulomb", "L": 20.0},
        size=size,
        latent=latent,
    )
    capacitor = Capacitor(config, autoencoder=autoencoder)
    generator = torch.Generator().manual_seed(0)
    network = capacitor.network
    with torch.no_grad():
        network.conv_out.weight.copy_(0.1 * torch.randn(network.conv_out.weight.shape, generator=generator))
        network.conv_out.bias[-1] = 30.0 / network.z_scale
        network.conv_out.weight[-1] /= network.z_scale
    return capacitor


class _Timed:
    """Adds up the wall time of a capacitor's autoencoder calls."""

    def __init__(self, autoencoder: Autoencoder | None) -> None:
        self.seconds = 0.0
        if autoencoder is None:
            return
        for name in ("encode", "decode"):
            inner = getattr(autoencoder, name)

            def timed(x: torch.Tensor, inner=inner) -> torch.Tensor:
                start = time.perf_counter()
                out = inner(x)
                self.seconds += time.perf_counter() - start
                return out

            setattr(autoencoder, name, timed)


def measure(name: str, capacitor: Capacitor, folder: Path, count: int, batch: int, steps: int) -> dict[str, Any]:
    jobs = write_inputs(folder / name, count, 256)
    options = {"solver": "euler", "steps": steps}
    translate_files(capacitor, jobs[:batch], direction="forward", batch_size=batch, **options)  # warm-up
    timer = _Timed(capacitor.autoencoder)
    start = time.perf_counter()
    report = translate_files(capacitor, jobs, direction="forward", batch_size=batch, **options)
    seconds = time.perf_counter() - start
    translated = sum(record.status == "translated" for record in report.records)
    return {
        "capacitor": name,
        "images": translated,
        "seconds": round(seconds, 3),
        "images_per_second": round(translated / seconds, 3),
        "autoencoder_fraction": round(timer.seconds / seconds, 3),
        "field_dimensions": capacitor.encode(torch.zeros(1, 3, *[capacitor.config["image"]["size"]] * 2))[0].numel(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 photos instead of 32")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="Euler steps per field line")
    args = parser.parse_args()
    count = 8 if args.quick else 32
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        rows.append(
            measure(
                "pixel-64",
                random_capacitor("small", 64, torch.device("cpu")),
                folder,
                count,
                args.batch_size,
                args.steps,
            )
        )
        for size in (128, 256):
            rows.append(measure(f"latent-{size}", latent_capacitor(size), folder, count, args.batch_size, args.steps))
    baseline = rows[0]["images_per_second"]
    for row in rows:
        row["speed_vs_pixel"] = round(row["images_per_second"] / baseline, 3)
        print(
            f"{row['capacitor']:>10}  {row['images_per_second']:7.2f} img/s  D = {row['field_dimensions']:6d}  "
            f"autoencoder {row['autoencoder_fraction']:.0%}  ×{row['speed_vs_pixel']:.2f} of pixel-64",
            file=sys.stderr,
        )
    emit(
        {
            "benchmark": "latent",
            "command": shlex.join([sys.executable, *sys.argv]),
            "threads": torch.get_num_threads(),
            "photos": count,
            "euler_steps": args.steps,
            "rows": rows,
        }
    )


if __name__ == "__main__":
    main()
