"""Translate image files along a capacitor's field lines: plan the jobs, decode ahead, integrate in batches, write.

The pipeline is a library API; `efm translate` only parses options and prints. Three stages overlap: a thread pool
decodes and downsizes the next batches while the field is integrated, and another one brings finished images back to
their pixel size and writes them atomically, so that the integrator is never waiting for PIL. Every input ends up with
one `Record` (translated, existing, skipped with a reason, or failed with a reason), in the order of the plan.

Layout (README, "Output layout"): one folder in → its tree directly under OUT; one file in → OUT/<name>; a glob →
its matches named relative to its fixed leading folder (`'imgs/*.jpg'` gives what the shell's `imgs/*.jpg` gives);
several inputs → each folder keeps its own name under OUT. OUT defaults to `<folder>-to-<domain>` beside the folder
the outputs are named relative to (a folder input itself, a file's folder, a glob's fixed folder; the common parent
of several inputs), so that it never lies inside an input folder. Outputs never overwrite inputs; files inside OUT
are never read as inputs, even when OUT lies inside an input folder; and a default OUT is marked (`OUTPUT_MARKER`),
so that later scans of a folder around it skip it.
"""

from __future__ import annotations

import errno
import glob
import math
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from efm_cli.capacitor import registry
from efm_cli.capacitor.format import Direction
from efm_cli.capacitor.model import Capacitor
from efm_cli.devices import Precision
from efm_cli.errors import EfmError, UsageError
from efm_cli.files import atomic_path, remove_stale_temporaries
from efm_cli.images import (
    IMAGE_SUFFIXES,
    LUMA,
    OUTPUT_MARKER,
    ImageError,
    Loaded,
    find_images,
    in_output_folder,
    load,
    save_atomic,
    to_tensor,
)
from efm_cli.integrator import Status

RecordStatus = Literal["translated", "existing", "skipped", "failed"]

_MAGIC = frozenset("*?[")
_LUMA = np.array(LUMA, dtype=np.float32)
DETAIL_RADIUS = 2
"""Half-width, in model pixels, of the window over which the local gain of the translation is estimated."""
DETAIL_EPS = (5 / 127.5) ** 2
"""Variance (a grey level std of 5 out of 255) below which the gain is pulled towards 1: flat areas keep detail."""
SHEET_TILE = 128
"""Side, in pixels, of one thumbnail in the --grid contact sheet."""
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write errors that no later file escapes: the run stops instead of failing every remaining input in turn."""


class TranslateError(EfmError):
    """A run that cannot go ahead (nothing to translate); `hint` says what to do."""


class PlanError(UsageError):
    """Inputs or outputs that are wrong as given (missing input, clashing outputs, output over an input)."""


# --- planning ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One input file and the output file it becomes."""

    source: Path
    output: Path


@dataclass(frozen=True)
class Plan:
    """Every job of a run, sorted by output path, and the output folder they all live in."""

    jobs: list[Job]
    out: Path
    default: bool = False
    """Whether OUT is efm's own default folder, which `prepare_out` marks as an output folder."""


@dataclass(frozen=True)
class _Input:
    """One command-line input: a file, a folder or a glob, with the folder its files are named relative to."""

    text: str
    kind: Literal["file", "folder", "glob"]
    root: Path
    """The folder itself, the glob's fixed leading folder, or a file's parent."""
    name: str
    """What a folder or file input is called under OUT when there are several inputs (a glob adds no name)."""

    @property
    def container(self) -> Path:
        """The folder the input's outputs are named relative to, among several inputs: a folder's parent (it keeps
        its own name under OUT), a file's folder, a glob's fixed leading folder."""
        return _named(self.root).parent if self.kind == "folder" else self.root


def _named(path: Path) -> Path:
    """`path` itself when it has a usable name, else its resolved form ('.', '..', '/x/..' have none)."""
    return path if path.name not in ("", ".", "..") else path.resolve()


def _parse_input(text: str) -> _Input:
    path = Path(text).expanduser()
    if path.is_dir():
        return _Input(text, "folder", path, _named(path).name)
    if path.exists():
        return _Input(text, "file", path.parent, path.name)
    parts = path.parts
    fixed = next((i for i, part in enumerate(parts) if _MAGIC & set(part)), None)
    if fixed is None:
        raise PlanError(f"no such file or folder: {text}", "check the path, or quote a glob such as 'photos/*.jpg'")
    root = Path(*parts[:fixed]) if fixed else Path(".")
    return _Input(text, "glob", root, _named(root).name)


