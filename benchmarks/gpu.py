"""One prepared GPU run: translation and training throughput, then the best horse2zebra capacitor the time left allows.

Every phase checks the time left against one deadline, counted from the script's start once torch is imported
(`--minutes`, 8.5 by default: with the imports, the whole run ends within 9):
a) translate: images/s and NFE of the embedded capacitors (horse2zebra, digits-2to3) in fp32 and bf16, for
   capacitor-size tensors alone (`Capacitor.translate`) and through the file pipeline (`translate_files`: decode,
   resize, integrate, detail, encode, write) on 64×64 and 256×256 inputs;
b) train speed: steps/s of `efm train`'s step (charge batches from decoded folders onto the device, then
   `Trainer.step_on`) for the `small` and `base` presets at 64 and 128, in bf16 and fp32, with the recipe's points
   and charges;
c) the rest of the time: `efm train` on --data with the GPU recipe (`choose_recipe`), its `--steps` fitted from b's
   steps/s so that the cosine schedule ends with the time, `--max-minutes` as a backstop; then `efm eval` on
   testA/testB, and the contact sheet of `efm translate --grid` for the first testA horses (drawn in this process,
   which has torch loaded already).

What lands in --out (seven files, at most two levels down): results.json (this run's summary, also printed on
stdout), eval.json (efm eval's report), testA-grid.jpg, loss.png, log.txt (every command and its stderr) and
capacitor/ (config.json, model.safetensors in fp16). `--tiny` runs every path with tiny sizes on a CPU, in under a
minute where the CPU has native bf16 and about three where it has not; the test suite runs it end to end.

    benchmarks/gpu.sh OUT                       # on a machine with one CUDA GPU
    python benchmarks/gpu.py --tiny --out OUT   # CPU, 1-3 minutes
    python benchmarks/gpu.py --pack DIR         # a 128×128 copy of the data (about 40 MB) to ship to a GPU machine
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from _common import emit
from PIL import Image, ImageDraw
from torch import Tensor

from efm_cli.capacitor.model import Capacitor
from efm_cli.images import find_images, load, to_tensor
from efm_cli.network import build, preset
from efm_cli.training.data import BatchStream, ImageFolder, Preprocessing
from efm_cli.training.step import FieldSpec, Schedule, Trainer
from efm_cli.translate import contact_sheet, translate_files, write_picture
from efm_cli.translate import plan as plan_files

START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "horse2zebra"
SPLITS = ("trainA", "trainB", "testA", "testB")
CAPACITORS = ("horse2zebra", "digits-2to3")
PRECISIONS = ("fp32", "bf16")
PACK_SIDE = 128
"""Side of `--pack` copies: the largest size the recipe trains at, and 2661 JPEGs of about 9 KB."""
EFFICIENCY = 0.85
"""Share of b's steps/s that `efm train` keeps: logging, a checkpoint and sample grid half-way, metrics."""
GRID_IMAGES = 12


@dataclass(frozen=True)
class Reserve:
    """Seconds kept back from training for what follows it, and for efm train's own start and final save."""

    startup: float
    save: float
    eval: float
    grid: float
    finish: float


@dataclass(frozen=True)
class Plan:
    """The sizes of one run: the GPU's, or tiny ones that take every path on a CPU in seconds."""

    minutes: float
    images: int
    """Inputs per capacitor (and per input size)."""
    sides: tuple[int, ...]
    """Sides of the input files of the file pipeline."""
    batch: int
    solver: dict[str, Any]
    """Integrator options; empty: each capacitor's own sampler (dopri5 at its tolerances)."""
    presets: tuple[str, ...]
    train_sizes: tuple[int, ...]
    train_precisions: tuple[str, ...]
    points: int
    charges: int
    warmup_steps: int
    timed_steps: int
    """Most timed steps per configuration; fewer when `step_seconds` runs out first."""
    step_seconds: float
    translate_seconds: float
    speed_seconds: float
    recipes: tuple[tuple[str, int], ...]
    """(network, size) to train, best first: the first whose projected steps reach `min_steps` is taken."""
    min_steps: int
    min_train_seconds: float
    """Training time phases a and b must leave; less, and they stop early."""
    fixed_steps: int | None
    """Steps of the training run when they are not projected from the measured speed."""
    lr_warmup: int
    precision: str
    split_images: int | None
    """Images per split copied (or generated) for training and eval; None: --data as it is."""
    reserve: Reserve


