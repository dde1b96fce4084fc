"""A training run on disk: settings, checkpoints, metrics, sample grids, the loss plot and the exported capacitor.

`fit` drives a `Trainer` over two folders (or noise) and owns the run folder (README, "Training a capacitor"):

    RUN/config.json         the run's settings (read back by --resume)
    RUN/checkpoints/        step-XXXXXXXX/ folders and `latest` (see efm_cli.training.checkpoint)
    RUN/samples/            step-XXXXXXXX.png: source images above their translations, with the EMA weights
    RUN/metrics.jsonl       one JSON line per logging step
    RUN/loss.png            the loss curve
    RUN/model/              the finished capacitor, rewritten at every checkpoint and at the end

Under `torchrun` every process runs `fit`; they share each global batch (each loads its rows, then all gather
them), split the points between them, and only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from efm_cli import __version__, autoencoder, devices
from efm_cli.autoencoder import Autoencoder, LatentScale
from efm_cli.capacitor.format import (
    AUTOENCODER_DIR,
    CONFIG_NAME,
    SAMPLE_NAME,
    SIZE_RULE,
    SIZE_STEP,
    new_config,
    size_ok,
)
from efm_cli.capacitor.model import Capacitor
from efm_cli.devices import Precision
from efm_cli.errors import EfmError, UsageError
from efm_cli.files import atomic_path, write_json
from efm_cli.images import save_atomic
from efm_cli.integrator import integrate
from efm_cli.network import build, preset
from efm_cli.training import checkpoint
from efm_cli.training.data import (
    NOISE,
    BatchStream,
    DataError,
    ImageFolder,
    LatentFolder,
    Preprocessing,
    ResizeMode,
    batches,
    cyclegan_folders,
    domain_names,
)
from efm_cli.training.step import (
    DEFAULT_CHARGES,
    DEFAULT_L,
    CoulombMode,
    Decay,
    FieldKind,
    FieldSpec,
    Pairing,
    Schedule,
    Scheme,
    Share,
    Trainer,
    default_tube_width,
)

RUN_FORMAT = "efm-run"


class RunError(EfmError):
    """A run folder or settings that cannot be used; the message says why and `hint` what to do."""


@dataclass(frozen=True)
class RunSettings:
    """Everything that defines a run; stored in RUN/config.json so that `--resume` needs no flags."""

    source: str
    target: str
    source_name: str
    target_name: str
    prep: Preprocessing
    field: FieldSpec
    schedule: Schedule
    network: str = "small"
    charges: int = 64
    points: int = 32
    seed: int = 0
    precision: Precision = "fp32"
    log_every: int = 10
    checkpoint_every: int = 500
    sample_every: int = 500
    samples: int = 8
    sample_steps: int = 20
    latent: str | None = None
    """The autoencoder folder a latent run started from; the run keeps its own copy in RUN/autoencoder."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSettings:
        field = dict(data["field"])
        if "target" in field:  # runs written before the Coulomb target mode was called `mode`
            field["mode"] = field.pop("target")
        return cls(
            **{
                **data,
                "prep": Preprocessing(**data["prep"]),
                "field": FieldSpec(**field),
                "schedule": Schedule(**data["schedule"]),
            }
        )


DEFAULT_STEPS = 20000
"""Steps of a run when nobody says otherwise."""
LATENT_SPREAD = 2.0
"""How much farther apart latent codes lie than pixels of the same dimension: codes are normalised to unit variance
per channel, while photo pixels in [−1, 1] spread with a standard deviation of about 0.5; the default tube width
grows with the typical distance between paired charges (docs/method.md §7)."""


class SettingsError(UsageError):
    """Run settings that contradict each other or the data as given (the command line exits 2)."""