def _real(path: Path) -> Path:
    """The path with every link followed; unlike `Path.resolve`, a looping link does not raise (`load` reports it)."""
    return Path(os.path.realpath(path))


def _is_inside(path: Path, folder: Path) -> bool:
    return _real(path).is_relative_to(_real(folder))


def _files(item: _Input, out: Path) -> list[Path]:
    """The input's files, minus anything inside OUT (a previous run's outputs are never inputs)."""
    if item.kind == "file":
        return [Path(item.text).expanduser()]
    if item.kind == "folder":
        found = find_images(item.root)
    else:
        found = []
        for match in sorted(glob.glob(os.path.expanduser(item.text), recursive=True)):
            path = Path(match)
            found.extend(find_images(path) if path.is_dir() else [path] if path.is_file() else [])
    if item.kind == "glob":  # a match may be, or lie in, a marked output folder below the fixed folder
        found = [path for path in found if not in_output_folder(path, item.root)]
    if _is_inside(out, item.root) or item.kind == "glob":
        found = [path for path in found if not _is_inside(path, out)]
    return found


def default_out(inputs: Sequence[str], domain: str) -> Path:
    """`<folder>-to-<domain>` beside the folder the outputs are named relative to: the one input's `root` (a folder
    itself, a file's folder, a glob's fixed folder), or the common folder of several inputs' containers. Never inside
    an input folder, so a later run over that folder cannot take these outputs for inputs."""
    items = [_parse_input(text) for text in inputs]
    if len(items) == 1:
        base = _named(items[0].root)  # the folder itself, a file's folder, a glob's fixed folder
    else:
        base = Path(os.path.commonpath([item.container.resolve() for item in items]))
    if base.parent == base:
        raise PlanError(f"{base} has no parent folder to put the output folder beside", "pass --out DIR")
    return base.parent / f"{base.name}-to-{domain}"


def plan(inputs: Sequence[str], *, domain: str, out: str | os.PathLike[str] | None = None) -> Plan:
    """Expand inputs (files, folders recursively, globs) into jobs whose outputs mirror the input tree under OUT."""
    if not inputs:
        raise PlanError("no input given", "pass image files, folders or globs")
    items = [_parse_input(text) for text in inputs]
    out_dir = Path(out).expanduser() if out is not None else default_out(inputs, domain)
    if out_dir.exists() and not out_dir.is_dir():
        raise PlanError(f"the output {out_dir} is a file, not a folder", "pass --out DIR")
    several = len(items) > 1
    if several:
        _check_distinct_names(items)
    jobs: dict[Path, Job] = {}
    for item in items:
        base = out_dir / item.name if several and item.kind == "folder" else out_dir
        for source in _files(item, out_dir):
            relative = Path(source.name) if item.kind == "file" else source.relative_to(item.root)
            job = Job(source, base / relative)
            other = jobs.setdefault(job.output, job)
            if _real(other.source) != _real(source):
                raise PlanError(
                    f"{other.source} and {source} would both be written to {job.output}",
                    "translate them in separate runs, or pass their common folder",
                )
    _check_no_overwrite(jobs.values(), items, out_dir)
    return Plan(sorted(jobs.values(), key=lambda job: job.output.as_posix()), out_dir, default=out is None)


def _check_distinct_names(items: list[_Input]) -> None:
    """Folders and files each take OUT/<name>; two with one name would mix (globs add no name of their own)."""
    seen: dict[str, str] = {}
    for item in items:
        if item.kind != "glob" and seen.setdefault(item.name, item.text) != item.text:
            raise PlanError(
                f"inputs {seen[item.name]} and {item.text} would both go to OUT/{item.name}",
                "translate them in separate runs",
            )


def _check_no_overwrite(jobs: Iterable[Job], items: list[_Input], out: Path) -> None:
    """Inputs are never modified: no output may land on an input file, and OUT may not be an input folder."""
    for item in items:
        if item.kind == "folder" and _real(out) == _real(item.root):
            raise PlanError(f"the output folder {out} is the input folder", "pass a different --out")
    sources = {_real(job.source) for job in jobs}
    for job in jobs:
        if _real(job.output) in sources:
            raise PlanError(f"writing {job.output} would overwrite an input", "pass a different --out")


