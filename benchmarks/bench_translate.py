"""Benchmark the `efm translate` pipeline: images/s, mean NFE, and the share of wall time outside the field network.

- `images_per_second`: image files in, image files out, through `efm_cli.translate.translate_files` (decode,
  downsize, integrate with dopri5 at the capacitor's tolerance, bring back to size with the detail transfer, encode,
  atomic write).
- `overhead_fraction`: the part of that wall time not spent inside the field network's forward calls (decoding,
  resizing, encoding and writing that did not overlap the integration, plus the integrator's own bookkeeping); the
  network is timed by wrapping it. Target ≤ 0.15 on CPU with batch 16.
- `overlap_speedup` (full run only): images/s of the pipeline over the same pipeline with every stage on one thread
  (`workers=0`), measured in the same run.
- `threads` (skipped with `--no-threads`): the embedded horse2zebra translating real photos through the `efm` command
  in fresh processes, start-up included, alone and beside one competing busy process, with efm's defaults (all
  cores, a short OpenMP spin: efm_cli.threads), with one thread, and with libgomp's own spin (torch imported before
  efm sets it). `loaded_slowdown` is efm's defaults ÷ one thread beside the busy process (target ≤ 1.2),
  `idle_speedup` one thread ÷ efm's defaults alone. The full run adds `shards`: the same photos as two `--shard`
  processes at once, each with efm's defaults or each with one thread.
- `detail`: how much closer to the full-resolution truth the detail transfer brings a translation made at the
  64×64 capacitor, in PSNR (dB), on real 256×256 photos (horse2zebra testA) with ideal low-resolution
  translators (colour maps whose full-resolution result is known), and what it costs per image.

The capacitor is a random `small` (or `--network`) UNet whose field does not depend on the height, smooth enough
that dopri5 needs a few dozen evaluations per line, about what trained capacitors need; the inputs are horse2zebra
photos resized to `--size` (random smooth images when the data folder is absent). On CUDA the timed network calls
synchronise the device, so images/s and peak memory come from a second, untimed run.

One JSON object on stdout, a table on stderr:

    python benchmarks/bench_translate.py [--quick]
    python benchmarks/bench_translate.py --device cuda --precision bf16 --size 256 --batch-size 256
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import emit
from PIL import Image
from torch import Tensor, nn

from efm_cli.capacitor.format import new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.devices import choose as choose_device
from efm_cli.images import to_tensor
from efm_cli.network import preset
from efm_cli.translate import Job, compose, plan, translate_files

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "horse2zebra" / "testA"
TARGETS = {"overhead_fraction": 0.15, "loaded_slowdown": 1.2}
DETAIL_SIZE = 64
"""Capacitor resolution at which the detail transfer is measured, against 256×256 photos."""
LUMA = np.array([0.299, 0.587, 0.114])


class TimedNetwork(nn.Module):
    """The field network, with the wall time of its forward calls added up (device synchronised around each)."""

    def __init__(self, inner: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner, self.device, self.seconds, self.calls = inner, device, 0.0, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        self._sync()
        start = time.perf_counter()
        out = self.inner(z, x)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def random_capacitor(network: str, size: int, device: torch.device) -> Capacitor:
    """A random capacitor whose field climbs everywhere and moves images visibly, the same in every run.

    Only the output convolution is drawn at random: the residual branches keep their zero initialisation, so the
    height embedding has no effect and the field lines are smooth.
    """
    config = new_config(
        source="horse",
        target="zebra",
        network=preset(network, size=size, L=20.0).to_dict(),
        field={"kind": "coulomb", "L": 20.0},
        size=size,
    )
    capacitor = Capacitor(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = capacitor.network.conv_out.weight
        weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
        capacitor.network.conv_out.bias[-1] = 30.0 / capacitor.network.z_scale
        capacitor.network.conv_out.weight[-1] /= capacitor.network.z_scale  # f_z as before its √N scale
    capacitor.network.to(device)
    return capacitor


def photos(count: int) -> list[np.ndarray]:
    """Real photos (uint8 RGB), or random smooth images when the data folder is not there."""
    files = sorted(PHOTOS.glob("*.jpg"))[:count]
    if files:
        return [np.asarray(Image.open(path).convert("RGB")) for path in files]
    rng = np.random.default_rng(0)
    coarse = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(count)]
    return [np.asarray(Image.fromarray(c).resize((256, 256), Image.BICUBIC)) for c in coarse]


def write_inputs(folder: Path, count: int, size: int) -> list[Job]:
    """`count` JPEG files of size×size in `folder` (photos reused round-robin), and the jobs translating them."""
    folder.mkdir(parents=True)
    pictures = photos(min(count, 64))
    for i in range(count):
        picture = Image.fromarray(pictures[i % len(pictures)]).resize((size, size), Image.BICUBIC)
        picture.save(folder / f"{i:05d}.jpg", quality=95)
    return plan([str(folder)], domain="zebra").jobs


def timed_run(capacitor: Capacitor, jobs: list[Job], options: dict[str, Any], workers: int | None) -> dict[str, Any]:
    """One translation of every job with the network timed; outputs are removed afterwards."""
    timed = TimedNetwork(capacitor.network, next(capacitor.network.parameters()).device)
    inner, capacitor.network = capacitor.network, timed
    try:
        report = translate_files(capacitor, jobs, workers=workers, **options)
    finally:
        capacitor.network = inner
    for job in jobs:
        job.output.unlink(missing_ok=True)
    summary = report.summary()
    if summary["translated"] != len(jobs):
        raise RuntimeError(f"only {summary['translated']} of {len(jobs)} images were translated: {summary}")
    return {
        "wall_seconds": report.seconds,
        "network_seconds": timed.seconds,
        "network_calls": timed.calls,
        "images_per_second": len(jobs) / report.seconds,
        "nfe_mean": summary["nfe_mean"],
        "overhead_fraction": (report.seconds - timed.seconds) / report.seconds,
    }


def untimed_run(capacitor: Capacitor, jobs: list[Job], options: dict[str, Any]) -> dict[str, Any]:
    """Images/s and peak device memory without the timing wrapper's synchronisations (accelerators)."""
    device = next(capacitor.network.parameters()).device
    torch.cuda.reset_peak_memory_stats(device)
    report = translate_files(capacitor, jobs, **options)
    for job in jobs:
        job.output.unlink(missing_ok=True)
    return {
        "images_per_second": len(jobs) / report.seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _hue_rotation(rgb: np.ndarray) -> np.ndarray:
    """Colours turned 120° around the grey axis: a maximal colour change that keeps brightness."""
    return (rgb - 127.5)[:, :, [2, 0, 1]] + 127.5


IDEAL = {
    "winter": lambda rgb: 0.4 * rgb + 0.6 * (rgb @ LUMA)[:, :, None] + 40,
    "sepia": lambda rgb: rgb @ np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]]).T,
    "hue": _hue_rotation,
    "invert": lambda rgb: 255 - rgb,
}
"""Ideal translators: pixel-wise colour maps, so that their full-resolution result is known exactly."""


