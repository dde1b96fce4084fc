"""Few-step translation by reflow distillation: a student capacitor whose field lines are straight.

A trained capacitor's lines bend, so it needs 12–60 field evaluations (NFE) per image. Distillation pairs images
with where the teacher's own sampler carries them, then trains a copy of the teacher's network (the student) so
that its field points straight from each pair's start to its end, at the heights where Euler with 1, 2 or 4 steps
evaluates it. Along a straight line Euler's method is exact, so the student translates with 1, 2 or 4 Euler steps
(README, "Few-step translation").

The run folder:

    RUN/config.json          the settings (read back by --resume)
    RUN/pairs.safetensors    the teacher's pairs: integrated once, reused by --resume
    RUN/checkpoints/         the student's weights, EMA and optimizer (efm_cli.training.checkpoint)
    RUN/distill.json         everything measured (also `efm distill --json`)
    RUN/model/               the student capacitor: sampler euler with --nfe steps (4), a `distilled` record, and
                             sample.png (held-out inputs above the teacher's translations and the student's)

Heights: the integrator starts and ends a line just off the plates, at z0 = eps and z1 = L − eps
(`Capacitor.plates`), so a pair (a, b) is a at z0 and b at z1, and the straight line between them climbs
span = L − 2·eps. A field whose f_x/f_z is (b − a)/span there carries a to b in one Euler step, exactly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from efm_cli import __version__, devices
from efm_cli.capacitor.format import DISTILLED_NFE, Direction
from efm_cli.capacitor.model import Capacitor
from efm_cli.errors import EfmError, UsageError
from efm_cli.files import atomic_path, read_document, write_json
from efm_cli.training import checkpoint
from efm_cli.training.step import FieldSpec, Schedule, Trainer, _step_seed

RUN_FORMAT = "efm-distill-run"
PAIRS_FORMAT = "efm-distill-pairs"
PAIRS_NAME = "pairs.safetensors"
REPORT_NAME = "distill.json"
SETTINGS_NAME = "config.json"
MODEL_DIR = "model"

DEFAULT_STEPS = 1000
"""Steps when neither --steps nor --max-minutes says otherwise."""
HELD_OUT_SHARE = 0.1
"""Share of the pairs kept out of training to measure the student (at least one pair)."""
DEFAULT_NFE = max(DISTILLED_NFE)
"""Euler steps of the exported sampler unless --nfe says otherwise: the most that are measured. The held-out
endpoint error hides what a user sees: on the digits a student's mean error at 4 steps was only 5 % below its error
at 1, yet its FD was a third lower (0.18 against 0.28, README "Few-step translation")."""
TEACHER_BATCH = 16
"""Images the teacher integrates together while the pairs are made."""
SAMPLE_COUNT = 8
"""Held-out pairs shown in RUN/model/sample.png (the model card's picture)."""
PROBE_SHARE, PROBE_SECONDS = 0.05, (2.0, 30.0)
"""A time-sized run measures its speed over this share of the budget (clamped to these seconds, and to a fifth of
the budget) before it fixes its number of steps; as `efm train` does, with shorter bounds for shorter runs."""
RESERVE_SHARE, RESERVE_SECONDS = 0.1, 3.0
"""Time kept back at the end of a time-sized run for the checkpoint, the measurement and the export."""
MIN_TRAIN_SECONDS = 30.0
"""A time-sized run whose pairs leave less than this to train stops before training (its pairs are kept)."""
PAIRS_WARN_SHARE = 0.5
"""Warn when making the pairs is projected to take more than this share of --max-minutes."""
FORWARD, BACKWARD = 0, 1
"""How a pair was made: a source image carried forward, or a target image carried backward."""
HEIGHTS = ("euler", "uniform")
"""Where on each straight line the student is trained: only where Euler with 1, 2 or 4 steps evaluates it, in
either direction (the field elsewhere is never used by the exported sampler, and a network trained at every height
spends most of its fit there), or at every height, as reflow usually does."""
EULER_NODES = tuple(sorted({i / k for k in DISTILLED_NFE for i in range(k + 1)}))
"""The fractions of the way between the plates at which an Euler sampler with k in DISTILLED_NFE steps evaluates the
field: i/k for i < k going up, 1 − i/k = (k − i)/k going down, so every i/k from 0 to 1: 0, 1/4, 1/2, 3/4 and 1."""


class DistillError(EfmError):
    """A distillation that cannot run as asked; the message says why and the hint what to do."""


@dataclass(frozen=True)
class DistillSettings:
    """Everything that defines a distillation run; stored in RUN/config.json so that --resume needs no flags."""

    teacher: str
    """The teacher's reference as given: a folder, a Hub repo user/name[@rev] or an embedded name."""
    source: str | None = None
    """Source-plate images, carried forward by the teacher."""
    target: str | None = None
    """Target-plate images, carried backward by the teacher."""
    pairs: int | None = None
    """At most this many images in all (split evenly between the two folders when both are given); None: all."""
    steps: int | None = None
    """Training steps; None: DEFAULT_STEPS, or sized to `minutes` when that is set."""
    minutes: float | None = None
    """Wall-time budget of a session; without `steps` the schedule is sized to end in it."""
    lr: float = 1e-4
    warmup: int | None = None
    """Warm-up steps (default 10 % of the steps, at most 1000, as `efm train`)."""
    ema: float = 0.999
    batch_size: int = 16
    nfe: int | None = None
    """Euler steps of the exported sampler (1, 2 or 4); None: DEFAULT_NFE."""
    seed: int = 0
    heights: str = "euler"
    """Where the student is trained on each line: one of HEIGHTS."""
    dropout: float | None = 0.0
    """Dropout of the student's network while it trains; None: the teacher's. The teacher's dropout regularised a
    regression onto noisy minibatch fields; the student fits fixed pairs, and on the digits it fits them better
    without (README, "Few-step translation")."""

    def __post_init__(self) -> None:
        if self.source is None and self.target is None:
            raise UsageError("distillation needs images: give --source, --target or both")
        if self.nfe is not None and self.nfe not in DISTILLED_NFE:
            raise UsageError(f"--nfe must be one of {', '.join(map(str, DISTILLED_NFE))}, got {self.nfe}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UsageError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.heights not in HEIGHTS:
            raise UsageError(f"--heights must be one of {', '.join(HEIGHTS)}, got {self.heights!r}")
        if self.pairs is not None and self.pairs < 2:
            raise UsageError(f"--pairs must be at least 2 (one to train on, one to measure), got {self.pairs}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.batch_size < 1 or not 0 <= self.ema < 1:
            raise UsageError(f"invalid optimiser settings: lr={self.lr}, batch size={self.batch_size}, ema={self.ema}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DistillSettings:
        return cls(**{"heights": "uniform", "dropout": None, **data})  # as runs from before these settings trained


@dataclass
class Pairs:
    """Images a (at z0) and b (at z1) in the field's space [n, C, H, W], and how each pair was made [n]."""

    a: Tensor
    b: Tensor
    direction: Tensor
    info: dict[str, Any] = field(default_factory=dict)
    """How they were made: teacher, images per plate, dropped lines, skipped files."""

    def __len__(self) -> int:
        return len(self.a)

    def take(self, rows: Tensor) -> Pairs:
        return Pairs(self.a[rows], self.b[rows], self.direction[rows], self.info)

    def to(self, device: torch.device) -> Pairs:
        return Pairs(self.a.to(device), self.b.to(device), self.direction.to(device), self.info)


@dataclass
class Errors:
    """Held-out RMS endpoint errors against the teacher's endpoints, in 8-bit levels, of Euler with `steps` steps."""

    steps: int
    student_mean: float | None
    student_p95: float | None
    student_max: float | None
    teacher_mean: float | None
    teacher_p95: float | None
    teacher_max: float | None
    """None where no line landed."""
    failed: int
    """Held-out lines of the student that did not land (left out of its statistics)."""


@dataclass
class DistillSummary:
    """What `distill` reports (also `efm distill --json` and RUN/distill.json)."""

    run: str
    model: str
    teacher: str
    step: int
    total: int
    stopped: str
    seconds: float
    steps_per_s: float
    loss_start: float | None
    loss_end: float | None
    """Training time, speed and mean losses of this session, or, when it trained no step (a resume that only
    measures and exports), of the last session that did."""
    pairs: int
    train_pairs: int
    held_out: int
    forward_pairs: int
    backward_pairs: int
    dropped: int
    """Teacher lines that did not land: their images make no pair."""
    reused_pairs: bool
    nfe: int
    chosen_by: str
    errors: list[Errors]
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Unreadable images (this session only: a resumed run does not read them again)."""


# --- the straight line -----------------------------------------------------------------------------------------------


def straight_target(a: Tensor, b: Tensor, span: float) -> Tensor:
    """The field target [n, 1 + D] along the straight line from a (at z0) to b (at z0 + span): the unit vector of
    (span, b − a), scaled to √N as the teacher's targets are (`tube_target`, `coulomb_target`), so the student is
    regressed onto outputs of the size it already makes, and its f_x/f_z is (b − a)/span."""
    delta = (b - a).flatten(1)
    line = torch.cat([torch.full_like(delta[:, :1], span), delta], dim=1)
    return math.sqrt(line.shape[1]) * line / line.norm(dim=1, keepdim=True)


def line_points(a: Tensor, b: Tensor, t: Tensor, z0: float, z1: float) -> tuple[Tensor, Tensor]:
    """Heights z0 + t·(z1 − z0) [n] and the points (1 − t)·a + t·b on each pair's straight line."""
    shaped = t.view(-1, *([1] * (a.dim() - 1)))
    return z0 + t * (z1 - z0), a + shaped * (b - a)


class _Reflow(Trainer):
    """`Trainer` with the reflow loss: its optimiser, clipping, EMA, skipped non-finite steps, per-step reseeding
    and checkpoint state, over pairs instead of charge batches."""

    def __init__(
        self, network: nn.Module, spec: FieldSpec, schedule: Schedule, *, batch: int, seed: int, heights: str
    ) -> None:
        super().__init__(network, spec, schedule, points=batch, seed=seed)
        self.z0, self.z1 = spec.eps, spec.L - spec.eps
        self.heights = heights

    def loss(self, source: Tensor, target: Tensor) -> Tensor:
        """MSE of the network against the straight target at a random height of `points` random pairs (a, b)."""
        gen = torch.Generator(device=self.device).manual_seed(_step_seed(self.seed, self.step))
        rows = torch.randint(len(source), (self.points,), generator=gen, device=self.device)
        t = torch.rand(self.points, generator=gen, device=self.device, dtype=source.dtype)
        if self.heights == "euler":
            nodes = torch.tensor(EULER_NODES, device=self.device, dtype=source.dtype)
            t = nodes[(t * len(nodes)).long().clamp(max=len(nodes) - 1)]
        a, b = source[rows], target[rows]
        z, x = line_points(a, b, t, self.z0, self.z1)
        wanted = straight_target(a, b, self.z1 - self.z0)
        f_z, f_x = self.model(z, x)
        predicted = torch.cat([f_z.float()[:, None], f_x.float().flatten(1)], dim=1)
        return (predicted - wanted).square().mean()


# --- the run ---------------------------------------------------------------------------------------------------------


def distill(
    settings: DistillSettings,
    run: Path,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    started: float | None = None,
    on_progress: Callable[[int, int | None, float], None] | None = None,
    say: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: None,
) -> DistillSummary:
    """Distill `settings.teacher` into RUN/model; with `resume`, continue the run in `run` (its pairs and
    checkpoint). `started` is the `time.monotonic()` the minutes count from (default: now); `on_progress(step,
    total, loss)` follows training; `say` tells what happens, `warn` what the user should know."""
    clock = started if started is not None else time.monotonic()
    torch.set_flush_denormal(True)
    place = devices.choose(device) if isinstance(device, str) else device
    teacher = open_teacher(settings.teacher, place)
    deadline = clock + 60 * settings.minutes if settings.minutes is not None else None
    pairs, reused, skipped = _pairs_of_run(teacher, settings, run, say, warn, deadline)  # written once made
    write_json(run / SETTINGS_NAME, {"format": RUN_FORMAT, "efm_version": __version__, "settings": settings.to_json()})
    if deadline is not None and deadline - time.monotonic() < MIN_TRAIN_SECONDS:
        raise DistillError(
            f"making the pairs took the --max-minutes: {max(deadline - time.monotonic(), 0):.0f} s are left to train",
            f"they are saved; train on them with efm distill --resume {run} --max-minutes M",
        )
    train, held = split(pairs, settings.seed)
    trainer, total = _student(teacher, settings, run, place, resume)
    session = time.monotonic()
    done_before = trainer.step
    stopped, total, losses = _train(trainer, train.to(place), total, deadline, settings, on_progress, warn)
    _save_checkpoint(run, trainer, settings, total)
    seconds = time.monotonic() - session
    student = trainer.ema_network(copy.deepcopy(teacher.network))
    held = held.to(place)  # measured and drawn on the device the student runs on
    errors = measure(teacher, student, held, batch_size=max(settings.batch_size, TEACHER_BATCH))
    nfe, chosen_by = (settings.nfe, "--nfe") if settings.nfe is not None else (DEFAULT_NFE, "the default")
    model = export(teacher, student, run / MODEL_DIR, settings, nfe, errors, len(train), held, trainer.step)
    window = max(1, min(10, len(losses) // 2)) if losses else 1
    training = {
        "seconds": round(seconds, 2),
        "steps_per_s": round((trainer.step - done_before) / max(seconds, 1e-9), 3),
        "loss_start": _mean(losses[:window]),
        "loss_end": _mean(losses[-window:]),
    }
    if not losses:  # a session that only measured and exported keeps the record of the last one that trained
        training = _last_training(run) or training
    summary = DistillSummary(
        run=str(run),
        model=str(model),
        teacher=settings.teacher,
        step=trainer.step,
        total=total,
        stopped=stopped,
        **training,
        pairs=len(pairs),
        train_pairs=len(train),
        held_out=len(held),
        forward_pairs=int((pairs.direction == FORWARD).sum()),
        backward_pairs=int((pairs.direction == BACKWARD).sum()),
        dropped=int(pairs.info.get("dropped", 0)),
        reused_pairs=reused,
        nfe=nfe,
        chosen_by=chosen_by,
        errors=errors,
        skipped=skipped,
    )
    report = {"format": "efm-distill-report", "efm_version": __version__, **asdict(summary)}
    write_json(run / REPORT_NAME, {**report, "settings": settings.to_json(), "pair_info": pairs.info})
    return summary


def _last_training(run: Path) -> dict[str, Any] | None:
    """Time, speed and losses of the session that last trained this run, from RUN/distill.json (None if unknown)."""
    try:
        report = json.loads((run / REPORT_NAME).read_text(encoding="utf-8"))
        found = {key: report[key] for key in ("seconds", "steps_per_s", "loss_start", "loss_end")}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    numbers = all(value is None or type(value) in (int, float) for value in found.values())
    return found if numbers and found["loss_end"] is not None else None


def read_settings(run: Path) -> DistillSettings:
    """The settings of an existing distillation run folder (for --resume)."""
    try:
        document = read_document(run / SETTINGS_NAME, RUN_FORMAT)
        return DistillSettings.from_json(document["settings"])
    except FileNotFoundError as error:
        raise DistillError(
            f"{run} is not a distillation run (no {SETTINGS_NAME})", "check the --resume folder"
        ) from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DistillError(f"{run / SETTINGS_NAME} cannot be read ({error})", "check the --resume folder") from error


def open_teacher(ref: str, device: torch.device) -> Capacitor:
    """The teacher capacitor of a folder, run folder, Hub repo or short name, as `efm translate --model` opens it."""
    from efm_cli.translate import open_capacitor

    capacitor, _, _ = open_capacitor(model=ref, to=None, device=device)
    return capacitor


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return round(sum(finite) / len(finite), 6) if finite else None


# --- pairs -----------------------------------------------------------------------------------------------------------


def fingerprint(capacitor: Capacitor) -> str:
    """A digest of the teacher's config and weights: cached pairs are reused only for the teacher that made them."""
    digest = hashlib.sha256(json.dumps(capacitor.config, sort_keys=True).encode())
    for name, value in sorted(capacitor.network.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _limits(settings: DistillSettings) -> tuple[int | None, int | None]:
    """Images to read from each folder: --pairs split evenly between the two when both are given."""
    if settings.pairs is None:
        return None, None
    if settings.source is None or settings.target is None:
        return settings.pairs, settings.pairs
    first = (settings.pairs + 1) // 2
    return first, settings.pairs - first


def _pairs_of_run(
    teacher: Capacitor,
    settings: DistillSettings,
    run: Path,
    say: Callable[[str], None],
    warn: Callable[[str], None],
    deadline: float | None = None,
) -> tuple[Pairs, bool, list[dict[str, str]]]:
    """The run's cached pairs when they come from this teacher, else new ones (written to RUN/pairs.safetensors)."""
    path, print_ = run / PAIRS_NAME, fingerprint(teacher)
    if path.is_file():
        pairs = load_pairs(path)
        if pairs.info.get("teacher_digest") == print_:
            say(f"reusing the {len(pairs)} pairs in {path}")
            return pairs, True, []
        raise DistillError(
            f"{path} was made by another teacher than {settings.teacher}",
            "distill into a new --out folder, or delete that file to integrate again",
        )
    pairs, skipped = make_pairs(teacher, settings, say=say, warn=warn, deadline=deadline)
    pairs.info["teacher_digest"] = print_
    save_pairs(path, pairs)
    return pairs, False, skipped


def make_pairs(
    teacher: Capacitor,
    settings: DistillSettings,
    *,
    say: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: None,
    deadline: float | None = None,
) -> tuple[Pairs, list[dict[str, str]]]:
    """Carry the images of both folders to the other plate with the teacher's own sampler; drop lines that did
    not land. Returns the pairs (in the field's space, on the CPU) and the unreadable files. With a `deadline`
    (`time.monotonic()`), warn early when the integration alone would eat most of the time left."""
    from efm_cli.capacitor.sampler import load_folder

    limits = _limits(settings)
    loaded: list[tuple[Tensor, Direction, str]] = []
    skipped: list[dict[str, str]] = []
    for folder, limit, direction in ((settings.source, limits[0], "forward"), (settings.target, limits[1], "backward")):
        if folder is None or limit == 0:
            continue
        images, unreadable = load_folder(teacher, Path(folder), limit)
        skipped += [{"path": str(p), "reason": reason} for p, reason in unreadable]
        if not len(images):
            raise DistillError(f"no readable images in {folder}", "point it at a folder of JPEG/PNG/WebP files")
        loaded.append((images, direction, folder))
    pace = _Pace(sum(len(images) for images, _, _ in loaded), deadline, warn)
    parts: list[tuple[Tensor, Tensor, int]] = []
    dropped, counts = 0, {}
    for images, direction, folder in loaded:
        say(f"integrating {len(images)} image(s) of {folder} {direction} with the teacher's sampler")
        start, end, landed = integrate_teacher(teacher, images, direction, on_batch=pace.done)
        dropped += int((~landed).sum())
        counts[direction] = int(landed.sum())
        a, b = (start, end) if direction == "forward" else (end, start)
        parts.append((a[landed], b[landed], FORWARD if direction == "forward" else BACKWARD))
    if dropped:
        warn(f"{dropped} teacher line(s) did not land; their images make no pair")
    total = sum(len(a) for a, _, _ in parts)
    if total < 2:
        raise DistillError(
            f"only {total} pair(s) from the teacher: distillation needs at least 2 (one to train on, one to measure)",
            "give more images",
        )
    pairs = Pairs(
        torch.cat([a for a, _, _ in parts]),
        torch.cat([b for _, b, _ in parts]),
        torch.cat([torch.full((len(a),), d, dtype=torch.int8) for a, _, d in parts]),
        {"teacher": settings.teacher, "dropped": dropped, "skipped": len(skipped), **counts},
    )
    return pairs, skipped


class _Pace:
    """Projects how long the teacher's integration takes from its first batches and warns once, early, when the
    pairs would leave little of --max-minutes to train in: each pair costs the teacher's ~12-60 network passes,
    which a user cannot guess before the run."""

    def __init__(self, images: int, deadline: float | None, warn: Callable[[str], None]) -> None:
        self.images, self.deadline, self.warn = images, deadline, warn
        self.start = time.monotonic()
        self.count = 0
        self.warned = deadline is None

    def done(self, count: int) -> None:
        self.count += count
        if self.warned or self.deadline is None:
            return
        elapsed = time.monotonic() - self.start
        budget = self.deadline - self.start
        needed = elapsed * self.images / self.count
        if needed > PAIRS_WARN_SHARE * budget:
            self.warned = True
            self.warn(
                f"the teacher integrates about {self.count / max(elapsed, 1e-9):.1f} image(s)/s: {self.images} "
                f"pairs take about {needed / 60:.1f} of the {budget / 60:.1f} minutes left; pass fewer --pairs or "
                "more --max-minutes (the pairs are saved, and --resume trains on them without integrating again)"
            )


@torch.inference_mode()
def integrate_teacher(
    teacher: Capacitor,
    images: Tensor,
    direction: Direction,
    on_batch: Callable[[int], None] = lambda count: None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(start, end, landed) of images [n, C, S, S] carried by the teacher's sampler, in batches, in field space;
    `on_batch(n)` after each batch of n."""
    param = next(teacher.network.parameters())
    starts, ends, landed = [], [], []
    for batch in images.split(TEACHER_BATCH):
        batch = batch.to(param.device, torch.float32)
        translation = teacher.translate(batch, direction=direction)
        starts.append(teacher.encode(batch).float().cpu())
        ends.append(translation.solution.x.float().cpu())
        landed.append(translation.solution.landed.cpu())
        on_batch(len(batch))
    return torch.cat(starts), torch.cat(ends), torch.cat(landed)


def save_pairs(path: Path, pairs: Pairs) -> None:
    """Write the pairs atomically (a killed run leaves the whole file or none), safetensors with JSON metadata."""
    from safetensors.torch import save_file

    tensors = {"a": pairs.a.contiguous(), "b": pairs.b.contiguous(), "direction": pairs.direction.contiguous()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": PAIRS_FORMAT, "info": json.dumps(pairs.info)})


def load_pairs(path: Path) -> Pairs:
    """The pairs `save_pairs` wrote; anything else is a `DistillError` (safetensors only, nothing unpickled)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != PAIRS_FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, not {PAIRS_FORMAT!r}")
            a, b, direction = (handle.get_tensor(name) for name in ("a", "b", "direction"))
        info = json.loads(meta.get("info", "{}"))
        if a.shape != b.shape or direction.shape != a.shape[:1] or not isinstance(info, dict):
            raise ValueError("its tensors do not fit together")
    except (OSError, ValueError, SafetensorError) as error:
        raise DistillError(f"{path} cannot be read ({error})", "delete it to integrate the pairs again") from error
    return Pairs(a.float(), b.float(), direction, info)


def split(pairs: Pairs, seed: int) -> tuple[Pairs, Pairs]:
    """(training, held-out) pairs: a seeded HELD_OUT_SHARE (at least one) is kept out of training."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed + 4242))
    held = max(1, round(HELD_OUT_SHARE * len(pairs)))
    return pairs.take(order[held:]), pairs.take(order[:held])


# --- training --------------------------------------------------------------------------------------------------------


def _student(
    teacher: Capacitor, settings: DistillSettings, run: Path, device: torch.device, resume: bool
) -> tuple[_Reflow, int | None]:
    """A copy of the teacher's network and its trainer, restored from the run's checkpoint when there is one; and
    the schedule's length (None while it is still to be sized to the minutes)."""
    from efm_cli.training.run import default_warmup

    field_config = teacher.config["field"]
    spec = FieldSpec(kind=field_config["kind"], L=float(field_config["L"]), eps=float(field_config.get("eps", 1e-3)))
    total = settings.steps if settings.steps is not None or settings.minutes is not None else DEFAULT_STEPS
    warmup = settings.warmup if settings.warmup is not None else default_warmup(total or DEFAULT_STEPS)
    schedule = Schedule(lr=settings.lr, warmup=warmup, decay="cosine", total=total, ema=settings.ema)
    torch.manual_seed(settings.seed)
    network = copy.deepcopy(teacher.network).to(device).float()
    if settings.dropout is not None:
        for module in network.modules():
            if isinstance(module, nn.Dropout):
                module.p = settings.dropout
    trainer = _Reflow(network, spec, schedule, batch=settings.batch_size, seed=settings.seed, heights=settings.heights)
    found = checkpoint.latest(run / "checkpoints") if resume else None
    if found is not None:
        tensors, meta = checkpoint.load(found)
        try:
            trainer.load_state(tensors, meta)
        except (KeyError, RuntimeError, ValueError) as error:
            raise DistillError(f"checkpoint {found} does not fit the teacher's network ({error})") from error
        if settings.steps is None and settings.minutes is None:  # neither given: the length it was trained to
            stored = meta.get("total")
            total = stored if type(stored) is int and stored >= trainer.step else trainer.step
            warmup = settings.warmup if settings.warmup is not None else default_warmup(total)
            trainer.schedule = replace(schedule, total=total, warmup=warmup)
        if total is not None and trainer.step > total:
            raise UsageError(
                f"{run} is already at step {trainer.step}, past --steps {total}",
                f"continue with --steps above {trainer.step}, or use {run / MODEL_DIR} as it is",
            )
    return trainer, total


def _train(
    trainer: _Reflow,
    pairs: Pairs,
    total: int | None,
    deadline: float | None,
    settings: DistillSettings,
    on_progress: Callable[[int, int | None, float], None] | None,
    warn: Callable[[str], None],
) -> tuple[str, int, list[float]]:
    """Train until `total` steps, the deadline or Ctrl-C; size `total` to the deadline first when it is None.
    Returns why it stopped, the schedule's length and the losses of this session."""
    from efm_cli.training.run import StopOnSignal, default_warmup, planned_total

    losses: list[float] = []
    stopped = "steps"
    budget = max(deadline - time.monotonic(), 0.0) if deadline is not None else 0.0
    probe = min(max(PROBE_SHARE * budget, PROBE_SECONDS[0]), PROBE_SECONDS[1], budget / 5)
    reserve = max(RESERVE_SECONDS, RESERVE_SHARE * budget)
    first: tuple[int, float] | None = None
    with StopOnSignal(warn) as interrupt:
        while total is None or trainer.step < total:
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "time"
                break
            if interrupt.requested:
                stopped = "interrupted"
                break
            stats = trainer.step_on(pairs.a, pairs.b)
            losses.append(stats.loss)
            now = time.monotonic()
            if first is None:
                first = (trainer.step, now)  # the first step warms caches: not part of the speed
            elif total is None and deadline is not None and now - first[1] >= probe and trainer.step - first[0] >= 2:
                rate = (trainer.step - first[0]) / (now - first[1])
                total = planned_total(trainer.step, rate, deadline - now - reserve)
                warmup = settings.warmup if settings.warmup is not None else default_warmup(total)
                trainer.schedule = replace(trainer.schedule, total=total, warmup=warmup)
            if on_progress is not None:
                on_progress(trainer.step, total, stats.loss)
    return stopped, total if total is not None else trainer.step, losses


def _save_checkpoint(run: Path, trainer: _Reflow, settings: DistillSettings, total: int) -> None:
    """The student's state at the end of the session, so that --resume with more --steps continues it."""
    tensors, meta = trainer.state()
    checkpoint.save(run / "checkpoints", trainer.step, tensors, {**meta, "total": total}, keep=1)


# --- measuring, choosing, exporting ----------------------------------------------------------------------------------


@torch.inference_mode()
def measure(teacher: Capacitor, student: nn.Module, held: Pairs, *, batch_size: int = 16) -> list[Errors]:
    """For Euler with k = 1, 2, 4 steps: the RMS endpoint errors (8-bit levels, as `efm sampler` measures them) of
    the student and of the teacher's own field, against the teacher's endpoints of the held-out pairs, each line run
    in the direction the teacher ran it."""
    from efm_cli.capacitor.sampler import _decode, _integrate, endpoint_error, summarise

    lines: list[tuple[Direction, Tensor, Tensor]] = []  # direction, starts and decoded teacher endpoints
    for code, direction in ((FORWARD, "forward"), (BACKWARD, "backward")):
        chosen = held.direction == code
        if chosen.any():
            start, end = (held.a, held.b) if code == FORWARD else (held.b, held.a)
            lines.append((direction, start[chosen], _decode(teacher, end[chosen], batch_size)))
    rows = []
    for steps in DISTILLED_NFE:
        found: dict[str, tuple[list[Tensor], list[Tensor]]] = {"student": ([], []), "teacher": ([], [])}
        for direction, start, reference in lines:
            for name, network in (("student", student), ("teacher", teacher.network)):
                options = {"solver": "euler", "steps": steps}
                ran = _integrate(network, start, teacher.plates(direction), options, batch_size)
                errors, landed = found[name]
                errors.append(endpoint_error(_decode(teacher, ran.x, batch_size), reference))
                landed.append(ran.landed)
        stats = {name: summarise(torch.cat(e), torch.cat(ok)) for name, (e, ok) in found.items()}
        rows.append(
            Errors(
                steps,
                *(_round(v) for v in stats["student"]),
                *(_round(v) for v in stats["teacher"]),
                failed=int((~torch.cat(found["student"][1])).sum()),
            )
        )
    return rows


def _round(value: float) -> float | None:
    """Four significant digits; None for what JSON cannot hold."""
    return float(f"{value:.4g}") if math.isfinite(value) else None


def distilled_config(
    teacher: Capacitor,
    settings: DistillSettings,
    nfe: int,
    errors: list[Errors],
    train_pairs: int,
    held_out: int,
    steps: int,
) -> dict[str, Any]:
    """The student's config.json: the teacher's, with the Euler sampler, the student's training dropout and a
    `distilled` record (the teacher's measured `sampler_choice` does not describe the student and is left out)."""
    config = {k: v for k, v in teacher.config.items() if k != "sampler_choice"}
    if settings.dropout is not None and "dropout" in config["network"]:
        config["network"] = {**config["network"], "dropout": settings.dropout}  # as the student was trained
    record = {
        "teacher": settings.teacher,
        "pairs": train_pairs,
        "held_out": held_out,
        "steps": steps,
        "nfe": nfe,
        "errors": {
            str(row.steps): {"student": row.student_mean, "teacher": row.teacher_mean}
            for row in errors
            if row.student_mean is not None and row.teacher_mean is not None
        },
        "error_unit": "mean over the held-out pairs of the per-image RMS endpoint difference, in 8-bit levels",
    }
    return {**config, "sampler": {"solver": "euler", "steps": nfe}, "distilled": record}


def export(
    teacher: Capacitor,
    student: nn.Module,
    folder: Path,
    settings: DistillSettings,
    nfe: int,
    errors: list[Errors],
    train_pairs: int,
    held: Pairs,
    steps: int,
) -> Path:
    """Write the student as a capacitor folder (atomically, by `Capacitor.save_pretrained`) with its sample.png."""
    from efm_cli.capacitor.format import SAMPLE_NAME
    from efm_cli.images import save_atomic

    config = distilled_config(teacher, settings, nfe, errors, train_pairs, len(held), steps)
    capacitor = Capacitor(config, network=student, autoencoder=teacher.autoencoder)
    model = capacitor.save_pretrained(folder)
    save_atomic(model / SAMPLE_NAME, sample_picture(teacher, student, held, nfe))
    return model


@torch.inference_mode()
def sample_picture(teacher: Capacitor, student: nn.Module, held: Pairs, steps: int) -> np.ndarray:
    """Up to SAMPLE_COUNT held-out inputs (top row) above the teacher's translations and the student's with `steps`
    Euler steps: what distillation kept, at a glance. Forward pairs when there are any, else backward ones."""
    from efm_cli.capacitor.sampler import _decode, _integrate
    from efm_cli.training.run import grid

    forward = held.direction.cpu() == FORWARD
    chosen = forward if bool(forward.any()) else ~forward
    shown = held.take(torch.nonzero(chosen).flatten()[:SAMPLE_COUNT])
    start, end = (shown.a, shown.b) if chosen is forward else (shown.b, shown.a)
    plates = teacher.plates("forward" if chosen is forward else "backward")
    ran = _integrate(student, start, plates, {"solver": "euler", "steps": steps}, SAMPLE_COUNT)
    return grid([_decode(teacher, x, SAMPLE_COUNT).cpu() for x in (start, end, ran.x)])
