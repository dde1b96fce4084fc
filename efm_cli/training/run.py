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
    domain_name_ok,
    new_config,
    size_ok,
)
from efm_cli.capacitor.model import Capacitor
from efm_cli.devices import Precision
from efm_cli.errors import EfmError, UsageError
from efm_cli.files import atomic_path, read_document, write_json
from efm_cli.images import find_images, save_atomic
from efm_cli.integrator import integrate
from efm_cli.network import build, preset
from efm_cli.training import checkpoint
from efm_cli.training.data import (
    MIRROR_LIMIT,
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
    fitting_size,
    median_shorter_side,
    mirror_asymmetry,
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
class Sizing:
    """How a run's schedule was fitted to a time budget (`efm train --max-minutes M` without `--steps`).

    `fit` measures its own speed over the first steps, then sets the schedule's total (and, unless `--warmup` was
    given, a proportional warm-up) so that warm-up and cosine decay end inside the budget; `rate` is what it measured
    (None until it has), and `proportional_warmup` whether the warm-up follows the total.
    """

    minutes: float
    rate: float | None = None
    proportional_warmup: bool = True


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
    sizing: Sizing | None = None
    """Set when the schedule's length comes from a time budget rather than from `--steps`."""
    mirror: dict[str, float | None] | None = None
    """Each plate's `mirror_asymmetry` when the flip default was chosen by measuring it (no --hflip/--no-hflip)."""

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
                "sizing": Sizing(**data["sizing"]) if data.get("sizing") else None,
            }
        )


DEFAULT_STEPS = 20000
"""Steps of a run when neither `--steps` nor `--max-minutes` says otherwise."""
WARMUP_SHARE = 0.1
"""The default warm-up as a share of the schedule: the embedded recipes warm up over 200 of about 2000 steps."""
MAX_WARMUP = 1000
"""The default warm-up never exceeds this many steps (long schedules need no longer one)."""
PROBE_SHARE, PROBE_SECONDS = 0.05, (5.0, 60.0)
"""A time-sized run measures its speed over this share of the budget (clamped to these seconds, and to a fifth of
the time left after reading the images and building the network) before sizing."""
RESERVE_SHARE, RESERVE_SECONDS = 0.08, 3.0
"""Time kept back at the end of a time-sized run for the last checkpoint, samples and export, whose sampler choice
may take up to 5 % of the run (`efm_cli.capacitor.sampler.at_export`)."""
REPLAN_UNTIL = 0.9
"""A time-sized schedule follows the measured speed until this share of it is done, then stays as it is."""


def default_warmup(steps: int) -> int:
    """The warm-up a schedule of `steps` gets when `--warmup` is not given."""
    return max(1, min(MAX_WARMUP, round(WARMUP_SHARE * steps)))