GPU = Plan(
    minutes=8.5,
    images=512,
    sides=(64, 256),
    batch=128,
    solver={},
    presets=("small", "base"),
    train_sizes=(64, 128),
    train_precisions=("bf16", "fp32"),
    points=64,
    charges=512,
    warmup_steps=3,
    timed_steps=500,
    step_seconds=3.0,
    translate_seconds=75.0,
    speed_seconds=60.0,
    recipes=(("base", 128), ("small", 128)),
    min_steps=1500,  # the CPU capacitor needed about 1700 steps (of 16 points) to reach its target rate
    min_train_seconds=120.0,
    fixed_steps=None,
    lr_warmup=200,
    precision="bf16",
    split_images=None,
    reserve=Reserve(startup=45.0, save=20.0, eval=100.0, grid=20.0, finish=10.0),
)
TINY = Plan(
    minutes=5.5,  # bf16 autocast on a CPU without native bf16 (no AVX-512 BF16) runs the 64×64 UNet ~60× slower
    images=1,
    sides=(16, 40),
    batch=1,
    solver={"solver": "euler", "steps": 2},
    presets=("small", "base"),
    train_sizes=(16,),
    train_precisions=("fp32",),  # CPUs train in fp32 whatever is asked
    points=2,
    charges=4,
    warmup_steps=0,
    timed_steps=1,
    step_seconds=0.0,
    translate_seconds=150.0,
    speed_seconds=60.0,
    recipes=(("tiny", 16),),
    min_steps=0,
    min_train_seconds=0.0,
    fixed_steps=4,
    lr_warmup=1,
    precision="fp32",
    split_images=6,
    reserve=Reserve(startup=10.0, save=5.0, eval=40.0, grid=20.0, finish=5.0),
)


class Deadline:
    """The end of the whole run, counted from START (the script's start, once its imports are done)."""

    def __init__(self, minutes: float) -> None:
        self.end = START + 60.0 * minutes

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- inputs -------------------------------------------------------------------------------------------------------


