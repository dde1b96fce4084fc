"""Training an autoencoder for latent capacitors on the two plates' images (`efm autoencoder`).

The Hub's VAEs are out of reach offline, so efm trains its own in diffusers' AutoencoderTiny format: a plain
L1 reconstruction loss blurs fine texture, so the loss adds the L1 distance of the images' gradients, which keeps
edges such as a zebra's stripes. Runs are folders like `efm train`'s (config.json, checkpoints, samples, metrics)
and resume step for step; RUN/model is the autoencoder, readable by `efm train --latent` and by diffusers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from efm_cli import __version__, devices
from efm_cli.autoencoder import Autoencoder
from efm_cli.errors import UsageError
from efm_cli.files import write_json
from efm_cli.images import LUMA, find_images, load, save_atomic, to_tensor
from efm_cli.training import checkpoint
from efm_cli.training.data import BatchStream, Preprocessing, batches
from efm_cli.training.run import Budget, Progress, RunError, StopOnSignal, grid, open_folder
from efm_cli.training.step import Schedule

RUN_FORMAT = "efm-autoencoder-run"
PRESETS: dict[str, dict[str, Any]] = {
    "small": {
        "_class_name": "AutoencoderTiny",
        "encoder_block_out_channels": [32, 32, 32, 32],
        "decoder_block_out_channels": [32, 32, 32, 32],
        "num_encoder_blocks": [0, 2, 2, 2],
        "num_decoder_blocks": [2, 2, 2, 1],
        "latent_channels": 8,
    },
    "small-4x": {
        "_class_name": "AutoencoderTiny",
        "encoder_block_out_channels": [32, 32, 32],
        "decoder_block_out_channels": [32, 32, 32],
        "num_encoder_blocks": [0, 2, 2],
        "num_decoder_blocks": [2, 2, 1],
        "latent_channels": 8,
    },
}
"""Autoencoder architectures by name. `small`: 8× downsampling to 8 channels; no residual block at full resolution
in the encoder and one in the decoder, which is what makes it trainable on a CPU (README, "Latent capacitors").
`small-4x`: the same with one stage fewer, 4× downsampling, for small images such as 32×32 digits."""
HELD_OUT = 16
"""Images per held-out folder in the reconstruction report and the sample grid."""


@dataclass(frozen=True)
class AutoencoderSettings:
    """Everything that defines an autoencoder run; stored in RUN/config.json so that `--resume` needs no flags."""

    source: str
    target: str
    size: int = 128
    architecture: str = "small"
    batch: int = 16
    lr: float = 1e-3
    steps: int = 3000
    warmup: int = 100
    gradient_weight: float = 1.0
    hflip: bool = True
    seed: int = 0
    held_out: tuple[str, ...] = ()
    log_every: int = 10
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.architecture not in PRESETS:
            raise UsageError(f"unknown autoencoder architecture {self.architecture!r}", f"use {', '.join(PRESETS)}")
        if self.batch < 2 or self.batch % 2:
            raise UsageError("the batch size must be even and at least 2", "half of each batch comes from each plate")
        if self.steps < 1 or self.size % 8 or not 16 <= self.size <= 1024:
            raise UsageError("steps must be positive and the size a multiple of 8 in [16, 1024]")

    def schedule(self) -> Schedule:
        return Schedule(lr=self.lr, warmup=self.warmup, decay="cosine", total=self.steps)


def write_settings(run: Path, settings: AutoencoderSettings) -> None:
    write_json(run / "config.json", {"format": RUN_FORMAT, "efm_version": __version__, "settings": asdict(settings)})


def read_settings(run: Path) -> AutoencoderSettings:
    try:
        data = json.loads((run / "config.json").read_text(encoding="utf-8"))
        if data.get("format") != RUN_FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {RUN_FORMAT!r}")
        values = dict(data["settings"])
        values["held_out"] = tuple(values.get("held_out", ()))
        return AutoencoderSettings(**values)
    except FileNotFoundError as error:
        raise RunError(f"{run} holds no config.json", "resume a folder that efm autoencoder wrote") from error
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise RunError(f"{run / 'config.json'} is not an autoencoder run config ({error})") from error


def reconstruction_loss(images: Tensor, reconstructed: Tensor, gradient_weight: float) -> Tensor:
    """L1 of the pixels plus `gradient_weight` × L1 of their horizontal and vertical differences."""
    loss = (reconstructed - images).abs().mean()
    for dim in (-1, -2):
        loss = loss + gradient_weight * (reconstructed.diff(dim=dim) - images.diff(dim=dim)).abs().mean()
    return loss


def _gradient_energy(images: Tensor) -> Tensor:
    """Mean absolute horizontal and vertical difference of each image's luminance, [b]."""
    luma = (images * torch.tensor(LUMA, dtype=images.dtype)[None, :, None, None]).sum(1)
    return luma.diff(dim=-1).abs().mean(dim=(1, 2)) + luma.diff(dim=-2).abs().mean(dim=(1, 2))