def planned_total(step: int, rate: float, seconds_left: float) -> int:
    """The last step of a schedule at `step` now that runs `rate` steps/s for `seconds_left` more seconds."""
    return step + max(1, math.floor(rate * max(seconds_left, 0.0)))


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
    size: int | None = None,
    resize: ResizeMode = "resize",
    hflip: bool | None = None,
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
    warmup: int | None = None,
    decay: Decay = "cosine",
    ema: float = 0.9999,
    precision: Precision = "fp32",
    seed: int = 0,
    steps: int | None = None,
    minutes: float | None = None,
    log_every: int = 10,
    checkpoint_every: int = 500,
    sample_every: int = 500,
    latent: str | None = None,
) -> RunSettings:
    """The settings of a new run between two folders, with efm's defaults, checked against each other.

    `source` may be a CycleGAN-style folder (trainA/, trainB/) when `target` is None, and either plate may be
    `noise`. An unset size fits the images (`fitting_size`); unset flips are on when both plates look
    mirror-symmetric (`mirror_asymmetry` below MIRROR_LIMIT); unset L, charges and tube width S take the defaults
    of the field kind; unset plate names come from the folders. `latent` (an autoencoder folder, `efm autoencoder`
    run or Hub repo) makes a latent capacitor.
    Without `steps`, `minutes` sizes the schedule to that much wall time (`Sizing`), else it has DEFAULT_STEPS;
    an unset warm-up is WARMUP_SHARE of the schedule. Every rule that `efm train` enforces is here, so that a Python
    caller gets the same ones.
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
    factor, channels = 1, 3
    if latent is not None:
        folder = autoencoder.locate(latent)
        factor, channels = autoencoder.shape_of(folder)
        latent = str(folder.resolve())
    if size is None:
        size = fitting_size([Path(f) for f in (source, target) if f != NOISE], SIZE_STEP * factor)
    if not size_ok(size):
        raise SettingsError(f"--size {size} is not {SIZE_RULE}", "use 32, 64, 128 or 256")
    mirror = None
    if hflip is None:
        plates = {name: folder for name, folder in (("source", source), ("target", target)) if folder != NOISE}
        mirror = {name: mirror_asymmetry(find_images(Path(folder)), resize) for name, folder in plates.items()}
        hflip = all(value is not None and value < MIRROR_LIMIT for value in mirror.values())
    width = default_tube_width(size)
    if latent is not None:
        if size % (SIZE_STEP * factor):
            raise SettingsError(
                f"--size {size} is not a multiple of {SIZE_STEP * factor}",
                f"the autoencoder makes images {factor}× smaller; the field network needs a multiple of {SIZE_STEP}",
            )
        width = LATENT_SPREAD * default_tube_width(size // factor, channels)
    charges = charges if charges is not None else DEFAULT_CHARGES[field]
    if charges < points:
        raise SettingsError(f"--charges {charges} is below --batch-size {points}", "points lie between charges")
    names = domain_names(source, target, root)
    source_name, target_name = source_name or names[0], target_name or names[1]
    for name, flag in ((source_name, "--source-name"), (target_name, "--target-name")):
        if not domain_name_ok(name):
            raise SettingsError(
                f"the plate name {name!r} cannot name a capacitor's plate (1–64 printable characters, no / or \\)",
                f"name it with {flag}",
            )
    if source_name == target_name:
        raise SettingsError(
            f"both plates would be called {source_name!r}", "name them with --source-name and --target-name"
        )
    try:
        preset(network, channels=channels, size=size // factor, L=L if L is not None else DEFAULT_L[field])
    except ValueError as error:
        raise SettingsError(str(error).partition("; give")[0], "use a smaller --size or --network base") from error
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
        sizing = Sizing(minutes, proportional_warmup=warmup is None) if steps is None and minutes else None
        total = None if sizing is not None else steps or DEFAULT_STEPS
        # A time-sized run warms up over MAX_WARMUP provisional steps while it measures its speed (a small rate).
        start_warmup = warmup if warmup is not None else default_warmup(total) if total else MAX_WARMUP
        schedule = Schedule(lr=lr, warmup=start_warmup, decay=decay, total=total, ema=ema)
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
        sizing=sizing,
        mirror=mirror,
    )


def with_minutes(settings: RunSettings, minutes: float) -> RunSettings:
    """The settings of a resumed time-sized run whose schedule is to end within `minutes` of this session: `fit`
    measures the speed again and stretches (or shrinks) the cosine from the current step, as `with_steps` does."""
    if settings.sizing is None:
        return settings
    return replace(settings, sizing=replace(settings.sizing, minutes=minutes, rate=None))


def with_steps(settings: RunSettings, steps: int) -> RunSettings:
    """The settings of a run whose schedule now ends at `steps`: the cosine decay is stretched (or shrunk) to
    the new length, so the steps added to a resumed run are not all spent at the floor learning rate. The length is
    then the user's: a time budget no longer sizes it."""
    return replace(settings, schedule=replace(settings.schedule, total=steps), sizing=None)


@dataclass
class Budget:
    """When this session stops: at step `steps` (never past the schedule's end, which is the default), or after
    `minutes` of wall time from the call to `fit` (reading the images included), whichever comes first."""

    steps: int | None = None
    minutes: float | None = None
    started: float | None = None
    """The `time.monotonic()` the minutes count from: the command's start for `efm train`, else the call to `fit`."""


