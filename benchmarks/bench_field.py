"""Benchmark the EFM Coulomb target (fp32) against the official approach and against a plain Gram version.

Two baselines of the same formula (docs/method.md §3, the `repo` target), timed with ours on the same inputs in one
process, each one's peak extra memory measured in a fresh child process, and all directions checked against one
float64 reference computed from explicit differences:
- `naive`, the official approach: it materialises the [b, B, N] difference tensor of each plate (0.8 GB in fp32 at
  b=64, B=256, D=3·64·64) to get distances and the weighted centroids. `speedup` is its time over ours.
- `gram`: every distance from the Gram identity (`torch.cdist` on matrix products), a softmax, the centroids as one
  matrix product; no [b, B, N] tensor either. `speedup_vs_gram` is its time over ours: below 1 where it is faster.

`efm_cli.field.coulomb_target` differs from `gram` in recomputing each point's nearest charges from explicit
differences, to stay exact next to the plates. What that buys is measured in `phys` mode at several D, on points
that include four within 1e-3 of a charge next to a plate (`phys_d{D}_*`: each version's largest angle to the
float64 target, in degrees, and the time ratio). In high D the weights are all but one-hot on the nearest charge,
which Gram round-off does not change, so there the Gram version loses little; in 2-D it does.

One JSON object on stdout, a table on stderr:

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
from typing import Any

import torch
import torch.nn.functional as functional
from _common import best_of, emit
from PIL import Image
from torch import Tensor

from efm_cli.field import CoulombTarget, coulomb_target, sample_points

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "horse2zebra"
SIDE = 64
L = 20.0
GAMMA = 5.0
TARGETS = {"speedup": 20.0, "memory_ratio": 50.0, "max_direction_error": 1e-5}
PHYS_DIMENSIONS = (2, 64, 3 * SIDE * SIDE)
"""D of the phys-mode comparison with the Gram version: the 2-D toy, a small D, and 64×64 colour images."""


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


def cdist_target(
    z: Tensor, x: Tensor, source: Tensor, target: Tensor, mode: CoulombTarget, dtype: torch.dtype, gram: bool
) -> Tensor:
    """The target of docs/method.md §3 written as the formula reads, in `dtype`, with distances from torch.cdist:
    through the Gram identity ‖a‖² + ‖c‖² − 2⟨a, c⟩ (`gram`) or from explicit differences.

    Per plate: weights softmax_j(−(N/2)·log(r_ij² + 1e-14)), the regulariser ours uses, so that only the distances
    differ; the centroid m = w @ charges; a = x̃ − m⁺, c = m⁻ − x̃. `repo` normalises the two pulls separately with γ;
    `phys` mixes them by λ = Z⁺/(Z⁺ + Z⁻), from the two logsumexps, and normalises the sum.
    """
    points = torch.cat([z[:, None], x.flatten(1)], dim=1).to(dtype)
    n = points.shape[1]
    compute = "use_mm_for_euclid_dist" if gram else "donot_use_mm_for_euclid_dist"
    centroids, log_z = [], []
    for charges, height in ((source, 0.0), (target, L)):
        flat = charges.flatten(1).to(dtype)
        plate = torch.cat([torch.full_like(flat[:, :1], height), flat], dim=1)
        logit = -0.5 * n * torch.log(torch.cdist(points, plate, compute_mode=compute).square() + 1e-14)
        centroids.append(torch.softmax(logit, dim=1) @ plate)
        log_z.append(torch.logsumexp(logit, dim=1) - math.log(len(plate)))
    a, c = points - centroids[0], centroids[1] - points
    if mode == "repo":
        return math.sqrt(n) * (a / (a.norm(dim=1, keepdim=True) + GAMMA) + c / (c.norm(dim=1, keepdim=True) + GAMMA))
    share = torch.sigmoid(log_z[0] - log_z[1])[:, None]
    field = share * a + (1 - share) * c
    return math.sqrt(n) * field / (field.norm(dim=1, keepdim=True) + 1e-12)


def gram_target(z: Tensor, x: Tensor, source: Tensor, target: Tensor, mode: CoulombTarget = "repo") -> Tensor:
    """The plain fp32 version: every distance from the Gram identity."""
    return cdist_target(z, x, source, target, mode, torch.float32, gram=True)


def reference_target(z: Tensor, x: Tensor, source: Tensor, target: Tensor, mode: CoulombTarget = "repo") -> Tensor:
    """float64 with distances from explicit differences: what every version is measured against."""
    return cdist_target(z, x, source, target, mode, torch.float64, gram=False)


def ours(z: Tensor, x: Tensor, source: Tensor, target: Tensor, mode: CoulombTarget = "repo") -> Tensor:
    return coulomb_target(z, x, source, target, L, mode=mode, gamma=GAMMA)


IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {"naive": naive_repo_target, "gram": gram_target, "ours": ours}


def direction_error(out: Tensor, ref: Tensor) -> float:
    """1 − the smallest cosine between rows; NaN rows count as the worst possible error."""
    cos = functional.cosine_similarity(out.double(), ref, dim=1)
    return float(1.0 - torch.nan_to_num(cos, nan=-1.0).min())


def angles_deg(out: Tensor, ref: Tensor) -> Tensor:
    """Angle between rows in degrees, 2·atan2(‖u − v‖, ‖u + v‖) of the unit rows (accurate for tiny angles, where
    acos of a cosine near 1 is not); NaN rows count as 180°."""
    u, v = functional.normalize(out.double(), dim=1), functional.normalize(ref.double(), dim=1)
    return torch.nan_to_num(torch.rad2deg(2 * torch.atan2((u - v).norm(dim=1), (u + v).norm(dim=1))), nan=180.0)


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


def near_plate(z: Tensor, x: Tensor, source: Tensor, target: Tensor, generator: torch.Generator) -> None:
    """Put the last four points within 1e-3 of a charge next to each plate (on a charge, or 5e-4 off it), where fp32
    Gram distances lose the nearest charge; in place."""
    nudge = torch.randn(2, *source.shape[1:], generator=generator)
    nudge = 5e-4 * nudge / nudge.flatten(1).norm(dim=1).view(2, *[1] * (source.dim() - 1))
    z[-4:] = torch.tensor([1e-4, 5e-4, L - 1e-4, L - 5e-4])
    x[-4:] = torch.stack([source[0], source[1] + nudge[0], target[2] + nudge[1], target[3]])


def make_inputs(b: int, charges: int, seed: int) -> dict[str, Tensor | str]:
    """Charges from horse2zebra (A on z=0, B on z=L), points on the pair segments and four next to the plates."""
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    source, target = load_crops(DATA / "trainA", charges, rng), load_crops(DATA / "trainB", charges, rng)
    kind = "horse2zebra trainA/trainB random crops resized to 64x64"
    if source is None or target is None:
        source, target = smooth_images(charges, generator), smooth_images(charges, generator)
        kind = "smooth random 64x64 images (horse2zebra not found)"
    z, x = sample_points(source[:b], target[:b], L, scheme="uniform", generator=generator)
    near_plate(z, x, source, target, generator)
    return {"z": z, "x": x, "source": source, "target": target, "kind": kind}


def gaussian_inputs(d: int, b: int, charges: int, seed: int) -> dict[str, Tensor | str]:
    """bench_integrator's toy in D dimensions, N(0, I) → ½N(−8e₁, I) + ½N(8e₁, I); points as `make_inputs`."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.randn(charges, d, generator=generator)
    target = torch.randn(charges, d, generator=generator)
    target[:, 0] += 16.0 * torch.randint(0, 2, (charges,), generator=generator) - 8.0
    z, x = sample_points(source[:b], target[:b], L, scheme="uniform", generator=generator)
    near_plate(z, x, source, target, generator)
    return {"z": z, "x": x, "source": source, "target": target, "kind": f"Gaussian toy, D = {d}"}