def generated(folder: Path, count: int, seed: int, side: int = 64) -> list[Path]:
    """Stand-ins when no data is at hand: discs (even seeds) or bars (odd) on a dark ground, random colours."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        colour, ground = rng.integers(96, 256, 3), rng.integers(0, 64, 3)
        image = Image.new("RGB", (side, side), tuple(int(c) for c in ground))
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(0, side // 2, 2))
        fill = tuple(int(c) for c in colour)
        if seed % 2:
            for offset in range(0, side, 8):
                draw.rectangle([offset, y, offset + 3, y + side // 2], fill=fill)
        else:
            draw.ellipse([x, y, x + side // 2, y + side // 2], fill=fill)
        paths.append(folder / f"{i:05d}.png")
        image.save(paths[-1])
    return paths


def save_resized(source: Path, target: Path, side: int) -> None:
    """`source` as a side×side RGB JPEG (quality 95) at `target`."""
    with Image.open(source) as image:
        picture = image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    target.parent.mkdir(parents=True, exist_ok=True)
    picture.save(target, format="JPEG", quality=95)


def resized_copies(sources: list[Path], folder: Path, count: int, side: int) -> None:
    """`count` side×side JPEGs in `folder`, the sources reused round-robin."""
    for i in range(count):
        save_resized(sources[i % len(sources)], folder / f"{i:05d}.jpg", side)


def capacitor_sources(name: str, plan: Plan, data: Path, work: Path, log: TextIO) -> tuple[list[Path], str]:
    """Images from each capacitor's source plate: testA horses, coloured MNIST twos (examples/digits.py, from the
    mnist.npz beside --data), or generated stand-ins when those are missing; and what they are."""
    if name == "horse2zebra" and (data / "testA").is_dir():
        return find_images(data / "testA")[: plan.images], str(data / "testA")
    mnist = data.parent / "mnist" / "mnist.npz"
    if name == "digits-2to3" and mnist.is_file():
        digits = work / "digits"
        command = [sys.executable, str(ROOT / "examples" / "digits.py"), str(digits), "--mnist", str(mnist)]
        if run([*command, "--per-split", str(plan.images)], 120.0, log)[0] == 0:
            return find_images(digits / "test" / "two"), f"coloured MNIST test twos from {mnist}"
    return generated(work / "generated" / name, plan.images, seed=0), "generated discs (source data not found)"


def tiny_data(data: Path, work: Path, count: int) -> tuple[Path, str]:
    """A CycleGAN-layout folder of `count` images per split: sampled from --data and made 32×32, or generated."""
    folder = work / "horse2zebra"
    if all((data / split).is_dir() for split in SPLITS):
        for split in SPLITS:
            resized_copies(find_images(data / split)[:count], folder / split, count, 32)
        return folder, f"{count} images per split of {data}, 32×32"
    for seed, split in enumerate(SPLITS):
        generated(folder / split, count, seed=seed, side=32)
    return folder, f"{count} generated images per split (no data at {data})"


# --- a) translation -----------------------------------------------------------------------------------------------


def tensor_speed(capacitor: Capacitor, images: Tensor, batch: int, precision: str, **options: Any) -> dict:
    """Capacitor-size tensors alone, `batch` at a time: images/s and evaluations per image."""
    device = next(capacitor.network.parameters()).device
    capacitor.translate(images[:batch].to(device), precision=precision, **options)  # warm-up, at the batch size
    sync(device)
    start = time.perf_counter()
    solutions = [capacitor.translate(part.to(device), precision=precision, **options) for part in images.split(batch)]
    sync(device)
    seconds = time.perf_counter() - start
    nfe = torch.cat([done.solution.nfe.cpu() for done in solutions]).double()
    landed = sum(int(done.solution.landed.sum()) for done in solutions)
    return {"images_per_s": len(images) / seconds, "nfe_mean": float(nfe.mean()), "landed": landed}


def file_speed(capacitor: Capacitor, folder: Path, out: Path, batch: int, precision: str, **options: Any) -> dict:
    """The files of `folder` through `translate_files`, as `efm translate` runs them: images/s and NFE."""
    jobs = plan_files([str(folder)], domain=capacitor.target, out=out).jobs
    report = translate_files(capacitor, jobs, direction="forward", batch_size=batch, precision=precision, **options)
    shutil.rmtree(out)
    done = report.summary()
    return {
        "images_per_s": done["translated"] / report.seconds,
        "nfe_mean": done["nfe_mean"],
        "translated": done["translated"],
        "retried_fp32": done["retried_fp32"],
    }


def translate_speed(plan: Plan, device: torch.device, until: float, data: Path, work: Path, log: TextIO) -> dict:
    """Per embedded capacitor and precision: model-size tensors alone, and files of each side, until `until`."""
    results: dict[str, Any] = {}
    options = {**plan.solver, **({"sync_every": 4} if device.type != "cpu" else {})}
    for name in CAPACITORS:
        capacitor = Capacitor.from_pretrained(name, device=device)
        size = capacitor.config["image"]["size"]
        sources, kind = capacitor_sources(name, plan, data, work, log)
        folders = {side: work / "inputs" / f"{name}-{side}" for side in plan.sides}
        for side, folder in folders.items():
            resized_copies(sources, folder, plan.images, side)
        images = torch.stack([to_tensor(load(path).rgb, size) for path in find_images(folders[plan.sides[-1]])])
        entry: dict[str, Any] = {"inputs": kind, "capacitor_size": size, "images": plan.images, "batch": plan.batch}
        for precision in PRECISIONS:
            if time.monotonic() > until:
                entry[precision] = {"skipped": "out of time"}
                continue
            measured = {"tensors": tensor_speed(capacitor, images, plan.batch, precision, **options)}
            for side, folder in folders.items():
                out = work / "outputs" / f"{name}-{side}-{precision}"
                measured[f"files_{side}"] = file_speed(capacitor, folder, out, plan.batch, precision, **options)
            entry[precision] = measured
        results[name] = entry
    return results


# --- b) training speed --------------------------------------------------------------------------------------------


def plate_streams(work: Path, size: int, charges: int) -> list[BatchStream]:
    """Charge batches as `efm train` draws them (decoded folders in memory, random flips), from 64 generated images
    per plate: the data's share of a step, without loading the real data once per size."""
    folders = [work / "plates" / name for name in ("discs", "bars")]
    for seed, folder in enumerate(folders):
        if not folder.is_dir():
            generated(folder, 64, seed=seed)
    prep = Preprocessing(size=size, hflip=True)
    return [BatchStream(ImageFolder(folder, prep), charges, seed) for seed, folder in enumerate(folders)]