@dataclass
class Summary:
    """What `fit` reports at the end (also `efm train --json`)."""

    run: str
    model: str
    step: int
    total: int | None
    skipped: int
    loss: float | None
    lr: float | None
    seconds: float
    steps_per_s: float
    stopped: str
    source_images: int
    target_images: int
    samples: str | None
    sizing: dict[str, Any] | None
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
        document = read_document(run / "config.json", RUN_FORMAT)
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

    def from_main(self, values: list[int]) -> list[int]:
        """Rank 0's `values` on every rank (the others' are ignored), so that all follow one plan."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        shared = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.broadcast(shared, src=0)
        return [int(v) for v in shared.tolist()]

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
    say: Callable[[str], None] = lambda message: None,
) -> Summary:
    """Train (or continue) the run in `run` until the budget or the schedule ends; export RUN/model.

    A resumed run takes `settings` as they are now (its schedule's length may have changed, see `with_steps` and
    `with_minutes`) and stores them back in RUN/config.json; it must have a checkpoint at or before the schedule's
    end. A time-sized run (`settings.sizing` not yet measured) fits its schedule to `budget.minutes` (else to the
    minutes it was sized to). `on_progress` gets every logging step and the last one, `warn` what the user should
    know about (settings that waste the run, data too small for it, nothing left to train, a stop request) and
    `say` how the schedule was sized.
    """
    clock = budget.started if budget.started is not None else time.monotonic()
    # Adam's second moments and late gradients reach subnormal floats, which x86 CPUs process many times slower.
    torch.set_flush_denormal(True)
    sizing = settings.sizing if settings.sizing is not None and settings.sizing.rate is None else None
    minutes = budget.minutes if budget.minutes is not None or sizing is None else sizing.minutes
    if budget.steps is None and settings.schedule.total is None and sizing is None:
        raise SettingsError("this run would never end", "give the schedule a total or the budget a number of steps")
    state = _resume_state(settings, run) if resume else None
    dist = _Distributed(devices.choose(device))
    deadline = clock + 60 * minutes if minutes is not None else None
    try:
        return _fit(settings, run, dist, budget.steps, deadline, state, workers, on_progress, warn, say)
    finally:
        dist.close()


class _Sizer:
    """Fits a time-sized schedule to the deadline from the speed this session measures (checkpoints and sample grids
    included): first after a probe of PROBE_SHARE of the budget, then at every step until REPLAN_UNTIL of the
    schedule is done, whenever the planned end moves by more than 1 %, so a machine that slows down or speeds up
    still ends its cosine decay in time."""

    def __init__(self, settings: RunSettings, deadline: float, step: int) -> None:
        budget = max(deadline - time.monotonic(), 0.0)
        self.probe = min(max(PROBE_SHARE * budget, PROBE_SECONDS[0]), PROBE_SECONDS[1], budget / 5)
        self.reserve = max(RESERVE_SECONDS, RESERVE_SHARE * budget)
        self.deadline, self.fresh = deadline, step == 0
        self.sizing, self.schedule = settings.sizing, settings.schedule
        self.start: tuple[int, float] | None = None
        self.saving = 0.0
        """Seconds the slowest checkpoint-and-export took, kept back for the last one."""

    def update(self, step: int, now: float) -> Schedule | None:
        """The new schedule when this step changes it, else None."""
        if self.start is None:  # the session's first step allocates and warms caches: not part of the speed
            self.start = (step, now)
            return None
        steps, seconds = step - self.start[0], now - self.start[1]
        sized = self.sizing.rate is not None
        if (not sized and (seconds < self.probe or steps < 2)) or (
            sized and step >= REPLAN_UNTIL * (self.schedule.total or 0)
        ):
            return None
        rate = steps / seconds
        total = planned_total(step, rate, self.deadline - now - self.reserve - self.saving)
        if sized and abs(total - (self.schedule.total or 0)) <= 0.01 * total:
            return None
        warmup = self.schedule.warmup
        if not sized and self.fresh and self.sizing.proportional_warmup:
            warmup = default_warmup(total)
        self.schedule = replace(self.schedule, total=total, warmup=warmup)
        self.sizing = replace(self.sizing, rate=round(rate, 4))
        return self.schedule


def _resume_state(settings: RunSettings, run: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """The latest checkpoint's tensors and trainer state, read before any image is: a run that cannot continue as
    asked stops at once, with nothing rewritten."""
    tensors, meta = checkpoint.load(checkpoint.resume_point(run / "checkpoints", "efm train"))
    step, total = int(meta["step"]), settings.schedule.total
    if total is not None and step > total:
        raise SettingsError(
            f"{run} is already at step {step}, past the {total} steps asked for",
            f"resume with --steps above {step}, or without --steps",
        )
    return tensors, meta


def _settings_warnings(settings: RunSettings) -> list[str]:
    """Settings that are allowed but waste the run."""
    schedule = settings.schedule
    if schedule.total is not None and schedule.warmup >= schedule.total:
        return [
            f"--warmup {schedule.warmup} is not below --steps {schedule.total}: the whole run is spent warming up "
            "the learning rate (lower --warmup)"
        ]
    return []


SMALL_PLATE = 100
"""A plate with fewer images than this is memorised rather than learnt as a domain (and evaluated on nothing)."""
SMALL_IMAGES = 0.5
"""Images whose median shorter side is below this fraction of --size are blown up into blurred charges."""


def _data_warnings(settings: RunSettings, name: str, plate: ImageFolder | None) -> list[str]:
    """What is wrong with one plate's images for this run, though training can go on."""
    if plate is None:
        return []
    found, size = [], settings.prep.size
    if len(plate) < SMALL_PLATE:
        found.append(
            f"plate {name!r} has only {len(plate)} images: with fewer than {SMALL_PLATE} the field learns these "
            "pictures rather than their domain"
        )
    if settings.charges > len(plate):
        found.append(
            f"--charges {settings.charges} exceeds the {len(plate)} images of plate {name!r}: every step holds "
            "some of them twice"
        )
    side = median_shorter_side(plate.paths)
    if side is not None and side < SMALL_IMAGES * size:
        found.append(
            f"the images of plate {name!r} are small for --size {size} (median shorter side {side} px): they are "
            f"enlarged more than {1 / SMALL_IMAGES:g}×, so the capacitor learns blurred pictures"
        )
    return found


