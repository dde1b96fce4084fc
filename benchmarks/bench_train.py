"""Benchmark the training step: steps/s at 32×32 with the `small` UNet on CPU, and where a step's time goes.

A step is: the next charge batches of both plates (data), the OT pairing and the field target at the points
(target), and the network's forward, backward and Adam update with EMA (network). The data comes from real PNG
folders decoded by `efm_cli.training.data` exactly as `efm train` does (written here from generated shapes), the step
is `efm_cli.training.step.Trainer.step_on`, and the parts are timed by wrapping the functions it calls, in the same run.
The shares are ratios within one process, so machine noise mostly cancels. One JSON object on stdout, a table on
stderr:

    python benchmarks/bench_train.py [--quick] [--size 32] [--network small] [--charges 64] [--points 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import emit
from PIL import Image, ImageDraw

from efm_cli.network import build, preset
from efm_cli.training import step as train
from efm_cli.training.data import BatchStream, ImageFolder, Preprocessing
from efm_cli.training.step import FieldSpec, Schedule, Trainer

TARGETS = {"target_fraction": 0.10}


def write_shapes(folder: Path, count: int, disc: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        r, g, b, x, y = (int(v) for v in torch.randint(0, 200, (5,), generator=gen))
        image = Image.new("RGB", (96, 96), (r // 4, g // 4, b // 4))
        shape = ImageDraw.Draw(image).ellipse if disc else ImageDraw.Draw(image).rectangle
        shape([x % 60, y % 60, x % 60 + 30, y % 60 + 30], fill=(r + 55, g + 55, b + 55))
        image.save(folder / f"{i:04d}.png")


class Timer:
    """Accumulated seconds of calls to wrapped functions, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under 60 s on 2 CPU cores")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--network", default="small")
    parser.add_argument(
        "--charges", type=int, default=64, help="charges per plate (efm train's default for the Coulomb field)"
    )
    parser.add_argument("--points", type=int, default=32, help="points per step (efm train's default)")
    parser.add_argument("--field", default="coulomb", choices=["coulomb", "tube"])
    parser.add_argument("--plan", default="ot", choices=["independent", "ot"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    steps = args.steps or (8 if args.quick else 40)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        write_shapes(Path(tmp, "a"), 200, False, 0)
        write_shapes(Path(tmp, "b"), 200, True, 1)
        prep = Preprocessing(size=args.size, hflip=True)
        # Stream from disk (no in-memory cache) so that data time includes decoding, the worst case.
        folders = [ImageFolder(Path(tmp, n), prep, cache_bytes=0) for n in ("a", "b")]
        streams = [BatchStream(f, args.charges, seed) for seed, f in enumerate(folders)]
        spec = FieldSpec(kind=args.field, L=train.DEFAULT_L[args.field], plan=args.plan)
        torch.manual_seed(0)
        network = build(preset(args.network, size=args.size, L=spec.L).to_dict()).to(device)
        trainer = Trainer(network, spec, Schedule(warmup=10), points=args.points)

        timer = Timer()
        train.coulomb_target = timer.wrap("target", train.coulomb_target)
        train.tube_target = timer.wrap("target", train.tube_target)
        train.ot_pairing = timer.wrap("pairing", train.ot_pairing)
        fetch = timer.wrap("data", lambda k: [s.rows(k).to(device) for s in streams])

        source, target = fetch(0)
        trainer.step_on(source, target)  # warm-up step, not counted
        timer.seconds.clear()
        start = time.perf_counter()
        for k in range(1, steps + 1):
            source, target = fetch(k)
            trainer.step_on(source, target)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start

    parts = {name: timer.seconds.get(name, 0.0) / wall for name in ("data", "target", "pairing")}
    result = {
        "benchmark": "train",
        "device": str(device),
        "size": args.size,
        "network": args.network,
        "parameters": sum(p.numel() for p in network.parameters()),
        "field": args.field,
        "plan": args.plan,
        "charges": args.charges,
        "points": args.points,
        "steps": steps,
        "steps_per_s": steps / wall,
        "data_fraction": parts["data"],
        "target_fraction": parts["target"],
        "pairing_fraction": parts["pairing"],
        "network_fraction": 1.0 - sum(parts.values()),
        "target_ok": parts["target"] <= TARGETS["target_fraction"],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    emit(result)


if __name__ == "__main__":
    main()
