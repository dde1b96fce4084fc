"""Benchmark the EFM Coulomb target (repo mode, fp32) against a naive version of the official approach.

The official training code materialises the [b, B, N] difference tensor of each plate (0.8 GB in fp32 at b=64,
B=256, D=3·64·64) to get distances and the weighted centroids; `efm_cli.field.coulomb_target` never forms it. This
script times both on the same inputs in one process, measures each one's peak extra memory in a fresh child process,
and checks our directions against a float64 reference. One JSON object on stdout, a table on stderr:

    python benchmarks/bench_field.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as functional
from _common import best_of, emit
from PIL import Image
from torch import Tensor

from efm_cli.field import coulomb_target, sample_points

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "horse2zebra"
SIDE = 64
L = 20.0
GAMMA = 5.0
TARGETS = {"speedup": 20.0, "memory_ratio": 50.0, "max_direction_error": 1e-5}


def naive_repo_target(z: Tensor, x: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """The official approach (docs/method.md §3, the `repo` target): per plate an explicit [b, B, N] difference
    tensor, distances from it, the official stable weights (min r / (r + 1e-7))^N, and the centroid offset summed
    over that tensor."""
    points = torch.cat([z[:, None], x.flatten(1)], dim=1)
    n = points.shape[1]

    def offset(charges: Tensor, height: float) -> Tensor:
        plate = torch.cat([torch.full_like(charges[:, :1], height), charges], dim=1)
        diff = points[:, None, :] - plate[None]
        r = diff.norm(dim=2)
        ratio = (r.min(dim=1, keepdim=True).values / (r + 1e-7)) ** n
        w = ratio / ratio.sum(dim=1, keepdim=True)
        return (w[:, :, None] * diff).sum(dim=1)  # x̃ − m

    a = offset(source.flatten(1), 0.0)
    c = -offset(target.flatten(1), L)
    return math.sqrt(n) * (a / (a.norm(dim=1, keepdim=True) + GAMMA) + c / (c.norm(dim=1, keepdim=True) + GAMMA))


def ours(z: Tensor, x: Tensor, source: Tensor, target: Tensor) -> Tensor:
    return coulomb_target(z, x, source, target, L, mode="repo", gamma=GAMMA)


IMPLEMENTATIONS: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
    "naive": naive_repo_target,
    "ours": ours,
}


def reference_repo_target(z: Tensor, x: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """float64 with distances from explicit differences (cdist without the Gram shortcut) and logsumexp weights."""
    points = torch.cat([z[:, None], x.flatten(1)], dim=1).double()
    n = points.shape[1]
    pulls = []
    for charges, height in ((source, 0.0), (target, L)):
        plate = torch.cat([torch.full((len(charges), 1), height, dtype=torch.float64), charges.flatten(1).double()], 1)
        r = torch.cdist(points, plate, compute_mode="donot_use_mm_for_euclid_dist")
        w = torch.softmax(-0.5 * n * torch.log(r.square() + 1e-14), dim=1)
        pulls.append(points - w @ plate)  # Σ_j w_ij (x̃_i − c_j), as the weights sum to one
    a, c = pulls[0], -pulls[1]
    return math.sqrt(n) * (a / (a.norm(dim=1, keepdim=True) + GAMMA) + c / (c.norm(dim=1, keepdim=True) + GAMMA))


def direction_error(out: Tensor, ref: Tensor) -> float:
    """1 − the smallest cosine between rows; NaN rows count as the worst possible error."""
    cos = functional.cosine_similarity(out.double(), ref, dim=1)
    return float(1.0 - torch.nan_to_num(cos, nan=-1.0).min())


def load_crops(folder: Path, count: int, rng: random.Random) -> Tensor | None:
    """`count` random square crops of the folder's photos, resized to 64×64, in [−1, 1]; None without enough files."""
    files = sorted(folder.glob("*.jpg"))
    if len(files) < count:
        return None
    images = []
    for path in rng.sample(files, count):
        with Image.open(path) as photo:
            photo = photo.convert("RGB")  # a few zebras are greyscale
            side = rng.randint(min(photo.size) // 2, min(photo.size))
            left, top = rng.randint(0, photo.width - side), rng.randint(0, photo.height - side)
            crop = photo.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).view(SIDE, SIDE, 3)
        images.append(pixels.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(images)


def smooth_images(count: int, generator: torch.Generator) -> Tensor:
    """Stand-in for photos: coarse noise upsampled to 64×64 plus grain, in [−1, 1]."""
    coarse = 2 * torch.rand(count, 3, 8, 8, generator=generator) - 1
    fine = functional.interpolate(coarse, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
    return (fine + 0.05 * torch.randn(count, 3, SIDE, SIDE, generator=generator)).clamp(-1.0, 1.0)


def make_inputs(b: int, charges: int, seed: int) -> dict[str, Tensor | str]:
    """Charges from horse2zebra (A on z=0, B on z=L) and training points on the pair segments, the last four within
    1e-3 of a charge next to each plate, where fp32 Gram distances would lose the nearest charge."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    source, target = load_crops(DATA / "trainA", charges, rng), load_crops(DATA / "trainB", charges, rng)
    kind = "horse2zebra trainA/trainB random crops resized to 64x64"
    if source is None or target is None:
        source, target = smooth_images(charges, generator), smooth_images(charges, generator)
        kind = "smooth random 64x64 images (horse2zebra not found)"
    z, x = sample_points(source[:b], target[:b], L, scheme="uniform", generator=generator)
    nudge = torch.randn(2, 3, SIDE, SIDE, generator=generator)
    nudge = 5e-4 * nudge / nudge.flatten(1).norm(dim=1)[:, None, None, None]
    z[-4:] = torch.tensor([1e-4, 5e-4, L - 1e-4, L - 5e-4])
    x[-4:] = torch.stack([source[0], source[1] + nudge[0], target[2] + nudge[1], target[3]])
    return {"z": z, "x": x, "source": source, "target": target, "kind": kind}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(name: str, inputs: Path) -> None:
    """Report one implementation's peak extra resident memory for one call, as JSON on stdout.

    Run with MALLOC_MMAP_THRESHOLD_ set, so that large buffers are mapped and unmapped and RSS follows allocations.
    A warm-up call on two points leaves one-time allocations (thread pools, kernels) out of the measurement.
    """
    data = torch.load(inputs)
    args = (data["z"], data["x"], data["source"], data["target"])
    run = IMPLEMENTATIONS[name]
    run(args[0][:2], args[1][:2], *args[2:])
    try:
        before = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        run(*args)
        peak = (status_kib("VmHWM") - before) * 1024
    except (OSError, KeyError):
        peak = None
    print(json.dumps({"peak_extra_bytes": peak}))


def peak_extra_bytes(name: str, inputs: Path, threads: int) -> int | None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # read by glibc at start-up: set before the child runs
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--child", name, "--inputs", str(inputs), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.splitlines()[-1])["peak_extra_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timing repeats (under a minute on 2 cores)")
    parser.add_argument("--b", type=int, default=64, help="evaluation points")
    parser.add_argument("--B", type=int, default=256, help="charges per plate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--child", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    if options.child:
        child(options.child, options.inputs)
        return

    data = make_inputs(options.b, options.B, options.seed)
    args = (data["z"], data["x"], data["source"], data["target"])
    repeat = {"naive": 1, "ours": 5} if options.quick else {"naive": 5, "ours": 20}
    reference = reference_repo_target(*args)
    errors, seconds = {}, {}
    for name, run in IMPLEMENTATIONS.items():
        errors[name] = direction_error(run(*args), reference)  # doubles as the warm-up call
        seconds[name] = best_of(lambda run=run: run(*args), repeat=repeat[name], warmup=0)

    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "inputs.pt"
        torch.save({k: v for k, v in data.items() if isinstance(v, Tensor)}, saved)
        peaks = {name: peak_extra_bytes(name, saved, torch.get_num_threads()) for name in IMPLEMENTATIONS}

    memory_ratio = peaks["naive"] / peaks["ours"] if peaks["naive"] is not None and peaks["ours"] else None
    result = {
        "benchmark": "coulomb_target repo fp32 vs naive official",
        "speedup": seconds["naive"] / seconds["ours"],
        "memory_ratio": memory_ratio,
        "max_direction_error": errors["ours"],
        "naive_ms": 1e3 * seconds["naive"],
        "ours_ms": 1e3 * seconds["ours"],
        "naive_peak_mb": None if peaks["naive"] is None else peaks["naive"] / 2**20,
        "ours_peak_mb": None if peaks["ours"] is None else peaks["ours"] / 2**20,
        "naive_max_direction_error": errors["naive"],
        "targets": TARGETS,
        "b": options.b,
        "B": options.B,
        "D": data["x"][0].numel(),
        "L": L,
        "gamma": GAMMA,
        "inputs": data["kind"],
        "repeats": repeat,
        "peak_memory": "VmHWM - VmRSS around one call in a fresh child, MALLOC_MMAP_THRESHOLD_=65536",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": shlex.join(["python", "benchmarks/bench_field.py", *sys.argv[1:]]),
    }
    emit(result)


if __name__ == "__main__":
    main()