def _fit(
    settings: RunSettings,
    run: Path,
    dist: _Distributed,
    max_steps: int | None,
    deadline: float | None,
    state: tuple[dict[str, dict[str, Tensor]], dict[str, Any]] | None,
    workers: int | None,
    on_progress: Callable[[Progress], None] | None,
    warn: Callable[[str], None],
    say: Callable[[str], None],
) -> Summary:
    started = time.monotonic()
    device = dist.device
    prep = settings.prep
    resume = state is not None
    source_data, target_data = open_folder(settings.source, prep), open_folder(settings.target, prep)
    if source_data is None and target_data is None:
        raise RunError("both plates are noise", "give at least one image folder")
    if dist.main:
        for message in [
            *_settings_warnings(settings),
            *_data_warnings(settings, settings.source_name, source_data),
            *_data_warnings(settings, settings.target_name, target_data),
        ]:
            warn(message)
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
    if state is not None:
        tensors, meta = state
        trainer.load_state(tensors, meta)
        started -= float(meta.get("elapsed_s", 0.0))
    total = settings.schedule.total
    sizer = (
        _Sizer(settings, deadline, trainer.step)
        if deadline is not None and settings.sizing is not None and settings.sizing.rate is None
        else None
    )

    def last_step() -> int | float:
        """Where this session ends; a schedule about to be sized (again) does not end it before it is."""
        planned = None if sizer is not None and sizer.sizing.rate is None else total
        return min((step for step in (max_steps, planned) if step is not None), default=math.inf)

    end = last_step()
    if resume and dist.main:
        before = read_settings(run).schedule.total
        if total is not None and before != total and sizer is None:
            warn(f"the schedule now ends at step {total} (was {before}): the learning rate follows the new length")
        if trainer.step >= end:
            warn(f"{run} is already at step {trainer.step}: nothing to train (resume with --steps above it)")
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
            write_settings(run, settings)
            checkpoint.save(checkpoints, trainer.step, tensors, {**meta, "elapsed_s": elapsed})
            metrics.plot(run / "loss.png")
            _export(settings, trainer, sampler_net, counts, elapsed, run, space, fixed)
        except (OSError, SafetensorError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise RunError(
                f"cannot save step {trainer.step} in {run} ({reason})",
                f"free some disk space, then continue from the last checkpoint with: efm train --resume {run}",
            ) from error

    window: list[tuple[float, float]] = []
    stopped = "steps"
    last_saved = last_logged = trainer.step

    def log(lr: float) -> None:
        """One metrics line for the steps since the previous one (their mean loss and gradient norm)."""
        nonlocal smoothed, last_logged
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
            lr=lr,
            skipped=trainer.skipped,
            steps_per_s=rate,
            elapsed_s=elapsed_before + time.monotonic() - session_start,
        )
        metrics.append(asdict(record))
        last_logged = trainer.step
        if on_progress is not None and dist.main:
            on_progress(record)

    lr = math.nan
    data = batches(
        *streams,
        start=trainer.step,
        rows=share.rows(settings.charges),
        workers=_workers(workers, source_data, target_data),
    )
    with StopOnSignal(warn) as interrupt:
        while trainer.step < end:
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if dist.any(out_of_time or interrupt.requested):
                stopped = "interrupted" if interrupt.requested else "time"
                break
            source_rows, target_rows = next(data)
            source = dist.gather(source_rows.to(device, non_blocking=True))
            target = dist.gather(target_rows.to(device, non_blocking=True))
            stats = trainer.step_on(source, target)
            session_steps += 1
            lr = stats.lr
            if stats.applied:
                window.append((stats.loss, stats.grad_norm))
            if sizer is not None:
                # The main process plans from its clock and every process follows that plan.
                planned = sizer.update(trainer.step, time.monotonic())
                if dist.any(dist.main and planned is not None):
                    first = settings.sizing is not None and settings.sizing.rate is None
                    plan = [planned.total or 0, planned.warmup] if planned is not None else [0, 0]
                    steps, warmup = dist.from_main(plan)
                    schedule = replace(settings.schedule, total=steps, warmup=warmup)
                    settings = replace(settings, schedule=schedule, sizing=sizer.sizing)
                    trainer.schedule, total = schedule, steps
                    end = last_step()
                    if first and dist.main:
                        write_settings(run, settings)
                        say(_sized_message(settings, trainer.step))
            if trainer.step % settings.log_every == 0:
                log(lr)
            if trainer.step % settings.sample_every == 0 and dist.main:
                _write_samples(run, trainer, sampler_net, fixed, settings, space)
            if trainer.step % settings.checkpoint_every == 0:
                saving = time.monotonic()
                save_everything()
                last_saved = trainer.step
                if sizer is not None:
                    sizer.saving = max(sizer.saving, time.monotonic() - saving)
    if trainer.step != last_logged:  # a session that ends between logging steps still logs where it ended
        log(lr)
    if trainer.step != last_saved or not (run / "model").is_dir():
        if dist.main:
            _write_samples(run, trainer, sampler_net, fixed, settings, space)
        save_everything()
    if stopped == "interrupted":
        raise KeyboardInterrupt
    seconds = time.monotonic() - session_start
    grids = sorted((run / "samples").glob("step-*.png"))
    return Summary(
        run=str(run),
        model=str(run / "model"),
        step=trainer.step,
        total=total,
        skipped=trainer.skipped,
        loss=metrics.smoothed,
        lr=lr if math.isfinite(lr) else None,
        seconds=round(seconds, 2),
        steps_per_s=round(session_steps / max(seconds, 1e-9), 3),
        stopped=stopped,
        source_images=counts[0],
        target_images=counts[1],
        samples=str(grids[-1]) if grids else None,
        sizing=asdict(settings.sizing) if settings.sizing is not None else None,
        ignored=[{"path": str(p), "reason": r} for data in (source_data, target_data) if data for p, r in data.skipped],
    )