def step_speed(plan: Plan, device: torch.device, work: Path, network: str, size: int, precision: str) -> dict:
    """Steps/s of one configuration: the next charge batches onto the device, then `Trainer.step_on`."""
    spec = FieldSpec(kind="tube", L=20.0, S=tube_width(size), plan="ot")
    torch.manual_seed(0)
    net = build(preset(network, size=size, L=spec.L).to_dict()).to(device)
    trainer = Trainer(net, spec, Schedule(warmup=10), points=plan.points, precision=precision)
    streams = plate_streams(work, size, plan.charges)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        source, target = (stream.rows(trainer.step).to(device, non_blocking=True) for stream in streams)
        return trainer.step_on(source, target).loss

    for _ in range(plan.warmup_steps):
        step()
    sync(device)
    start, steps, loss = time.perf_counter(), 0, math.nan
    while steps < plan.timed_steps and (steps == 0 or time.perf_counter() - start < plan.step_seconds):
        loss = step()
        steps += 1
    sync(device)
    result = {
        "steps_per_s": steps / (time.perf_counter() - start),
        "steps": steps,
        "parameters": sum(p.numel() for p in net.parameters()),
        "loss": loss,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def train_speed(
    plan: Plan, device: torch.device, until: float, work: Path, presets: tuple[str, ...], sizes: tuple[int, ...]
) -> dict[str, Any]:
    """Steps/s of every preset, size and precision, keyed "network-size-precision", until the phase's time is up;
    the recipe's precision first, so that what `choose_recipe` needs is measured before the time can run out."""
    results: dict[str, Any] = {"points": plan.points, "charges": plan.charges, "field": "tube, OT pairing"}
    for precision in plan.train_precisions:
        for network in presets:
            for size in sizes:
                key = f"{network}-{size}-{precision}"
                if time.monotonic() > until:
                    results[key] = {"skipped": "out of time"}
                    continue
                results[key] = step_speed(plan, device, work, network, size, precision)
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the last configuration's network and optimiser are gone by now
    return results


# --- c) the capacitor ---------------------------------------------------------------------------------------------


def tube_width(size: int) -> float:
    """Half efm train's default at every size (S = 5 at 64×64, 10 at 128×128): at 64×64, S = 5 beat the default
    S = 10 on target rate and FD (README's horse table), and the default grows with the distance between images."""
    return 5.0 * size / 64


def choose_recipe(plan: Plan, speeds: dict[str, Any], seconds: float, forced: tuple[str | None, int | None]) -> dict:
    """The first of `plan.recipes` (or the forced network and size) whose projected steps reach `plan.min_steps`.

    Projected steps are b's steps/s × the training seconds × EFFICIENCY; they become `--steps`, so that the cosine
    decay of the learning rate ends when the time does rather than being cut off at a high rate.
    """
    candidates = [(forced[0] or network, forced[1] or size) for network, size in plan.recipes]
    chosen: dict[str, Any] = {}
    for network, size in candidates:
        chosen = {"network": network, "size": size, "steps": plan.fixed_steps, "why": "fixed steps"}
        rate = speeds.get(f"{network}-{size}-{plan.precision}", {}).get("steps_per_s")
        if rate and plan.fixed_steps is None:
            steps = max(1, int(rate * seconds * EFFICIENCY))
            enough = "reach" if steps >= plan.min_steps else "fall short of (the last choice)"
            why = f"{rate:.2f} steps/s × {seconds:.0f} s × {EFFICIENCY}: {steps} steps {enough} {plan.min_steps}"
            chosen |= {"measured_steps_per_s": rate, "steps": steps, "why": why}
        elif plan.fixed_steps is None:
            chosen["why"] = "speed not measured: efm train's default steps, stopped by --max-minutes"
        if (chosen["steps"] or 0) >= plan.min_steps:
            break
    return chosen


def train_arguments(plan: Plan, recipe: dict[str, Any], data: Path, run_folder: Path, device: str) -> list[str]:
    """`efm train`'s command line for the recipe.

    Against the CPU recipe (small UNet, 64×64, 16 points, 256 charges): a bigger network at twice the resolution
    where the GPU allows it, 4× the points per step (IFM's own 64), 2× the charges per plate (more choice for the OT
    pairing, which mattered most on coloured digits), bf16 autocast, and the same narrower-than-default tube. A
    recipe whose speed was not measured keeps efm train's 20000 steps and stops at `--max-minutes`.
    """
    steps = recipe["steps"] or 20000
    every = max(1, steps // 2 + 1)  # one checkpoint and sample grid half-way, then the final ones
    settings = {
        "--source": data,
        "--source-name": "horse",
        "--target-name": "zebra",
        "--size": recipe["size"],
        "--network": recipe["network"],
        "--tube-width": f"{tube_width(recipe['size']):g}",
        "--batch-size": plan.points,
        "--charges": plan.charges,
        "--warmup": plan.lr_warmup,
        "--precision": plan.precision,
        "--steps": steps,
        "--max-minutes": f"{recipe['max_minutes']:.3f}",
        "--checkpoint-every": every,
        "--sample-every": every,
        "--log-every": 50,
        "--device": device,
        "--out": run_folder,
    }
    return ["train", *(str(item) for pair in settings.items() for item in pair), "--json"]


def run(command: list[str], timeout: float, log: TextIO, *, gentle: bool = False) -> tuple[int, str]:
    """Run a command with its stderr in the log; past `timeout` it is stopped (SIGTERM first when `gentle`: efm
    train then checkpoints and exports) so that the run never hangs. Returns the exit code and stdout."""
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    began = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=ENV, cwd=ROOT) as process:
        try:
            stdout, _ = process.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            log.write(f"(stopped after {timeout:.0f} s)\n")
            process.send_signal(signal.SIGTERM if gentle else signal.SIGKILL)
            try:
                stdout, _ = process.communicate(timeout=30.0)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, _ = process.communicate()
    log.write(f"(exit code {process.returncode} after {time.monotonic() - began:.1f} s)\n")
    log.flush()
    return process.returncode, stdout


def efm(arguments: list[str], timeout: float, log: TextIO, *, gentle: bool = False) -> tuple[int, str]:
    return run([sys.executable, "-m", "efm_cli", *arguments], timeout, log, gentle=gentle)


def train_and_evaluate(
    plan: Plan,
    options: argparse.Namespace,
    speeds: dict[str, Any],
    deadline: Deadline,
    work: Path,
    out: Path,
    log: TextIO,
) -> dict[str, Any]:
    """Train with the real CLI, evaluate, draw the grid, copy the capacitor into out; what happened, as a dict."""
    reserve = plan.reserve
    data, kind = (options.data, str(options.data))
    if plan.split_images is not None:
        data, kind = tiny_data(options.data, work, plan.split_images)
    after_training = reserve.eval + reserve.grid + reserve.finish
    seconds = deadline.left() - after_training - reserve.startup - reserve.save
    recipe = choose_recipe(plan, speeds, seconds, (options.network, options.size))
    if seconds < 30.0 and plan.fixed_steps is None:
        return {"recipe": recipe, "skipped": f"out of time ({seconds:.0f} s left to train)"}
    recipe["max_minutes"] = seconds / 60.0
    run_folder = work / "run"
    code, stdout = efm(
        train_arguments(plan, recipe, data, run_folder, str(options.device)),
        deadline.left() - after_training,
        log,
        gentle=True,
    )
    result: dict[str, Any] = {"data": kind, "recipe": recipe}
    model = run_folder / "model"
    if code not in (0, 3) or not (model / "config.json").is_file():
        return {**result, "error": f"efm train failed (exit code {code}); see log.txt"}
    result["training"] = json.loads(stdout)
    evaluate = ["eval", "--model", str(model), "--device", str(options.device), "--report", str(out / "eval.json")]
    evaluate += ["--source", str(data / "testA"), "--target", str(data / "testB")]
    evaluate += ["--train-source", str(data / "trainA"), "--train-target", str(data / "trainB")]
    code, _ = efm(evaluate, deadline.left() - reserve.grid - reserve.finish, log)
    if code in (0, 3) and (out / "eval.json").is_file():
        result["eval"] = eval_summary(json.loads((out / "eval.json").read_text()))
    else:
        result["error"] = f"efm eval failed (exit code {code}); see log.txt"
    capacitor = Capacitor.from_pretrained(model, device=options.device)
    horses = [str(path) for path in find_images(data / "testA")[:GRID_IMAGES]]
    jobs = plan_files(horses, domain=capacitor.target, out=work / "grid").jobs
    shown = translate_files(capacitor, jobs, direction="forward", batch_size=len(jobs), show=len(jobs))
    write_picture(out / "testA-grid.jpg", contact_sheet(shown.pairs))  # what `efm translate --grid` draws
    if (run_folder / "loss.png").is_file():
        shutil.copyfile(run_folder / "loss.png", out / "loss.png")
    capacitor.save_pretrained(out / "capacitor", dtype=torch.float16)
    return result


def eval_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of efm eval's report that README's tables quote."""
    return {
        "target_rate": report["target_rate"],
        "target_rate_se": report["target_rate_se"],
        "robust_target_rate": report["robust_target_rate"],
        "fd": report["fd"]["translated"],
        "fd_se": report["fd"]["translated_se"],
        "fd_no_op": report["fd"]["no_op"],
        "fd_noise_floor": report["fd"]["noise_floor"],
        "structure_ssim": report["structure_ssim"],
        "hue_difference_deg": report["hue_difference_deg"],
        "mean_abs_change": report["mean_abs_change"],
        "nfe_mean": report["speed"]["nfe_mean"],
        "classifier_accuracy": report["classifier"]["accuracy"],
        "trustworthy": report["trick_test"]["trustworthy"],
        "meaningful": report["meaningful"],
    }


# --- the run ------------------------------------------------------------------------------------------------------


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
"""The commands' environment: this checkout importable without an install, the Hub never asked."""


def pack(data: Path, folder: Path) -> dict[str, Any]:
    """Copy --data at PACK_SIDE×PACK_SIDE (JPEG, quality 95) and the mnist.npz beside it into `folder`."""
    count = 0
    for split in SPLITS:
        for path in find_images(data / split):
            save_resized(path, (folder / "horse2zebra" / split / path.name).with_suffix(".jpg"), PACK_SIDE)
            count += 1
    mnist = data.parent / "mnist" / "mnist.npz"
    if mnist.is_file():
        (folder / "mnist").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mnist, folder / "mnist" / "mnist.npz")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"packed": str(folder / "horse2zebra"), "images": count, "side": PACK_SIDE, "megabytes": size / 1e6}