def detail_effect(count: int, size: int) -> dict[str, Any]:
    """PSNR to the full-resolution truth with and without the detail transfer, and the cost of each, per image."""
    result: dict[str, Any] = {"photos": count, "capacitor_size": size}
    pictures = photos(count)
    seconds = {False: 0.0, True: 0.0}
    for name, ideal in IDEAL.items():
        scores: dict[bool, list[float]] = {False: [], True: []}
        for rgb in pictures:
            truth = np.clip(ideal(rgb.astype(np.float64)), 0, 255)
            small_in = to_tensor(rgb, size)
            seen = (small_in.permute(1, 2, 0).double().numpy() + 1) * 127.5
            small_out = torch.from_numpy(np.clip(ideal(seen), 0, 255) / 127.5 - 1).permute(2, 0, 1).float()
            for detail in (False, True):
                start = time.perf_counter()
                out = compose(rgb, small_in, small_out, detail=detail)
                seconds[detail] += time.perf_counter() - start
                scores[detail].append(_psnr(out, truth))
        plain, detailed = float(np.mean(scores[False])), float(np.mean(scores[True]))
        result[name] = {"psnr_plain": plain, "psnr_detail": detailed, "gain_db": detailed - plain}
    result["gain_db_min"] = min(result[name]["gain_db"] for name in IDEAL)
    runs = len(IDEAL) * len(pictures)
    result["ms_per_image_plain"] = 1e3 * seconds[False] / runs
    result["ms_per_image_detail"] = 1e3 * seconds[True] / runs
    return result


SETTINGS = {
    "efm": ([sys.executable, "-m", "efm_cli"], {}),
    "one_thread": ([sys.executable, "-m", "efm_cli"], {"OMP_NUM_THREADS": "1"}),
    "libgomp": ([sys.executable, "-c", "import torch; from efm_cli.cli.app import main; raise SystemExit(main())"], {}),
}
"""How each case starts `efm`: libgomp reads its spin count when torch loads it, so importing torch first keeps
libgomp's own default whatever efm would set."""