def flips_message(settings: RunSettings) -> str | None:
    """What the flip default decided and why; None when --hflip/--no-hflip decided."""
    if settings.mirror is None:
        return None
    names = {"source": settings.source_name, "target": settings.target_name}
    measured = ", ".join(
        f"{names[plate]} {value:.2f}" if value is not None else f"{names[plate]} unreadable"
        for plate, value in settings.mirror.items()
    )
    if settings.prep.hflip:
        return (
            f"random flips on: mirrored pictures look like the others (share farther once mirrored: {measured}; "
            "--no-hflip turns them off)"
        )
    return (
        f"random flips off: a mirrored picture is not like the others (share farther once mirrored: {measured}, "
        f"flips need all below {MIRROR_LIMIT:g}; --hflip turns them on)"
    )


def _sized_message(settings: RunSettings, step: int) -> str:
    schedule, sizing = settings.schedule, settings.sizing
    assert sizing is not None and sizing.rate is not None and schedule.total is not None
    warm = f"warm-up {schedule.warmup}" + (" (--warmup)" if not sizing.proportional_warmup else "")
    unit = "minute" if sizing.minutes == 1 else "minutes"
    message = (
        f"sized the schedule to {sizing.minutes:g} {unit}: {schedule.total} steps at {sizing.rate:.3g} steps/s "
        f"measured over the first {step}, {warm}, cosine to the end (--steps N sets the length instead)"
    )
    if schedule.warmup >= schedule.total:
        message += f"; the warm-up is not below the {schedule.total} steps, so the run never reaches its peak rate"
    return message


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
    inputs: Tensor | None = None,
) -> None:
    """RUN/model: the capacitor with the EMA weights (and a latent one's autoencoder), and the newest sample grid.

    At the end of the schedule, the default sampler is chosen by measurement on `inputs` (the sample grid's fixed
    sources) when that costs at most 5 % of the run's time: `efm_cli.capacitor.sampler.at_export`."""
    config = _capacitor_config(settings, net.config.to_dict(), trainer, counts, seconds, space.latent_config())
    model = run / "model"
    capacitor = Capacitor(config, network=trainer.ema_network(net), autoencoder=space.autoencoder)
    if inputs is not None and settings.schedule.total is not None and trainer.step >= settings.schedule.total:
        from efm_cli.capacitor.sampler import at_export

        at_export(capacitor, inputs.to(next(net.parameters()).device), seconds=seconds)
    capacitor.save_pretrained(model)
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