def reconstruction_report(images: Tensor, reconstructed: Tensor) -> dict[str, float]:
    """How faithful reconstructions are, for images in [−1, 1]: PSNR (dB), SSIM of the luminance, and `texture`,
    the reconstructions' gradient energy over the originals' (1 keeps fine texture, below 1 is blur)."""
    from efm_cli.evaluation.report import luminance, ssim

    a, b = images.double(), reconstructed.double()
    mse = ((a - b) / 2).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    ssims = ssim(luminance(a), luminance(b))
    texture = _gradient_energy(b).sum() / _gradient_energy(a).sum().clamp_min(1e-12)
    return {
        "psnr": round(float((-10 * mse.log10()).mean()), 3),
        "ssim": round(float(ssims.mean()), 4),
        "texture": round(float(texture), 4),
        "images": len(images),
    }


@dataclass
class AutoencoderSummary:
    """What `fit_autoencoder` reports at the end (also `efm autoencoder --json`)."""

    run: str
    model: str
    step: int
    loss: float | None
    seconds: float
    steps_per_s: float
    stopped: str
    images: int
    held_out: dict[str, dict[str, float]] = field(default_factory=dict)


def _held_out_images(settings: AutoencoderSettings, prep: Preprocessing) -> dict[str, Tensor]:
    """A fixed few images per held-out folder (the first in sorted order), for the report and the grid."""
    chosen = {}
    for folder in settings.held_out:
        paths = find_images(Path(folder))[:HELD_OUT]
        if not paths:
            raise RunError(f"{folder} holds no images", "pass a held-out folder of images with --held-out")
        chosen[folder] = torch.stack([to_tensor(load(p).rgb, prep.size, mode=prep.resize) for p in paths])
    return chosen