def check_sheet(path: str | os.PathLike[str], jobs: Sequence[Job], out: Path | None = None) -> Path:
    """A --grid or --trajectory file name, checked before anything is translated: an image format we can write,
    not a folder (nor OUT, or a folder above it), in a folder we can write to, and neither an input nor an output."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise PlanError(f"{path.name}: unknown image format", f"use one of {', '.join(sorted(IMAGE_SUFFIXES))}")
    if path.is_dir():
        raise PlanError(f"{path} is a folder", "give the file name of the picture, e.g. sheet.jpg")
    if out is not None and _is_inside(out, path):
        raise PlanError(f"{path} is where the outputs go ({out})", "give the picture a file name of its own")
    real = _real(path)
    if real in {_real(job.source) for job in jobs}:
        raise PlanError(f"writing {path} would overwrite an input", "pick another file name")
    clash = next((job for job in jobs if _real(job.output) == real), None)
    if clash is not None:
        raise PlanError(f"writing {path} would overwrite the translation of {clash.source}", "pick another file name")
    check_writable(path.parent)
    return path


def check_writable(folder: Path) -> None:
    """Create `folder` and open a nameless temporary file in it, so that a folder nobody can write to stops the run
    before anything is translated, not after; a `TranslateError` says why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise _unwritable(folder, error) from error


def prepare_out(plan: Plan) -> None:
    """Make sure OUT can be written before anything is translated, and mark a default OUT as efm's output folder.

    The mark (`OUTPUT_MARKER`, a hidden file) lets folder scans skip the outputs of earlier runs when they lie inside
    a folder translated later. A folder given with --out is the user's and is left unmarked.
    """
    check_writable(plan.out)
    marker = plan.out / OUTPUT_MARKER
    if plan.default and not marker.exists():
        try:
            with atomic_path(marker) as temporary:
                temporary.write_text("Outputs of efm translate: efm never reads this folder as input of another run.\n")
        except OSError as error:
            raise _unwritable(plan.out, error) from error


def _unwritable(folder: Path, error: OSError) -> TranslateError:
    return TranslateError(f"cannot write to {folder}: {error.strerror or error}", "pass a folder you can write to")


def shard(jobs: Sequence[Job], index: int, count: int) -> list[Job]:
    """Shard `index` of `count` (1-based): every `count`-th job of the sorted plan, so shards never overlap."""
    if not 1 <= index <= count:
        raise PlanError(f"shard {index}/{count} does not exist", "use I/N with 1 ≤ I ≤ N")
    return list(jobs[index - 1 :: count])


def open_capacitor(
    *, model: str | None, to: str | None, device: torch.device | str = "cpu", fast: bool = False
) -> tuple[Capacitor, Direction, str]:
    """The capacitor a `--model REF` and/or `--to DOMAIN` asks for, the direction to run it, and its name; `fast`
    picks a distilled capacitor for `--to` (`registry.for_domain`)."""
    if model is None and to is None:
        raise PlanError("say where to translate to", "pass --to DOMAIN or --model REF")
    if model is None:
        entry, _ = registry.for_domain(to, fast=fast)
        path, name = entry.path, entry.name
    else:
        path = registry.resolve(model)
        name = model
    capacitor = Capacitor.from_pretrained(path, device=device)
    if to is not None and to not in (capacitor.source, capacitor.target):
        raise PlanError(
            f"{name} translates between {capacitor.source!r} and {capacitor.target!r}, not {to!r}",
            f"pass --to {capacitor.source} or --to {capacitor.target}",
        )
    direction = capacitor.direction_to(to) if to is not None else "forward"
    return capacitor, direction, name


# --- images: model size and back -------------------------------------------------------------------------------


def _resize(planes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float [h, w, c] to [H, W, c] at size = (W, H), channel by channel with PIL's bicubic kernel, no rounding."""
    if planes.shape[1::-1] == size:
        return planes
    resized = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(planes[:, :, c])).resize(size, Image.BICUBIC, reducing_gap=None)
        )
        for c in range(planes.shape[2])
    ]
    return np.stack(resized, axis=2)