def _environment(setting: str) -> dict[str, str]:
    """This process's environment without any thread setting, plus the setting's own."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    return {**clean, **SETTINGS[setting][1]}


def _translate_seconds(setting: str, inputs: Path, out: Path, shards: int = 1) -> float:
    """Seconds to translate `inputs` into a fresh `out`, as `shards` processes started together."""
    start = time.perf_counter()
    processes = []
    for index in range(1, shards + 1):
        arguments = ["translate", str(inputs), "--to", "zebra", "--out", str(out / f"{index}"), "--quiet"]
        if shards > 1:
            arguments += ["--shard", f"{index}/{shards}"]
        command = [*SETTINGS[setting][0], *arguments]
        processes.append(subprocess.Popen(command, env=_environment(setting), stdout=subprocess.DEVNULL))
    if any(process.wait() for process in processes):
        raise RuntimeError(f"efm translate failed with the {setting!r} setting")
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def threads_case(scratch: Path, images: int, repeats: int, shards: bool) -> dict[str, Any]:
    """Median seconds per setting, alone and beside a busy process, each repeat running every setting in turn."""
    inputs = scratch / "photos"
    inputs.mkdir()
    for i, picture in enumerate(photos(images)):
        Image.fromarray(picture).save(inputs / f"{i:03d}.jpg", quality=95)
    out = scratch / "translated"
    result: dict[str, Any] = {"images": images, "repeats": repeats, "load_average": os.getloadavg()[0]}
    for case in ("alone", "loaded"):
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if case == "loaded" else None
        try:
            seconds: dict[str, list[float]] = {name: [] for name in SETTINGS}
            for _ in range(repeats):
                for name in SETTINGS:
                    seconds[name].append(_translate_seconds(name, inputs, out))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        result[case] = {name: statistics.median(values) for name, values in seconds.items()}
    result["loaded_slowdown"] = result["loaded"]["efm"] / result["loaded"]["one_thread"]
    result["loaded_slowdown_libgomp"] = result["loaded"]["libgomp"] / result["loaded"]["one_thread"]
    result["idle_speedup"] = result["alone"]["one_thread"] / result["alone"]["efm"]
    result["idle_speedup_libgomp"] = result["alone"]["one_thread"] / result["alone"]["libgomp"]
    if shards:
        two = {name: [] for name in ("efm", "one_thread")}
        for _ in range(repeats):
            for name in two:
                two[name].append(_translate_seconds(name, inputs, out, shards=2))
        result["shards"] = {name: statistics.median(values) for name, values in two.items()}
        result["shards"]["speedup_one_thread_each"] = result["shards"]["efm"] / result["shards"]["one_thread"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one batch, no single-thread baseline (under a minute)")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--size", type=int, default=64, help="capacitor resolution and input image size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, help="batches to translate (default: 1 with --quick, else 4)")
    parser.add_argument("--network", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; 1 on a busy machine)")
    parser.add_argument("--no-threads", action="store_true", help="skip the thread settings of the efm command")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    start = time.perf_counter()
    device = choose_device(options.device)
    batches = options.batches or (1 if options.quick else 4)
    capacitor = random_capacitor(options.network, options.size, device)
    result: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/bench_translate.py", *sys.argv[1:]]),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "network": options.network,
        "parameters": sum(p.numel() for p in capacitor.network.parameters()),
        "size": options.size,
        "batch_size": options.batch_size,
        "images": batches * options.batch_size,
        "precision": options.precision,
        "real_photos": PHOTOS.is_dir(),
    }
    run = {"direction": "forward", "batch_size": options.batch_size, "precision": options.precision}
    with tempfile.TemporaryDirectory() as scratch:
        jobs = write_inputs(Path(scratch) / "in", batches * options.batch_size, options.size)
        with torch.inference_mode():  # warm-up: first-call allocations and kernel choices belong to neither side
            probe = torch.zeros(options.batch_size, 3, options.size, options.size, device=device)
            capacitor.translate(probe, precision=options.precision, solver="euler", steps=1)
        timed = timed_run(capacitor, jobs, run, workers=None)
        result.update(timed)
        if device.type == "cuda":
            result.update(untimed_run(capacitor, jobs, run))
        if not options.quick:
            alone = timed_run(capacitor, jobs, run, workers=0)
            result["single_thread_images_per_second"] = alone["images_per_second"]
            result["overlap_speedup"] = result["images_per_second"] / alone["images_per_second"]
        if not options.no_threads:
            photos_count, repeats = (8, 1) if options.quick else (24, 3)
            result["threads"] = threads_case(Path(scratch), photos_count, repeats, shards=not options.quick)
    result["detail"] = detail_effect(8 if options.quick else 40, DETAIL_SIZE)
    result["seconds"] = time.perf_counter() - start
    result["targets"] = TARGETS
    result["met"] = {"overhead_fraction": result["overhead_fraction"] <= TARGETS["overhead_fraction"]}
    if "threads" in result:
        result["met"]["loaded_slowdown"] = result["threads"]["loaded_slowdown"] <= TARGETS["loaded_slowdown"]
    emit(result)


if __name__ == "__main__":
    main()