def guarded(log: TextIO, phase: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """The phase's result, or its error (traceback in the log): one phase failing must not lose the others'."""
    try:
        return phase(*args)
    except Exception as error:
        traceback.print_exc(file=log)
        return {"error": f"{type(error).__name__}: {error}"}


def fail(message: str, hint: str) -> None:
    print(f"error: {message} — {hint}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for everything this run writes")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU, 1-3 minutes (what the tests run)")
    parser.add_argument("--device", help="cuda (default), cuda:N, or cpu to force the full run on the CPU")
    parser.add_argument("--data", type=Path, default=DATA, help="horse2zebra folder (trainA, trainB, testA, testB)")
    parser.add_argument("--minutes", type=float, help="deadline of the whole run (default 8.5; tiny: 5.5)")
    parser.add_argument("--network", choices=("tiny", "small", "base"), help="train this preset, not the chosen one")
    parser.add_argument("--size", type=int, help="train at this size, not the chosen one")
    parser.add_argument("--work", type=Path, help="keep the run folder and inputs here (default: a temporary folder)")
    parser.add_argument("--pack", type=Path, metavar="DIR", help="only copy --data into DIR at 128×128, and stop")
    options = parser.parse_args()
    if options.pack is not None:
        emit(pack(options.data, options.pack))
        return
    if options.out is None:
        parser.error("--out is required")
    plan = TINY if options.tiny else GPU
    options.out, options.data = options.out.resolve(), options.data.resolve()  # the commands run from the root
    options.device = torch.device(options.device or ("cpu" if options.tiny else "cuda"))
    if options.device.type == "cuda" and not torch.cuda.is_available():
        fail("no CUDA GPU on this machine", "run it on a GPU machine, or pass --tiny (seconds) or --device cpu")
    if not options.tiny and not all((options.data / split).is_dir() for split in SPLITS):
        fail(f"{options.data} does not hold {', '.join(SPLITS)}", "pass --data, or make a copy with --pack")
    if not options.tiny and efm(["--version"], 60.0, sys.stderr)[0] != 0:
        fail("the efm command line does not start here", "see the error above")
    deadline = Deadline(options.minutes or plan.minutes)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="efm-gpu-") as scratch, (options.out / "log.txt").open("w") as log:
        work = (options.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        ENV["EFM_CACHE"] = str(work / "cache")
        result: dict[str, Any] = {
            "mode": "tiny" if options.tiny else "full",
            "device": str(options.device),
            "device_name": torch.cuda.get_device_name(options.device) if options.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "deadline_s": deadline.end - START,
        }
        latest = deadline.end - sum(astuple(plan.reserve)) - plan.min_train_seconds  # for phases a and b
        phases = result["phase_seconds"] = {}
        began = time.monotonic()
        until = min(began + plan.translate_seconds, latest)
        result["translate"] = guarded(log, translate_speed, plan, options.device, until, options.data, work, log)
        phases["translate"], began = time.monotonic() - began, time.monotonic()
        presets = tuple(dict.fromkeys([*plan.presets, *([options.network] if options.network else [])]))
        sizes = tuple(sorted({*plan.train_sizes, *([options.size] if options.size else [])}))
        until = min(began + plan.speed_seconds, latest)
        result["train_speed"] = guarded(log, train_speed, plan, options.device, until, work, presets, sizes)
        phases["train_speed"], began = time.monotonic() - began, time.monotonic()
        speeds = result["train_speed"]
        result["capacitor"] = guarded(log, train_and_evaluate, plan, options, speeds, deadline, work, options.out, log)
        phases["capacitor"] = time.monotonic() - began
        result["seconds"] = time.monotonic() - START
        written = {str(p.relative_to(options.out)) for p in options.out.rglob("*") if p.is_file()}
        result["files"] = sorted(written | {"results.json"})
        (options.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    emit(result)
    failed = [phase for phase in ("translate", "train_speed", "capacitor") if "error" in result[phase]]
    if failed or "skipped" in result["capacitor"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