def _box_mean(values: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)² window around each pixel of [h, w, c], edges repeated: summed-area table, O(pixels)."""
    width = 2 * radius + 1
    padded = np.pad(values, ((radius + 1, radius), (radius + 1, radius), (0, 0)), mode="edge")
    table = padded.cumsum(0).cumsum(1)
    return (table[width:, width:] - table[:-width, width:] - table[width:, :-width] + table[:-width, :-width]) / (
        width * width
    )


def local_gain(small_in: np.ndarray, small_out: np.ndarray) -> np.ndarray:
    """Per pixel and channel, how strongly the output follows the input's brightness nearby ([h, w, 3]).

    A local linear fit out ≈ a·Y_in + b over a small window (as in the guided filter), with the slope pulled
    towards 1 where the input is flat: a colour change keeps a ≈ 1, an inversion gives a ≈ −1, and where the field
    replaced the picture (new texture unrelated to the input) a ≈ 0, so no stale detail is pasted on.
    """
    luma = small_in @ _LUMA
    luma = luma[:, :, None]
    mean_in, mean_out = _box_mean(luma, DETAIL_RADIUS), _box_mean(small_out, DETAIL_RADIUS)
    covariance = _box_mean(luma * small_out, DETAIL_RADIUS) - mean_in * mean_out
    variance = _box_mean(luma * luma, DETAIL_RADIUS) - mean_in * mean_in
    return (covariance + DETAIL_EPS) / (variance + DETAIL_EPS)


def compose(
    rgb: np.ndarray, small_in: Tensor, small_out: Tensor, *, detail: bool = True, reconstructed: bool = False
) -> np.ndarray:
    """A translation [3, s, s] in [−1, 1] back at the input's pixel size, as uint8 RGB [H, W, 3].

    The field sees the picture at the capacitor's resolution, so on its own the result is a bicubic enlargement.
    With `detail`, the input's fine detail — its luminance minus the enlargement of what the field saw (`small_in`:
    the input at the capacitor's size, or with `reconstructed` a latent capacitor's reconstruction of it) — is added
    back, scaled by `local_gain` (README, "Fine detail", has what that gains on real photos).
    """
    size = (rgb.shape[1], rgb.shape[0])
    small_out_hwc = small_out.permute(1, 2, 0).numpy().astype(np.float32)
    result = _resize(small_out_hwc, size)
    if detail and (reconstructed or (small_out.shape[2], small_out.shape[1]) != size):
        small_in_hwc = small_in.permute(1, 2, 0).numpy().astype(np.float32)
        full = rgb.astype(np.float32) / 127.5 - 1.0
        residual = (full - _resize(small_in_hwc, size)) @ _LUMA
        result = result + _resize(local_gain(small_in_hwc, small_out_hwc), size) * residual[:, :, None]
    return np.clip(np.rint((result + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _to_model(images: Tensor, channels: int) -> Tensor:
    """RGB batch to the capacitor's channels (grey capacitors see luminance)."""
    if channels == 3:
        return images
    return torch.einsum("bchw,c->bhw", images, torch.from_numpy(_LUMA).to(images))[:, None]


def _to_rgb(images: Tensor) -> Tensor:
    return images if images.shape[1] == 3 else images.expand(-1, 3, -1, -1)


# --- the pipeline ----------------------------------------------------------------------------------------------


@dataclass
class Record:
    """What happened to one input."""

    path: Path
    output: Path
    status: RecordStatus
    reason: str | None = None
    nfe: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The record with absolute paths, as every path of the --json report is."""
        return {
            "path": os.path.abspath(self.path),
            "output": os.path.abspath(self.output),
            "status": self.status,
            "reason": self.reason,
            "nfe": self.nfe,
        }


@dataclass
class Report:
    """The records of a run, in plan order, with what the summary, --grid and --trajectory need."""

    records: list[Record]
    seconds: float
    retried: int = 0
    """Samples integrated again in fp32 after failing in reduced precision."""
    pairs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    """(before, after) thumbnails of the shown inputs, for `contact_sheet`."""
    shown: list[tuple[Job, Tensor]] = field(default_factory=list)
    """The shown inputs that were translated, with their model-size tensors, for `trace`."""

    def count(self, status: RecordStatus) -> int:
        return sum(record.status == status for record in self.records)

    @property
    def nfe_mean(self) -> float:
        """Mean evaluations per translated image."""
        values = [record.nfe for record in self.records if record.status == "translated" and record.nfe is not None]
        return sum(values) / len(values) if values else 0.0

    def summary(self) -> dict[str, Any]:
        translated = self.count("translated")
        return {
            "inputs": len(self.records),
            "translated": translated,
            "existing": self.count("existing"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "retried_fp32": self.retried,
            "nfe_mean": round(self.nfe_mean, 2),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(translated / self.seconds, 3) if self.seconds > 0 else 0.0,
        }


@dataclass(frozen=True)
class _Decoded:
    index: int
    loaded: Loaded
    tensor: Tensor


class _Inline:
    """An executor that runs each task at once on the calling thread: the no-overlap baseline (workers=0)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as error:
            future.set_exception(error)
        return future