def phys_comparison(data: dict[str, Tensor | str], repeat: int) -> dict[str, Any]:
    """Gram version and ours in phys mode: times, and each one's largest angle to the float64 target, over all points
    and over the four next to a plate."""
    args = (data["z"], data["x"], data["source"], data["target"])
    reference = reference_target(*args, mode="phys")
    result: dict[str, Any] = {"inputs": data["kind"]}
    for name in ("gram", "ours"):
        run = IMPLEMENTATIONS[name]
        angles = angles_deg(run(*args, mode="phys"), reference)  # doubles as the warm-up call
        result[f"{name}_ms"] = 1e3 * best_of(lambda run=run: run(*args, mode="phys"), repeat=repeat, warmup=0)
        result[f"{name}_angle_deg"] = float(angles.max())
        result[f"{name}_near_plate_angle_deg"] = float(angles[-4:].max())
    result["speedup_vs_gram"] = result["gram_ms"] / result["ours_ms"]
    return result


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
    repeat = {"naive": 1, "gram": 10, "ours": 10} if options.quick else {"naive": 5, "gram": 20, "ours": 20}
    reference = reference_target(*args)
    errors, angles, seconds = {}, {}, {}
    for name, run in IMPLEMENTATIONS.items():
        out = run(*args)  # doubles as the warm-up call
        errors[name], angles[name] = direction_error(out, reference), float(angles_deg(out, reference).max())
        seconds[name] = best_of(lambda run=run: run(*args), repeat=repeat[name], warmup=0)
    phys = {}
    for d in PHYS_DIMENSIONS:
        inputs = data if d == data["x"][0].numel() else gaussian_inputs(d, options.b, options.B, options.seed)
        phys[d] = phys_comparison(inputs, repeat["ours"])

    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "inputs.pt"
        torch.save({k: v for k, v in data.items() if isinstance(v, Tensor)}, saved)
        peaks = {name: peak_extra_bytes(name, saved, torch.get_num_threads()) for name in IMPLEMENTATIONS}

    memory_ratio = peaks["naive"] / peaks["ours"] if peaks["naive"] is not None and peaks["ours"] else None
    result: dict[str, Any] = {
        "benchmark": "coulomb_target repo fp32 vs naive official and plain Gram",
        "speedup": seconds["naive"] / seconds["ours"],
        "memory_ratio": memory_ratio,
        "max_direction_error": errors["ours"],
        "speedup_vs_gram": seconds["gram"] / seconds["ours"],
        "gram_max_direction_error": errors["gram"],
        "max_angle_deg": angles["ours"],
        "gram_max_angle_deg": angles["gram"],
    }
    for d, row in phys.items():
        result[f"phys_d{d}_speedup_vs_gram"] = row["speedup_vs_gram"]
        result[f"phys_d{d}_gram_angle_deg"] = row["gram_angle_deg"]
        result[f"phys_d{d}_ours_angle_deg"] = row["ours_angle_deg"]
    result |= {
        **{f"{name}_ms": 1e3 * seconds[name] for name in IMPLEMENTATIONS},
        **{f"{name}_peak_mb": None if peaks[name] is None else peaks[name] / 2**20 for name in IMPLEMENTATIONS},
        "naive_max_direction_error": errors["naive"],
        "phys": phys,
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