def fit_autoencoder(
    settings: AutoencoderSettings,
    run: Path,
    *,
    budget: Budget,
    resume: bool = False,
    device: str = "auto",
    on_progress: Callable[[Progress], None] | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> AutoencoderSummary:
    """Train (or continue) the autoencoder run in `run` until the budget or the schedule ends; export RUN/model."""
    torch.set_flush_denormal(True)
    target_device = devices.choose(device)
    started = time.monotonic()
    prep = Preprocessing(size=settings.size, resize="resize", hflip=settings.hflip)
    folders = [open_folder(settings.source, prep), open_folder(settings.target, prep)]
    if any(folder is None for folder in folders):
        raise RunError("an autoencoder learns from images, not noise", "give two image folders")
    streams = [BatchStream(folder, settings.batch // 2, settings.seed * 2 + i) for i, folder in enumerate(folders)]
    held_out = _held_out_images(settings, prep)
    torch.manual_seed(settings.seed)
    autoencoder = Autoencoder(PRESETS[settings.architecture]).to(target_device)
    optimizer = torch.optim.Adam(autoencoder.parameters(), lr=settings.lr)
    schedule = settings.schedule()
    step = 0
    checkpoints = run / "checkpoints"
    if resume:
        tensors, meta = checkpoint.load(checkpoint.resume_point(checkpoints, "efm autoencoder"))
        autoencoder.model.load_state_dict(tensors["model"])
        checkpoint.load_optimizer(optimizer, tensors["optimizer"], meta["param_groups"], target_device)
        step = int(meta["step"])
        started -= float(meta.get("elapsed_s", 0.0))
    write_settings(run, settings)
    fixed = {"train": torch.cat([s.rows(0)[: HELD_OUT // 2] for s in streams])} | held_out
    log = run / "metrics.jsonl"
    session_start, session_steps, window = time.monotonic(), 0, []
    smoothed: float | None = None
    report: dict[str, dict[str, float]] = {}

    def save() -> None:
        nonlocal report
        report = _samples_and_report(run, autoencoder, fixed, step)
        optimizer_state, groups = checkpoint.optimizer_tensors(optimizer)
        model = {k: v.detach().cpu().contiguous() for k, v in autoencoder.model.state_dict().items()}
        tensors = {"model": model, "optimizer": optimizer_state}
        meta = {"step": step, "param_groups": groups, "elapsed_s": time.monotonic() - started}
        try:
            checkpoint.save(checkpoints, step, tensors, meta)
            autoencoder.save(run / "model")
            write_json(run / "model" / "efm.json", {"step": step, "size": settings.size, "reconstruction": report})
        except OSError as error:
            raise RunError(f"cannot save step {step} in {run} ({error.strerror or error})") from error

    stopped = "steps"
    end = settings.steps if budget.steps is None else min(budget.steps, settings.steps)
    data = batches(*streams, start=step)
    autoencoder.train()
    with StopOnSignal(warn) as interrupt:
        while step < end:
            if budget.minutes is not None and time.monotonic() - session_start >= budget.minutes * 60:
                stopped = "time"
                break
            if interrupt.requested:
                stopped = "interrupted"
                break
            source, target = next(data)
            images = torch.cat([source, target]).to(target_device)
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = reconstruction_loss(images, autoencoder(images), settings.gradient_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(autoencoder.parameters(), 1.0))
            optimizer.step()
            step += 1
            session_steps += 1
            window.append((loss.item(), grad_norm))
            if step % settings.log_every == 0 or step == end:
                mean_loss = float(np.mean([w[0] for w in window]))
                smoothed = mean_loss if smoothed is None else 0.9 * smoothed + 0.1 * mean_loss
                progress = Progress(
                    step=step,
                    total=settings.steps,
                    loss=mean_loss,
                    smoothed=smoothed,
                    grad_norm=float(np.mean([w[1] for w in window])),
                    lr=lr,
                    skipped=0,
                    steps_per_s=session_steps / max(time.monotonic() - session_start, 1e-9),
                    elapsed_s=time.monotonic() - started,
                )
                window.clear()
                with log.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(asdict(progress)) + "\n")
                if on_progress is not None:
                    on_progress(progress)
            if step % settings.checkpoint_every == 0:
                save()
    if not report or step % settings.checkpoint_every:
        save()
    if stopped == "interrupted":
        raise KeyboardInterrupt
    seconds = time.monotonic() - session_start
    return AutoencoderSummary(
        run=str(run),
        model=str(run / "model"),
        step=step,
        loss=smoothed,
        seconds=round(seconds, 2),
        steps_per_s=round(session_steps / max(seconds, 1e-9), 3),
        stopped=stopped,
        images=sum(len(folder) for folder in folders if folder is not None),
        held_out=report,
    )


@torch.no_grad()
def _samples_and_report(
    run: Path, autoencoder: Autoencoder, fixed: dict[str, Tensor], step: int
) -> dict[str, dict[str, float]]:
    """samples/step-XXXXXXXX.png (each set of images above its reconstructions) and the reconstruction report."""
    autoencoder.eval()
    device = next(autoencoder.parameters()).device
    rows, report = [], {}
    for name, images in fixed.items():
        chunks = [autoencoder(chunk.to(device)).clamp(-1, 1).float().cpu() for chunk in images.split(8)]
        reconstructed = torch.cat(chunks)
        report[name] = reconstruction_report(images, reconstructed)
        rows += [images, reconstructed]
    save_atomic(run / "samples" / f"step-{step:08d}.png", grid(rows))
    autoencoder.train()
    return report