def _decode(index: int, source: Path, size: int) -> _Decoded | str:
    """Read and downsize one input in a worker thread; an unreadable one becomes its reason."""
    try:
        loaded = load(source)
    except ImageError as error:
        return str(error)
    return _Decoded(index, loaded, to_tensor(loaded.rgb, size))


def _ahead(pool: Any, tasks: Iterable[tuple[Any, ...]], fn: Callable[..., Any], depth: int) -> Iterator[Any]:
    """Results of fn(*task) in task order, with up to `depth` tasks running ahead of the consumer."""
    pending: deque[Future[Any]] = deque()
    for task in tasks:
        pending.append(pool.submit(fn, *task))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write(
    job: Job, decoded: _Decoded, out: Tensor, seen: Tensor | None, detail: bool, thumbnail: bool
) -> tuple[Record, Any]:
    """Bring one translation back to its input's size and write it atomically, in a worker thread."""
    if seen is None:
        rgb = compose(decoded.loaded.rgb, decoded.tensor, out, detail=detail)
    else:
        rgb = compose(decoded.loaded.rgb, seen, out, detail=detail, reconstructed=True)
    suffix_known = job.output.suffix.lower() in IMAGE_SUFFIXES
    try:
        save_atomic(job.output, rgb, alpha=decoded.loaded.alpha, format=None if suffix_known else decoded.loaded.format)
    except (OSError, ValueError) as error:
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise TranslateError(
                f"cannot write {job.output}: {error.strerror}",
                "free some space where the outputs go, then rerun with --skip-existing to finish",
            ) from error
        return Record(job.source, job.output, "failed", f"cannot write: {error}"), None
    pair = (_thumbnail(decoded.loaded.rgb), _thumbnail(rgb)) if thumbnail else None
    return Record(job.source, job.output, "translated"), pair


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(ImageOps.pad(Image.fromarray(rgb), (SHEET_TILE, SHEET_TILE), color=(255, 255, 255)))


