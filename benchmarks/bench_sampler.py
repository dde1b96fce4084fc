"""Choose the default sampler of the embedded capacitors by measurement (`efm_cli.capacitor.sampler`).

For `digits-2to3` (held-out twos) and `horse2zebra` (held-out horses, testA) it integrates a tight reference
(dopri5 at rtol = atol = 1e-6) and every candidate of `sampler.CANDIDATES` (dopri5 at 1e-2 … 1e-5, Heun at 4 … 64
steps, Euler at 4 … 256 steps, plus refinements), and reports each candidate's NFE per image and endpoint error:
per image the RMS difference to the reference's final image in 8-bit levels, then mean, 95th percentile and max over
the images. The chosen setting is the cheapest whose 95th percentile stays within 1 level (`sampler.DEFAULT_BOUND`);
`chosen_at` applies other bounds to the same curve. `reference_check` measures the reference itself on the first
`--check-images` digits (one by default): the float32 reference (what a CPU uses by default) against the float64
one at 1e-6, and both against a float64 reference at 1e-7. The digits take about 5 minutes, the horses 7 and the
check 2 on one busy CPU core.

One JSON object on stdout, a table on stderr (the data folders first; examples/digits.py makes the digits):

    python examples/digits.py /work/data/digits
    OMP_NUM_THREADS=1 python benchmarks/bench_sampler.py --digits /work/data/digits/test/two \\
        --horses /work/shared/data/horse2zebra/testA --limit-digits 8 --limit-horses 3
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import emit

from efm_cli.capacitor import sampler
from efm_cli.capacitor.model import Capacitor

ROOT = Path(__file__).resolve().parents[1]
BOUNDS = (0.5, 1.0, 2.0, 4.0)
"""Bounds (8-bit levels, 95th percentile) the same curve is also read at."""


def chosen_at(choice: sampler.Choice) -> dict[str, Any]:
    """The setting each bound in BOUNDS would choose from the measured curve, with its NFE and error."""
    found = {}
    for bound in BOUNDS:
        point = sampler.pick(choice.curve, bound)
        found[f"{bound:g}"] = None if point is None else {**point.setting.sampler(), "nfe": round(point.nfe_mean, 1)}
    return found


def run_one(name: str, folder: Path, limit: int, say: Any) -> dict[str, Any]:
    capacitor = Capacitor.from_pretrained(ROOT / "weights" / name)
    images, skipped = sampler.load_folder(capacitor, folder, limit)
    if skipped:
        say(f"{name}: skipped {len(skipped)} unreadable file(s)")
    started = time.perf_counter()
    choice = sampler.measure(capacitor, images, say=lambda message: say(f"{name}: {message}"))
    current = next((p for p in choice.curve if p.current), None)
    return {
        **choice.to_json("benchmarks/bench_sampler.py"),
        "folder": str(folder),
        "current_point": None if current is None else current.to_json(),
        "chosen_at": chosen_at(choice),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def reference_check(folder: Path, count: int, say: Any) -> dict[str, Any]:
    """How far the references are from each other and from a tighter one, on `count` digits (levels, per image)."""
    capacitor = Capacitor.from_pretrained(ROOT / "weights" / "digits-2to3")
    images, _ = sampler.load_folder(capacitor, folder, count)
    points = capacitor.encode(images)
    found, nfe = {}, {}
    for label, tol, dtype in (
        ("fp32_1e-6", 1e-6, torch.float32),
        ("fp64_1e-6", 1e-6, torch.float64),
        ("fp64_1e-7", 1e-7, torch.float64),
    ):
        say(f"reference check: {label}")
        found[label], run, _ = sampler.reference(capacitor, points, tol=tol, dtype=dtype)
        nfe[label] = float(run.nfe.double().mean())

    def gap(a: str, b: str) -> list[float]:
        return [round(v, 4) for v in sampler.endpoint_error(found[a], found[b]).tolist()]

    return {
        "images": len(images),
        "nfe": nfe,
        "fp32_vs_fp64_at_1e-6": gap("fp32_1e-6", "fp64_1e-6"),
        "fp64_1e-6_vs_1e-7": gap("fp64_1e-6", "fp64_1e-7"),
        "fp32_1e-6_vs_fp64_1e-7": gap("fp32_1e-6", "fp64_1e-7"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=Path, default=Path("/work/data/digits/test/two"))
    parser.add_argument("--horses", type=Path, default=ROOT.parent / "shared" / "data" / "horse2zebra" / "testA")
    parser.add_argument("--limit-digits", type=int, default=8)
    parser.add_argument("--limit-horses", type=int, default=3)
    parser.add_argument("--check-images", type=int, default=1, help="digits for the reference check (0: none)")
    args = parser.parse_args()

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.perf_counter()
    result: dict[str, Any] = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "threads": torch.get_num_threads(),
    }
    result["digits-2to3"] = run_one("digits-2to3", args.digits, args.limit_digits, say)
    result["horse2zebra"] = run_one("horse2zebra", args.horses, args.limit_horses, say)
    if args.check_images:
        result["reference_check"] = reference_check(args.digits, args.check_images, say)
    for name in ("digits-2to3", "horse2zebra"):
        chosen = result[name]["chosen"]
        result[f"chosen_{name}"] = "none within the bound" if chosen is None else chosen
    result["seconds"] = round(time.perf_counter() - started, 1)
    emit(result)


if __name__ == "__main__":
    main()
