"""Soak: translate many small generated images with a `tiny` capacitor in 2 shard processes; watch memory and coverage.

Each shard runs `efm translate --shard I/2` in its own process, through a wrapper that samples its resident memory
(VmRSS in /proc/self/status) four times a second and counts the images it writes. Measured in the steady state
(after the first tenth of the outputs, so imports, model loading and allocator warm-up are left out): images/s,
and peak RSS while the next tenth was written vs during the last tenth (growth beyond 10% fails). For the whole run:
every input has exactly one output. The baseline is one process translating 5% of the images alone, in the same
run and measured the same way: the ratio says what the second process buys on this machine.

    python benchmarks/soak_translate.py            # 10,000 images
    python benchmarks/soak_translate.py --quick    # 1,000 images, under 60 s on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import emit
from PIL import Image

from efm_cli.capacitor.format import new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.network import preset

SIZE = 16
WRAPPER = """
import json, sys, threading, time
import efm_cli.translate as pipeline
from efm_cli.cli.app import main


def rss_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


saved, samples, done = [0], [], threading.Event()
write = pipeline.save_atomic


def counting_write(*args, **kwargs):
    write(*args, **kwargs)
    saved[0] += 1


pipeline.save_atomic = counting_write


def sample():
    while not done.is_set():
        samples.append((time.monotonic(), rss_kib(), saved[0]))
        done.wait(0.25)


watcher = threading.Thread(target=sample, daemon=True)
watcher.start()
code = main(sys.argv[1:])
done.set()
watcher.join()
samples.append((time.monotonic(), rss_kib(), saved[0]))
total = saved[0]
# Steady state only: from the first tenth of the outputs (imports, model load and allocator warm-up are over) to
# the end. Start = peak RSS while the 10th–20th percent of outputs were written; end = peak over the last tenth.
steady = [s for s in samples if s[2] >= total / 10]
first = max((kib for t, kib, n in steady if n <= total / 5), default=steady[0][1])
last = max((kib for t, kib, n in steady if n >= total * 9 / 10), default=steady[-1][1])
seconds = steady[-1][0] - steady[0][0]
images = total - steady[0][2]
report = {"code": code, "seconds": seconds, "images": images, "rss_start_kib": first, "rss_end_kib": last}
print(json.dumps(report), file=sys.stderr)
"""


def make_capacitor(folder: Path) -> Path:
    """A random `tiny` capacitor whose field climbs everywhere, so every line lands in a few steps."""
    config = new_config(
        source="noise",
        target="soak",
        network=preset("tiny", size=SIZE, L=6.0).to_dict(),
        field={"kind": "tube", "L": 6.0, "S": 1.0},
        size=SIZE,
    )
    capacitor = Capacitor(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in capacitor.network.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        capacitor.network.conv_out.bias[-1] = 30.0 / capacitor.network.z_scale
        capacitor.network.conv_out.weight[-1] /= capacitor.network.z_scale  # f_z as before its √N scale
    return capacitor.save_pretrained(folder)


def make_images(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i % 100:02d}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def translate(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", WRAPPER, "translate", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(process: subprocess.Popen[str]) -> dict:
    _, stderr = process.communicate()
    report = json.loads(stderr.strip().splitlines()[-1])
    if report["code"] != 0:
        raise SystemExit(f"efm translate failed:\n{stderr}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 images instead of 10,000")
    parser.add_argument("--images", type=int, help="number of images (overrides --quick)")
    options = parser.parse_args()
    count = options.images or (1_000 if options.quick else 10_000)
    with tempfile.TemporaryDirectory(prefix="efm-soak-") as scratch:
        root = Path(scratch)
        model = make_capacitor(root / "model")
        inputs = make_images(root / "in", count)
        common = ["--model", str(model), "--solver", "euler", "--steps", "4", "--batch-size", "32", "-q"]
        baseline_in = root / "baseline"
        for path in inputs[: max(32, count // 20)]:
            (baseline_in / path.name).parent.mkdir(parents=True, exist_ok=True)
            (baseline_in / path.name).symlink_to(path)
        baseline = finish(translate([str(baseline_in), "--out", str(root / "baseline-out"), *common]))
        baseline_rate = baseline["images"] / baseline["seconds"]
        out = root / "out"
        started = time.monotonic()
        shards = [translate([str(root / "in"), "--out", str(out), "--shard", f"{i}/2", *common]) for i in (1, 2)]
        reports = [finish(process) for process in shards]
        wall = time.monotonic() - started
        written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
        expected = sorted(p.relative_to(root / "in") for p in inputs)
    growth = [r["rss_end_kib"] / r["rss_start_kib"] - 1 for r in reports]
    steady_rate = sum(r["images"] / r["seconds"] for r in reports)
    result = {
        "images": count,
        "processes": 2,
        "seconds": round(wall, 2),
        "images_per_s": round(steady_rate, 1),
        "images_per_s_with_startup": round(count / wall, 1),
        "baseline_images_per_s_1_process": round(baseline_rate, 1),
        "speedup_vs_1_process": round(steady_rate / baseline_rate, 2),
        "every_output_exactly_once": written == expected,
        **{f"shard{i}_rss_start_mib": round(r["rss_start_kib"] / 1024, 1) for i, r in enumerate(reports, 1)},
        **{f"shard{i}_rss_end_mib": round(r["rss_end_kib"] / 1024, 1) for i, r in enumerate(reports, 1)},
        "max_rss_growth": round(max(growth), 4),
        "rss_growth_ok": max(growth) <= 0.10,
    }
    emit(result)
    if not (result["every_output_exactly_once"] and result["rss_growth_ok"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