@dataclass
class _Session:
    """State of one `translate_files` call, shared by its stages; touched from the calling thread only."""

    capacitor: Capacitor
    jobs: Sequence[Job]
    direction: Direction
    precision: Precision
    detail: bool
    options: dict[str, Any]
    progress: Callable[[Record], None] | None
    records: list[Record | None]
    shown: set[int] = field(default_factory=set)
    writes: deque[tuple[int, int, Future[tuple[Record, Any]]]] = field(default_factory=deque)
    pairs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    traced: dict[int, Tensor] = field(default_factory=dict)
    retried: int = 0

    def finish(self, index: int, record: Record) -> None:
        self.records[index] = record
        if self.progress is not None:
            self.progress(record)

    @torch.inference_mode()
    def integrate(self, images: Tensor) -> tuple[Tensor, Tensor | None, list[int], list[int]]:
        """Translate a model-size batch; samples that fail in reduced precision are integrated again in fp32.

        Returns the translations, what the field saw of each input (a latent capacitor's reconstruction, for
        `--detail`; None when that is the input itself), and each sample's NFE and status."""
        device = next(self.capacitor.network.parameters()).device
        if device.type == "cuda":
            images = images.pin_memory()
        images = _to_model(images, self.capacitor.config["image"]["channels"]).to(device, non_blocking=True)
        reconstruct = self.detail and self.capacitor.latent
        common = {"direction": self.direction, "reconstruct": reconstruct, **self.options}
        result = self.capacitor.translate(images, precision=self.precision, **common)
        out, nfe, status = result.images.float(), result.solution.nfe.clone(), result.solution.status.clone()
        seen = result.reconstruction.float() if result.reconstruction is not None else None
        failed = (status != Status.LANDED).nonzero().flatten()
        if self.precision != "fp32" and len(failed):
            again = self.capacitor.translate(images[failed], **common)
            out[failed], status[failed] = again.images.float(), again.solution.status
            nfe[failed] += again.solution.nfe
            self.retried += len(failed)
        seen = _to_rgb(seen).cpu() if seen is not None else None
        return _to_rgb(out).cpu(), seen, nfe.tolist(), status.tolist()

    def run_batch(self, batch: list[_Decoded], writers: Any) -> None:
        """Integrate a batch and hand each landed image to a writer; lines that did not land are failures."""
        out, seen, nfe, status = self.integrate(torch.stack([decoded.tensor for decoded in batch]))
        for row, decoded in enumerate(batch):
            index = decoded.index
            job = self.jobs[index]
            if status[row] != Status.LANDED:
                reason = f"the field line did not land ({Status(status[row]).name.lower()})"
                self.finish(index, Record(job.source, job.output, "failed", reason, nfe[row]))
                continue
            if index in self.shown:
                self.traced[index] = decoded.tensor
            reference = seen[row] if seen is not None else None
            write = writers.submit(_write, job, decoded, out[row], reference, self.detail, index in self.shown)
            self.writes.append((index, nfe[row], write))

    def drain(self, keep: int) -> None:
        """Collect finished writes in order; block on the oldest while more than `keep` are pending."""
        while self.writes and (len(self.writes) > keep or self.writes[0][2].done()):
            index, nfe, write = self.writes.popleft()
            record, pair = write.result()
            if record.status == "translated":
                record.nfe = nfe
            if pair is not None:
                self.pairs[index] = pair
            self.finish(index, record)