def new_settings(
    source: str | None,
    target: str | None,
    *,
    source_name: str | None = None,
    target_name: str | None = None,
    size: int = 64,
    resize: ResizeMode = "resize",
    hflip: bool = True,
    field: FieldKind = "tube",
    L: float | None = None,
    plan: Pairing = "ot",
    mode: CoulombMode = "repo",
    gamma: float = 5.0,
    S: float | None = None,
    scheme: Scheme = "uniform",
    network: str = "small",
    points: int = 32,
    charges: int | None = None,
    lr: float = 2e-4,
    warmup: int = 1000,
    decay: Decay = "cosine",
    ema: float = 0.9999,
    precision: Precision = "fp32",
    seed: int = 0,
    steps: int | None = None,
    log_every: int = 10,
    checkpoint_every: int = 500,
    sample_every: int = 500,
    latent: str | None = None,
) -> RunSettings:
    """The settings of a new run between two folders, with efm's defaults, checked against each other.

    `source` may be a CycleGAN-style folder (trainA/, trainB/) when `target` is None, and either plate may be
    `noise`. Unset L, charges and tube width S take the defaults of the field kind; unset plate names come from
    the folders. `latent` (an autoencoder folder, `efm autoencoder` run or Hub repo) makes a latent capacitor.
    Every rule that `efm train` enforces is here, so that a Python caller gets the same ones.
    """
    if source is None:
        raise SettingsError("nothing to train on", "pass --source A --target B, or --resume RUN")
    root = None
    if target is None:
        layout = cyclegan_folders(Path(source)) if source != NOISE else None
        if layout is None:
            raise SettingsError("--target is missing", f"{source} has no trainA/ and trainB/ folders to use instead")
        root = Path(source)
        source, target = str(layout[0]), str(layout[1])
    for folder in (source, target):
        if folder != NOISE and not Path(folder).is_dir():
            raise RunError(f"{folder} is not a folder", "pass folders of images (or 'noise' as the source)")
    if source == target or (NOISE not in (source, target) and Path(source).resolve() == Path(target).resolve()):
        raise SettingsError("--source and --target are the same", "a capacitor needs two different domains")
    if NOISE not in (source, target):
        # Folders are searched recursively: a plate inside the other would put its pictures on both plates.
        for inner, outer, inner_flag, outer_flag in (
            (target, source, "--target", "--source"),
            (source, target, "--source", "--target"),
        ):
            if Path(inner).resolve().is_relative_to(Path(outer).resolve()):
                raise SettingsError(
                    f"{inner_flag} {inner} is inside {outer_flag} {outer}",
                    "pass two separate folders: the outer one is searched recursively",
                )
    if not size_ok(size):
        raise SettingsError(f"--size {size} is not {SIZE_RULE}", "use 32, 64, 128 or 256")
    width = default_tube_width(size)
    if latent is not None:
        folder = autoencoder.locate(latent)
        factor, channels = autoencoder.shape_of(folder)
        if size % (SIZE_STEP * factor):
            raise SettingsError(
                f"--size {size} is not a multiple of {SIZE_STEP * factor}",
                f"the autoencoder makes images {factor}× smaller; the field network needs a multiple of {SIZE_STEP}",
            )
        width = LATENT_SPREAD * default_tube_width(size // factor, channels)
        latent = str(folder.resolve())
    charges = charges if charges is not None else DEFAULT_CHARGES[field]
    if charges < points:
        raise SettingsError(f"--charges {charges} is below --batch-size {points}", "points lie between charges")
    names = domain_names(source, target, root)
    source_name, target_name = source_name or names[0], target_name or names[1]
    if source_name == target_name:
        raise SettingsError(
            f"both plates would be called {source_name!r}", "name them with --source-name and --target-name"
        )
    try:
        spec = FieldSpec(
            kind=field,
            L=L if L is not None else DEFAULT_L[field],
            mode=mode,
            gamma=gamma,
            S=S if S is not None else width,
            scheme=scheme,
            plan=plan,
        )
        schedule = Schedule(lr=lr, warmup=warmup, decay=decay, total=steps or DEFAULT_STEPS, ema=ema)
    except ValueError as error:
        raise SettingsError(str(error), "see 'efm train --help'") from error
    return RunSettings(
        source=source,
        target=target,
        source_name=source_name,
        target_name=target_name,
        prep=Preprocessing(size=size, resize=resize, hflip=hflip),
        field=spec,
        schedule=schedule,
        network=network,
        charges=charges,
        points=points,
        seed=seed,
        precision=precision,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        sample_every=sample_every,
        latent=latent,
    )


def with_steps(settings: RunSettings, steps: int) -> RunSettings:
    """The settings of a run whose schedule now ends at `steps`: the cosine decay is stretched (or shrunk) to
    the new length, so the steps added to a resumed run are not all spent at the floor learning rate."""
    return replace(settings, schedule=replace(settings.schedule, total=steps))


@dataclass
class Budget:
    """When this session stops: at step `steps` (never past the schedule's end, which is the default), or after
    `minutes` of wall time, whichever comes first."""

    steps: int | None = None
    minutes: float | None = None


@dataclass
class Summary:
    """What `fit` reports at the end (also `efm train --json`)."""

    run: str
    model: str
    step: int
    skipped: int
    loss: float | None
    seconds: float
    steps_per_s: float
    stopped: str
    source_images: int
    target_images: int
    ignored: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Progress:
    """One logging step, as written to metrics.jsonl."""

    step: int
    total: int | None
    loss: float
    smoothed: float
    grad_norm: float
    lr: float
    skipped: int
    steps_per_s: float
    elapsed_s: float


def write_settings(run: Path, settings: RunSettings) -> None:
    write_json(run / "config.json", {"format": RUN_FORMAT, "efm_version": __version__, "settings": settings.to_json()})


def read_settings(run: Path) -> RunSettings:
    """The settings of an existing run folder (for `--resume`)."""
    try:
        document = json.loads((run / "config.json").read_text(encoding="utf-8"))
        if document.get("format") != RUN_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, not {RUN_FORMAT!r}")
        return RunSettings.from_json(document["settings"])
    except FileNotFoundError as error:
        raise RunError(
            f"{run} is not a training run (no config.json)", "pass the folder that efm train wrote"
        ) from error
    except (ValueError, TypeError, KeyError) as error:
        raise RunError(f"{run / 'config.json'} is not a valid run config ({error})") from error


def open_folder(name: str, prep: Preprocessing) -> ImageFolder | None:
    if name == NOISE:
        return None
    try:
        return ImageFolder(Path(name), prep)
    except DataError as error:
        raise RunError(str(error), "check the --source and --target folders") from error


class _Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, rows: Tensor) -> Tensor:
        """Every rank's rows of a batch, in rank order: the global batch."""
        if self.world == 1:
            return rows
        import torch.distributed as dist

        parts = [torch.empty_like(rows) for _ in range(self.world)]
        dist.all_gather(parts, rows.contiguous())
        return torch.cat(parts)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on one (so that all stop together)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _capacitor_config(
    settings: RunSettings,
    network: dict[str, Any],
    trainer: Trainer,
    counts: tuple[int, int],
    seconds: float,
    latent: dict[str, Any] | None = None,
) -> dict:
    return new_config(
        latent=latent,
        source=settings.source_name,
        target=settings.target_name,
        network=network,
        field=settings.field.to_config(),
        size=settings.prep.size,
        preprocessing={"resize": settings.prep.resize, "hflip": settings.prep.hflip},
        sampler={"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3},
        training={
            "steps": trainer.step,
            "skipped_steps": trainer.skipped,
            "source_images": counts[0],
            "target_images": counts[1],
            "charges_per_plate": settings.charges,
            "points_per_step": settings.points,
            "lr": settings.schedule.lr,
            "seed": settings.seed,
            "seconds": round(seconds, 1),
            "efm_version": __version__,
        },
    )


def grid(rows: list[Tensor]) -> np.ndarray:
    """Rows of image batches [n, 3, s, s] in [−1, 1] (n may differ between rows) as one uint8 picture with 2-pixel
    gaps, on white."""
    n, s = max(len(images) for images in rows), rows[0].shape[-1]
    gap = 2
    canvas = torch.ones(3, len(rows) * (s + gap) - gap, n * (s + gap) - gap)
    for r, images in enumerate(rows):
        for c, image in enumerate(images.clamp(-1, 1)):
            canvas[:, r * (s + gap) : r * (s + gap) + s, c * (s + gap) : c * (s + gap) + s] = image
    return ((canvas + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def plot_loss(path: Path, steps: list[int], losses: list[float], smoothed: list[float]) -> None:
    """A plain line chart of the loss (raw in grey, smoothed in blue), drawn with PIL to avoid a plotting library."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    finite = [v for v in losses + smoothed if math.isfinite(v)]
    if len(steps) >= 2 and finite:
        low, high = min(finite), max(finite)
        high = high if high > low else low + 1.0
        first, last = steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1

        def point(step: int, value: float) -> tuple[float, float]:
            x = margin + (step - first) / (last - first) * (width - 2 * margin)
            y = height - margin - (value - low) / (high - low) * (height - 2 * margin)
            return x, y

        for series, colour in ((losses, (190, 190, 190)), (smoothed, (31, 119, 180))):
            line = [point(s, v) for s, v in zip(steps, series, strict=True) if math.isfinite(v)]
            if len(line) >= 2:
                draw.line(line, fill=colour, width=2)
        draw.text((margin, height - margin + 8), f"step {first}", fill="black")
        draw.text((width - margin - 80, height - margin + 8), f"step {steps[-1]}", fill="black")
        draw.text((4, margin - 14), f"{high:.4g}", fill="black")
        draw.text((4, height - margin - 4), f"{low:.4g}", fill="black")
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    draw.text((margin, 16), "training loss (grey: per log step, blue: smoothed)", fill="black")
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


class _Metrics:
    """metrics.jsonl, cut back to the resumed step so that a resumed run's log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int, write: bool) -> None:
        self.path, self.write = path, write
        self.records: list[dict[str, Any]] = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a kill
                if isinstance(record, dict) and record.get("step", math.inf) <= resume_step:
                    self.records.append(record)
        if write:
            with atomic_path(path) as temporary:
                temporary.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.write:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    @property
    def smoothed(self) -> float | None:
        return self.records[-1]["smoothed"] if self.records else None

    def plot(self, path: Path) -> None:
        if self.write:
            steps = [r["step"] for r in self.records]
            plot_loss(path, steps, [r["loss"] for r in self.records], [r["smoothed"] for r in self.records])


def fit(
    settings: RunSettings,
    run: Path,
    *,
    budget: Budget,
    resume: bool = False,
    device: str = "auto",
    workers: int | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> Summary:
    """Train (or continue) the run in `run` until the budget or the schedule ends; export RUN/model.

    A resumed run takes `settings` as they are now (its schedule's length may have changed, see `with_steps`) and
    stores them back in RUN/config.json. `on_progress` gets every logging step and `warn` what the user should know
    about (a resume without checkpoint, a stop request).
    """
    # Adam's second moments and late gradients reach subnormal floats, which x86 CPUs process many times slower.
    torch.set_flush_denormal(True)
    if budget.steps is None and settings.schedule.total is None:
        raise SettingsError("this run would never end", "give the schedule a total or the budget a number of steps")
    dist = _Distributed(devices.choose(device))
    try:
        return _fit(settings, run, dist, budget, resume, workers, on_progress, warn)
    finally:
        dist.close()


def _fit(
    settings: RunSettings,
    run: Path,
    dist: _Distributed,
    budget: Budget,
    resume: bool,
    workers: int | None,
    on_progress: Callable[[Progress], None] | None,
    warn: Callable[[str], None],
) -> Summary:
    started = time.monotonic()
    device = dist.device
    prep = settings.prep
    source_data, target_data = open_folder(settings.source, prep), open_folder(settings.target, prep)
    if source_data is None and target_data is None:
        raise RunError("both plates are noise", "give at least one image folder")
    space = _Space(settings, run, resume, device)
    if space.autoencoder is not None:
        source_data, target_data = space.encode(source_data, target_data)
    shape = space.shape
    streams = (
        BatchStream(source_data, settings.charges, settings.seed * 2, shape=shape),
        BatchStream(target_data, settings.charges, settings.seed * 2 + 1, shape=shape),
    )
    counts = (len(source_data) if source_data else 0, len(target_data) if target_data else 0)
    network_config = preset(settings.network, channels=shape[0], size=shape[1], L=settings.field.L).to_dict()
    torch.manual_seed(settings.seed)
    network = build(network_config).to(device)
    model: nn.Module = network
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(network, device_ids=[device] if device.type == "cuda" else None)
    share = Share(dist.rank, dist.world)
    trainer = Trainer(
        network,
        settings.field,
        settings.schedule,
        points=settings.points,
        seed=settings.seed,
        precision=settings.precision,
        model=model,
        share=share,
    )
    checkpoints = run / "checkpoints"
    if resume:
        found = checkpoint.latest(checkpoints)
        if found is not None:
            tensors, meta = checkpoint.load(found)
            trainer.load_state(tensors, meta)
            started -= float(meta.get("elapsed_s", 0.0))
        else:
            warn(f"{checkpoints} holds no checkpoint: the run starts again from step 0")
    total = settings.schedule.total
    if total is not None and trainer.step > total:
        raise SettingsError(
            f"{run} is already at step {trainer.step}, past the {total} steps asked for",
            f"resume with --steps above {trainer.step}, or without --steps",
        )
    if resume and dist.main:
        before = read_settings(run).schedule.total
        if before != total:
            warn(f"the schedule now ends at step {total} (was {before}): the learning rate follows the new length")
    end = min(step for step in (budget.steps, total) if step is not None)
    if dist.main:
        write_settings(run, settings)
    metrics = _Metrics(run / "metrics.jsonl", trainer.step, dist.main)
    smoothed = metrics.smoothed
    elapsed_before = time.monotonic() - started
    session_start = time.monotonic()
    session_steps = 0
    fixed = _sample_inputs(streams[0], settings.samples)
    sampler_net = build(network_config).to(device)

    def save_everything() -> None:
        if not dist.main:
            return
        from safetensors import SafetensorError

        elapsed = elapsed_before + time.monotonic() - session_start
        tensors, meta = trainer.state()
        try:
            checkpoint.save(checkpoints, trainer.step, tensors, {**meta, "elapsed_s": elapsed})
            metrics.plot(run / "loss.png")
            _export(settings, trainer, sampler_net, counts, elapsed, run, space)
        except (OSError, SafetensorError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise RunError(
                f"cannot save step {trainer.step} in {run} ({reason})",
                f"free some disk space, then continue from the last checkpoint with: efm train --resume {run}",
            ) from error

    window: list[tuple[float, float]] = []
    stopped = "steps"
    last_saved = trainer.step
    data = batches(
        *streams,
        start=trainer.step,
        rows=share.rows(settings.charges),
        workers=_workers(workers, source_data, target_data),
    )
    with StopOnSignal(warn) as interrupt:
        while trainer.step < end:
            out_of_time = budget.minutes is not None and time.monotonic() - session_start >= budget.minutes * 60
            if dist.any(out_of_time or interrupt.requested):
                stopped = "interrupted" if interrupt.requested else "time"
                break
            source_rows, target_rows = next(data)
            source = dist.gather(source_rows.to(device, non_blocking=True))
            target = dist.gather(target_rows.to(device, non_blocking=True))
            stats = trainer.step_on(source, target)
            session_steps += 1
            if stats.applied:
                window.append((stats.loss, stats.grad_norm))
            if trainer.step % settings.log_every == 0:
                loss = float(np.mean([w[0] for w in window])) if window else math.nan
                grad = float(np.mean([w[1] for w in window])) if window else math.nan
                window.clear()
                if math.isfinite(loss):
                    smoothed = loss if smoothed is None else 0.9 * smoothed + 0.1 * loss
                rate = session_steps / max(time.monotonic() - session_start, 1e-9)
                record = Progress(
                    step=trainer.step,
                    total=total,
                    loss=loss,
                    smoothed=smoothed if smoothed is not None else math.nan,
                    grad_norm=grad,
                    lr=stats.lr,
                    skipped=trainer.skipped,
                    steps_per_s=rate,
                    elapsed_s=elapsed_before + time.monotonic() - session_start,
                )
                metrics.append(asdict(record))
                if on_progress is not None and dist.main:
                    on_progress(record)
            if trainer.step % settings.sample_every == 0 and dist.main:
                _write_samples(run, trainer, sampler_net, fixed, settings, space)
            if trainer.step % settings.checkpoint_every == 0:
                save_everything()
                last_saved = trainer.step
    if trainer.step != last_saved or not (run / "model").is_dir():
        if dist.main:
            _write_samples(run, trainer, sampler_net, fixed, settings, space)
        save_everything()
    if stopped == "interrupted":
        raise KeyboardInterrupt
    seconds = time.monotonic() - session_start
    return Summary(
        run=str(run),
        model=str(run / "model"),
        step=trainer.step,
        skipped=trainer.skipped,
        loss=metrics.smoothed,
        seconds=round(seconds, 2),
        steps_per_s=round(session_steps / max(seconds, 1e-9), 3),
        stopped=stopped,
        source_images=counts[0],
        target_images=counts[1],
        ignored=[{"path": str(p), "reason": r} for data in (source_data, target_data) if data for p, r in data.skipped],
    )


class StopOnSignal:
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after the current step, so that the checkpoint it then
    writes is a step boundary; a second one interrupts at once, leaving the previous checkpoint as it was."""

    def __init__(self, warn: Callable[[str], None]) -> None:
        self.warn = warn
        self.requested = False
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.warn("stopping after this step (press Ctrl-C again to stop at once, without saving)")

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _workers(requested: int | None, *folders: ImageFolder | LatentFolder | None) -> int:
    """Decoding processes: none when every folder is held in memory, else what was asked (default 2)."""
    streaming = any(f is not None and f.streaming for f in folders)
    if requested is not None:
        return requested
    return 2 if streaming else 0


def _sample_inputs(stream: BatchStream, count: int) -> Tensor:
    """The same few source charges for every sample grid of a run: the first images, or seeded noise."""
    if stream.data is None:
        return _noise_samples(stream, count)
    index = torch.arange(min(count, len(stream.data)))
    return stream.data.get(index)


def _noise_samples(stream: BatchStream, count: int) -> Tensor:
    gen = torch.Generator().manual_seed(stream.seed + 12345)
    return torch.randn(count, *stream.shape, generator=gen)


@torch.no_grad()
def _write_samples(
    run: Path, trainer: Trainer, net: nn.Module, fixed: Tensor, settings: RunSettings, space: _Space
) -> None:
    """samples/step-XXXXXXXX.png: the fixed sources above their translations along the EMA field (Euler)."""
    ema = trainer.ema_network(net)
    device = next(ema.parameters()).device
    spec = settings.field
    solution = integrate(
        ema, fixed.to(device), spec.eps, spec.L - spec.eps, solver="euler", steps=settings.sample_steps
    )
    pictures = [space.decode(points.to(device)) for points in (fixed, solution.x.float())]
    save_atomic(run / "samples" / f"step-{trainer.step:08d}.png", grid(pictures))


def _export(
    settings: RunSettings,
    trainer: Trainer,
    net: nn.Module,
    counts: tuple[int, int],
    seconds: float,
    run: Path,
    space: _Space,
) -> None:
    """RUN/model: the capacitor with the EMA weights (and a latent one's autoencoder), and the newest sample grid."""
    config = _capacitor_config(settings, net.config.to_dict(), trainer, counts, seconds, space.latent_config())
    model = run / "model"
    Capacitor(config, network=trainer.ema_network(net), autoencoder=space.autoencoder).save_pretrained(model)
    grids = sorted((run / "samples").glob("step-*.png"))
    if grids:
        with atomic_path(model / SAMPLE_NAME) as temporary:
            shutil.copyfile(grids[-1], temporary)


class _Space:
    """Where a run's charges live: pixels, or a latent capacitor's normalised latent codes.

    A latent run copies its autoencoder into RUN/autoencoder when it starts and reads only that copy afterwards, so
    the run does not depend on the folder it was given; it encodes every image once per session (and the mirrored
    image when the plate flips), and measures the per-channel statistics on the unmirrored codes of both plates.
    """

    def __init__(self, settings: RunSettings, run: Path, resume: bool, device: torch.device) -> None:
        self.settings, self.device = settings, device
        size = settings.prep.size
        self.shape: tuple[int, int, int] = (3, size, size)
        self.autoencoder: Autoencoder | None = None
        self.scale: LatentScale | None = None
        if settings.latent is None:
            return
        copy = run / AUTOENCODER_DIR
        if not (resume and (copy / CONFIG_NAME).is_file()):
            Autoencoder.from_folder(settings.latent).save(copy)
        self.autoencoder = Autoencoder.from_folder(copy, device=device)
        self.shape = self.autoencoder.latent_shape(size)

    @torch.no_grad()
    def encode(self, *plates: ImageFolder | None) -> list[LatentFolder | None]:
        """The normalised codes of each plate's images (a noise plate, None, stays noise)."""
        assert self.autoencoder is not None
        model, device = self.autoencoder, self.device
        encoded = [
            LatentFolder(plate, lambda images: model.encode(images.to(device))) if plate is not None else None
            for plate in plates
        ]
        self.scale = LatentScale.measure(torch.cat([codes.codes for codes in encoded if codes is not None]))
        for codes in encoded:
            if codes is not None:
                codes.normalise(self.scale.normalise)
        return encoded

    @torch.no_grad()
    def decode(self, points: Tensor) -> Tensor:
        """Pictures in [−1, 1] of points of this space (for sample grids)."""
        if self.autoencoder is None or self.scale is None:
            return points.cpu()
        scale = self.scale.to(points.device)
        return self.autoencoder.decode(scale.restore(points)).float().cpu()

    def latent_config(self) -> dict[str, Any] | None:
        """The capacitor config's `latent` section, or None for a pixel capacitor."""
        if self.autoencoder is None or self.scale is None:
            return None
        channels, _, _ = self.shape
        origin = self.settings.latent or ""
        return {
            "kind": self.autoencoder.kind,
            "factor": self.autoencoder.factor,
            "channels": channels,
            **self.scale.to_config(),
            "origin": origin[-300:],
        }