def translate_files(
    capacitor: Capacitor,
    jobs: Sequence[Job],
    *,
    direction: Direction,
    batch_size: int = 16,
    precision: Precision = "fp32",
    detail: bool = True,
    skip_existing: bool = False,
    workers: int | None = None,
    show: int = 0,
    seed: int = 0,
    progress: Callable[[Record], None] | None = None,
    **options: Any,
) -> Report:
    """Translate every job's file and write its output; one `Record` per job, in job order.

    `options` go to the integrator (solver, rtol, atol, steps, …; the capacitor's sampler settings by default).
    `workers` threads decode ahead and as many write behind (0: everything on the calling thread, the no-overlap
    baseline). `show` inputs, picked at random with `seed`, are kept for `contact_sheet` and `trace`. `progress` is
    called on the calling thread as each input is done.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    start = time.perf_counter()
    if next(capacitor.network.parameters()).device.type != "cpu":
        options = {"sync_every": 4, **options}  # compaction syncs with the host; on an accelerator, rarely
    run = _Session(capacitor, jobs, direction, precision, detail, options, progress, [None] * len(jobs))
    remove_stale_temporaries(job.output for job in jobs)  # a killed run's half-written files
    todo = []
    for index, job in enumerate(jobs):
        if skip_existing and job.output.is_file():
            run.finish(index, Record(job.source, job.output, "existing"))
        else:
            todo.append(index)
    run.shown = set(random.Random(seed).sample(todo, min(show, len(todo))))
    size = capacitor.config["image"]["size"]
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    with ExitStack() as stack:
        readers = stack.enter_context(ThreadPoolExecutor(workers)) if workers else _Inline()
        writers = stack.enter_context(ThreadPoolExecutor(workers)) if workers else _Inline()
        tasks = ((index, jobs[index].source, size) for index in todo)
        batch: list[_Decoded] = []
        for index, decoded in zip(todo, _ahead(readers, tasks, _decode, 2 * batch_size + workers), strict=True):
            if isinstance(decoded, str):
                run.finish(index, Record(jobs[index].source, jobs[index].output, "skipped", decoded))
                continue
            batch.append(decoded)
            if len(batch) == batch_size:
                run.run_batch(batch, writers)
                batch = []
                run.drain(keep=2 * batch_size)
        if batch:
            run.run_batch(batch, writers)
        run.drain(keep=0)
    return Report(
        records=[record for record in run.records if record is not None],
        seconds=time.perf_counter() - start,
        retried=run.retried,
        pairs=[run.pairs[index] for index in sorted(run.pairs)],
        shown=[(jobs[index], run.traced[index]) for index in sorted(run.pairs)],
    )


# --- pictures of a run -----------------------------------------------------------------------------------------


def contact_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, columns: int = 4) -> np.ndarray:
    """Before/after thumbnails side by side, `columns` pairs a row, on white: uint8 RGB."""
    if not pairs:
        raise ValueError("no translated image to show")
    gap, tile = 4, SHEET_TILE
    columns = min(columns, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    width, height = columns * (2 * tile + 3 * gap) + gap, rows * (tile + gap) + gap
    sheet = np.full((height, width, 3), 255, dtype=np.uint8)
    for i, (before, after) in enumerate(pairs):
        top, left = gap + (i // columns) * (tile + gap), gap + (i % columns) * (2 * tile + 3 * gap)
        sheet[top : top + tile, left : left + tile] = before
        sheet[top : top + tile, left + tile + gap : left + 2 * tile + gap] = after
    return sheet


def trace(
    capacitor: Capacitor,
    images: Tensor,
    *,
    direction: Direction,
    frames: int = 8,
    precision: Precision = "fp32",
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Points along the field lines of `images` [k, 3, s, s] at `frames` evenly spaced heights, plates included.

    Re-integrates the batch, recording every accepted step through the integrator's callback, and interpolates
    linearly between the steps around each height. Returns (heights [frames], states [k, frames, 3, s, s]).
    """
    z0, z1 = capacitor.plates(direction)
    steps: list[tuple[Tensor, Tensor, Tensor]] = []

    def record(state: dict[str, Any]) -> None:
        taken = state["accepted"]
        steps.append((state["index"][taken].cpu(), state["t"][taken].cpu(), state["y"][taken].float().cpu()))

    model_images = _to_model(images, capacitor.config["image"]["channels"])
    device = next(capacitor.network.parameters()).device
    starts = capacitor.encode(model_images.to(device)).float().cpu()
    capacitor.translate(model_images.to(device), direction=direction, precision=precision, callback=record, **options)
    heights = torch.linspace(z0, z1, frames)
    lines = []
    for row, start in enumerate(starts.flatten(1)):
        progress = [torch.zeros(1)] + [(t[index == row].double() - z0) / (z1 - z0) for index, t, _ in steps]
        states = [start[None]] + [y[index == row] for index, _, y in steps]
        lines.append(_interpolate(torch.cat(progress).float(), torch.cat(states), torch.linspace(0, 1, frames)))
    points = torch.stack(lines).view(-1, *starts.shape[1:])
    states = _to_rgb(capacitor.decode(points.to(device)).float().cpu())  # as `translate` returns them
    return heights, states.reshape(len(images), frames, 3, *model_images.shape[2:])


def _interpolate(progress: Tensor, states: Tensor, at: Tensor) -> Tensor:
    """One line's states [n, D], recorded at rising fractions of the way [n], linearly interpolated to `at`."""
    upper = torch.searchsorted(progress, at).clamp(min=1).clamp(max=len(progress) - 1)
    lower = (upper - 1).clamp_min(0)
    span = (progress[upper] - progress[lower]).clamp_min(1e-12)
    weight = ((at - progress[lower]) / span).clamp(0, 1)[:, None]
    return states[lower] + weight * (states[upper] - states[lower])


def film_strip(states: Tensor, *, scale: int | None = None) -> np.ndarray:
    """Field lines as rows of frames (states [k, frames, 3, s, s] in [−1, 1]) on white: uint8 RGB."""
    k, frames, _, s, _ = states.shape
    scale = scale or max(1, math.ceil(96 / s))
    tile, gap = s * scale, 2
    pixels = ((states.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4).permute(0, 1, 3, 4, 2).numpy()
    sheet = np.full((k * (tile + gap) + gap, frames * (tile + gap) + gap, 3), 255, dtype=np.uint8)
    for row in range(k):
        for column in range(frames):
            top, left = gap + row * (tile + gap), gap + column * (tile + gap)
            sheet[top : top + tile, left : left + tile] = pixels[row, column]
    return sheet


def write_picture(path: Path, rgb: np.ndarray) -> None:
    """Save a sheet or strip atomically, in the format its name says."""
    save_atomic(path, rgb)
