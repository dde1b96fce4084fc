"""A capacitor's default sampler, chosen by measurement: the cheapest integrator setting whose translations stay
within a stated distance of a tight reference.

`measure` carries a batch of held-out source images along the capacitor's field lines twice over: once with a
tight reference (Dormand–Prince at rtol = atol = `REFERENCE_TOL`; float64 on CUDA, float32 on a CPU, where
float64 runs 2.5–6× slower and moves a 1e-6 reference by 0.003 of a level: `reference_dtype`), then with
each candidate setting (dopri5 at several tolerances, Heun and Euler at several step counts), the way `translate`
runs them (fp32 state, the network in the requested precision). For every candidate it records:

- **NFE**: field evaluations per image (mean and max over the images), as the integrator counts them: Euler takes
  `steps`, Heun 2·`steps`, dopri5 what its error control needs (plus one for its starting step);
- **endpoint error**: per image, the RMS over pixels and channels of the difference between the candidate's final
  image and the reference's, in 8-bit levels (one level is 2/255 of the [−1, 1] range; no rounding to levels).
  Final images are what `translate` writes before rounding: clamped to [−1, 1], decoded first for a latent
  capacitor. Summarised over the images as mean, 95th percentile (numpy's linear interpolation) and max.

The choice is the candidate with the fewest mean NFE among those whose every line landed and whose 95th-percentile
error is at most the bound (ties go to the smaller error). The default bound, `DEFAULT_BOUND` = 1 level, sits at the
size of what nobody counts as a change of the translation: writing a translation as 8-bit pixels already moves it
by 0.29 of a level RMS (the rounding error 1/√12), and storing the embedded capacitors' weights in fp16 moved their
translations by 0.22–0.31 of a level (README); one level is a few times both, and far below the 14–19 levels by
which the embedded capacitors change their inputs. Images whose reference line did not land are left out (counted).

`write` stores a choice in a capacitor folder's config.json (`sampler`, and the measured curve as
`sampler_choice`), atomically, and only in a folder of the user's own: never an embedded capacitor or the Hub
cache. `at_export` is the cheap variant that `efm train` runs on its last export.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from efm_cli import __version__, env
from efm_cli.capacitor import hub, registry
from efm_cli.capacitor.format import (
    CONFIG_NAME,
    CapacitorError,
    Direction,
    read_config,
    validate,
)
from efm_cli.capacitor.model import Capacitor
from efm_cli.devices import PRECISIONS, Precision, autocast
from efm_cli.errors import UsageError
from efm_cli.files import write_json
from efm_cli.integrator import Status, integrate

LEVELS = 127.5
"""8-bit levels per unit of the [−1, 1] range (255 levels over a range of 2)."""
DEFAULT_BOUND = 1.0
"""The default bound on the 95th-percentile endpoint error, in 8-bit levels (the module docstring says why)."""
REFERENCE_TOL = 1e-6
"""rtol = atol of the reference dopri5: the tightest a capacitor config may ask for (`SAMPLER_RANGES`)."""
REFERENCE_MAX_NFE = 5000
"""Evaluation cap of a reference line: the embedded capacitors' lines take about 700 at 1e-6 (their fields are not
smooth in z, so this is 8× the NFE of 1e-4, not the 2.5× of a smooth field); a line that needs more is left out."""
STATISTIC = "95th percentile over images of the per-image RMS endpoint difference to the reference, in 8-bit levels"


@dataclass(frozen=True)
class Setting:
    """One integrator setting: dopri5 with `rtol`/`atol`, or heun/euler with `steps`."""

    solver: str
    rtol: float | None = None
    atol: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.solver == "dopri5":
            if self.rtol is None or self.atol is None or self.steps is not None:
                raise ValueError("a dopri5 setting needs rtol and atol, and no steps")
        elif self.solver in ("heun", "euler"):
            if self.steps is None or self.steps < 1 or self.rtol is not None or self.atol is not None:
                raise ValueError(f"a {self.solver} setting needs steps ≥ 1, and no tolerances")
        else:
            raise ValueError(f"unknown solver {self.solver!r}")

    @classmethod
    def dopri5(cls, tol: float) -> Setting:
        return cls("dopri5", rtol=tol, atol=tol)

    @classmethod
    def fixed(cls, solver: str, steps: int) -> Setting:
        return cls(solver, steps=steps)

    @classmethod
    def from_sampler(cls, sampler: dict[str, Any]) -> Setting | None:
        """The setting a config's `sampler` section asks for (the integrator's defaults filled in), or None for a
        section this module cannot express."""
        solver = sampler.get("solver", "dopri5")
        try:
            if solver == "dopri5":
                return cls(solver, rtol=float(sampler.get("rtol", 1e-4)), atol=float(sampler.get("atol", 1e-4)))
            return cls(solver, steps=int(sampler.get("steps", 40)))
        except (TypeError, ValueError):
            return None

    @property
    def fixed_step(self) -> bool:
        return self.steps is not None

    @property
    def nfe(self) -> int | None:
        """Evaluations per line, known in advance for the fixed-step solvers."""
        if self.steps is None:
            return None
        return self.steps * (2 if self.solver == "heun" else 1)

    def sampler(self) -> dict[str, Any]:
        """The config.json `sampler` section (and `integrate`'s options) of this setting."""
        if self.steps is not None:
            return {"solver": self.solver, "steps": self.steps}
        return {"solver": self.solver, "rtol": self.rtol, "atol": self.atol}

    @property
    def label(self) -> str:
        if self.steps is not None:
            return f"{self.solver} {self.steps} steps"
        if self.rtol == self.atol:
            return f"dopri5 tol {self.rtol:g}"
        return f"dopri5 rtol {self.rtol:g} atol {self.atol:g}"


def _dopri5(*tols: float) -> tuple[Setting, ...]:
    return tuple(Setting.dopri5(t) for t in tols)


def _fixed(solver: str, *steps: int) -> tuple[Setting, ...]:
    return tuple(Setting.fixed(solver, s) for s in steps)


CANDIDATES = (
    *_dopri5(1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5),
    *_fixed("heun", 4, 8, 16, 32, 64),
    *_fixed("euler", 4, 8, 16, 32, 64, 128, 256),
)
"""What `efm sampler` measures by default: dopri5 at half-decade tolerances, Heun and Euler at doubling steps.
Trained fields converge slowly (the embedded ones need dopri5 near 1e-5 or a few hundred Euler steps to come within
a level of the reference), so the grid reaches further than the official sampler's 80 Euler steps."""
QUICK_CANDIDATES = (*_dopri5(1e-3, 1e-4, 1e-5), *_fixed("heun", 4, 8, 16), *_fixed("euler", 8, 16, 32))
"""The shorter list `efm train` measures at its last export, pruned: dopri5 from loose to tight until one is within
the bound, then only the fixed-step settings that would be cheaper. It spans what won on the embedded capacitors:
Heun at 5–6 steps on horse2zebra, dopri5 near 1e-5 on the digits (benchmarks/bench_sampler.py)."""


@dataclass(frozen=True)
class Point:
    """One candidate's measurement: NFE per image and endpoint error against the reference (8-bit levels)."""

    setting: Setting
    nfe_mean: float
    nfe_max: int
    error_mean: float
    error_p95: float
    error_max: float
    failed: int
    """Lines that did not land (their images are left out of the error statistics; the candidate is not eligible)."""
    seconds: float
    current: bool = False
    """Whether this is the setting the capacitor's config named when it was measured."""

    def within(self, bound: float) -> bool:
        return self.failed == 0 and self.error_p95 <= bound

    def to_json(self) -> dict[str, Any]:
        return {
            **self.setting.sampler(),
            "nfe": _round(self.nfe_mean),
            "nfe_max": self.nfe_max,
            "error_mean": _round(self.error_mean),
            "error_p95": _round(self.error_p95),
            "error_max": _round(self.error_max),
            "failed": self.failed,
            "seconds": _round(self.seconds),
            **({"current": True} if self.current else {}),
        }


@dataclass
class Choice:
    """The measured NFE–error curve of a capacitor and the setting chosen from it (None: nothing within the bound)."""

    bound: float
    curve: list[Point]
    chosen: Point | None
    reference: dict[str, Any]
    images: int
    dropped: int
    """Images left out because their reference line did not land."""
    direction: Direction
    device: str
    previous: dict[str, Any]
    """The capacitor's sampler section when it was measured."""
    skipped: list[Setting] = field(default_factory=list)
    """Candidates not measured because they could not be cheaper than one already within the bound (`prune`)."""

    def sampler(self) -> dict[str, Any] | None:
        """The config.json `sampler` section the choice asks for."""
        return None if self.chosen is None else self.chosen.setting.sampler()

    def to_json(self, origin: str = "efm sampler") -> dict[str, Any]:
        """The record stored as config.json's `sampler_choice` (and printed by `efm sampler --json`)."""
        return {
            "chosen": self.sampler(),
            "bound": self.bound,
            "statistic": STATISTIC,
            "images": self.images,
            "dropped": self.dropped,
            "direction": self.direction,
            "device": self.device,
            "reference": self.reference,
            "previous": self.previous,
            "curve": [point.to_json() for point in self.curve],
            "skipped": [setting.sampler() for setting in self.skipped],
            "origin": origin,
            "efm_version": __version__,
        }


def _round(value: float, digits: int = 4) -> float | None:
    """`value` to `digits` significant digits; None for what JSON cannot hold (NaN, infinity)."""
    if not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def endpoint_error(candidate: Tensor, reference: Tensor) -> Tensor:
    """Per image [b]: the RMS over pixels and channels of `candidate − reference`, in 8-bit levels.

    Both are image batches [b, C, H, W] in the [−1, 1] range; they are clamped to it (what is written) and compared
    in float64.
    """
    a = candidate.detach().double().clamp(-1.0, 1.0)
    b = reference.detach().double().clamp(-1.0, 1.0)
    return (a - b).flatten(1).square().mean(1).sqrt() * LEVELS


def summarise(errors: Tensor, landed: Tensor) -> tuple[float, float, float]:
    """(mean, 95th percentile, max) of the per-image errors of the lines that landed; NaN when none did."""
    values = errors[landed].cpu().numpy()
    if not len(values):
        return math.nan, math.nan, math.nan
    return float(values.mean()), float(np.percentile(values, 95)), float(values.max())


def pick(curve: Iterable[Point], bound: float) -> Point | None:
    """The candidate with the fewest mean NFE among those within `bound` (ties: the smaller error), or None."""
    within = [point for point in curve if point.within(bound)]
    return min(within, key=lambda p: (p.nfe_mean, p.error_p95), default=None)


def reference_dtype(device: torch.device) -> torch.dtype:
    """The reference's precision by default: float64 on CUDA; float32 on a CPU, where float64 runs these networks
    2.5–6× slower and changes a 1e-6 reference by thousandths of a level (benchmarks/bench_sampler.py measures
    it), and on MPS, which has no float64."""
    return torch.float64 if device.type == "cuda" else torch.float32


@dataclass
class _Run:
    x: Tensor
    nfe: Tensor
    landed: Tensor
    seconds: float


def _integrate(
    network: torch.nn.Module,
    points: Tensor,
    plates: tuple[float, float],
    options: dict[str, Any],
    batch_size: int,
    precision: Precision = "fp32",
) -> _Run:
    """Integrate `points` in chunks of `batch_size` (each chunk one vectorised batch) and time it."""
    param = next(network.parameters())
    xs, nfes, landed = [], [], []
    start = time.perf_counter()
    for chunk in points.split(batch_size):
        with autocast(param.device.type, precision):
            solution = integrate(network, chunk.to(param.device, param.dtype), *plates, **options)
        xs.append(solution.x)
        nfes.append(solution.nfe)
        landed.append(solution.status == Status.LANDED)
    if param.device.type == "cuda":
        torch.cuda.synchronize(param.device)
    seconds = time.perf_counter() - start
    return _Run(torch.cat(xs), torch.cat(nfes), torch.cat(landed), seconds)


def _decode(capacitor: Capacitor, points: Tensor, batch_size: int) -> Tensor:
    """Final images in [−1, 1], decoded in chunks (a latent capacitor's autoencoder runs in fp32)."""
    param = next(capacitor.network.parameters())
    return torch.cat(
        [capacitor.decode(chunk.to(param.device, torch.float32)).clamp(-1, 1) for chunk in points.split(batch_size)]
    )


@torch.inference_mode()
def reference(
    capacitor: Capacitor,
    points: Tensor,
    *,
    direction: Direction = "forward",
    tol: float = REFERENCE_TOL,
    dtype: torch.dtype | None = None,
    batch_size: int = 16,
) -> tuple[Tensor, _Run, torch.dtype]:
    """The reference's final images of field-space `points`, its run (NFE, landed, seconds) and the dtype used
    (`dtype`, by default `reference_dtype`; MPS always gets float32)."""
    param = next(capacitor.network.parameters())
    dtype = dtype or reference_dtype(param.device)
    if param.device.type == "mps":
        dtype = torch.float32
    network = capacitor.network if dtype == param.dtype else copy.deepcopy(capacitor.network).to(dtype).eval()
    options = {"solver": "dopri5", "rtol": tol, "atol": tol, "max_nfe": REFERENCE_MAX_NFE}
    run = _integrate(network, points.to(dtype), capacitor.plates(direction), options, batch_size)
    return _decode(capacitor, run.x, batch_size), run, dtype


def _refinement(curve: Sequence[Point], bound: float, solver: str) -> Setting | None:
    """A setting of `solver` between its cheapest one within the bound and the next cheaper one that is not: the
    geometric middle of their step counts (or of their tolerances, for dopri5 with rtol = atol); None when there is
    no gap left to narrow."""
    points = [p for p in curve if p.setting.solver == solver and p.setting.rtol == p.setting.atol]
    if solver == "dopri5":  # from loose to tight: cheap to dear
        ordered = sorted(points, key=lambda p: -(p.setting.rtol or 0.0))
    else:
        ordered = sorted(points, key=lambda p: p.setting.steps or 0)
    first = next((i for i, p in enumerate(ordered) if p.within(bound)), None)
    if not first:  # nothing within the bound, or already the cheapest measured
        return None
    low, high = ordered[first - 1].setting, ordered[first].setting
    if solver == "dopri5":
        tol = float(f"{math.sqrt((low.rtol or 0.0) * (high.rtol or 0.0)):.2g}")
        between = (high.rtol or 0.0) < tol < (low.rtol or 0.0)
        return Setting.dopri5(tol) if between else None
    steps = round(math.sqrt((low.steps or 0) * (high.steps or 0)))
    return Setting.fixed(solver, steps) if (low.steps or 0) < steps < (high.steps or 0) else None


@torch.inference_mode()
def measure_points(
    capacitor: Capacitor,
    points: Tensor,
    *,
    candidates: Sequence[Setting] = CANDIDATES,
    bound: float = DEFAULT_BOUND,
    direction: Direction = "forward",
    reference_tol: float = REFERENCE_TOL,
    reference_precision: torch.dtype | None = None,
    precision: Precision = "fp32",
    batch_size: int = 16,
    refine: int = 2,
    prune: bool = False,
    say: Callable[[str], None] = lambda message: None,
) -> Choice:
    """The NFE–error curve of `candidates` on field-space `points` (images, or a latent capacitor's normalised
    codes: what `Capacitor.encode` returns) and the cheapest setting within `bound`.

    The capacitor's own sampler setting is measured too when it is not among the candidates. The reference runs in
    `reference_precision` (default: `reference_dtype` of the device). `refine` rounds of geometric bisection then
    narrow, for each solver, the gap between its cheapest setting within the bound and the next cheaper one (step
    counts, or dopri5's tolerance), so a doubling grid does not overpay by up to 2×; a fixed-step refinement that
    cannot beat the best so far is not run. With `prune`, candidates that cannot be cheaper
    than one already within the bound are not measured (dopri5 loosest first, then the fixed-step ones by NFE):
    the curve is then incomplete, the choice the same.
    """
    if not math.isfinite(bound) or bound <= 0:
        raise ValueError(f"the bound must be a positive number of 8-bit levels, got {bound}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}")
    if not len(points):
        raise ValueError("no images to measure on")
    previous = dict(capacitor.config.get("sampler", {}))
    current = Setting.from_sampler(previous)
    settings = list(dict.fromkeys([*candidates, *([current] if current is not None else [])]))
    if prune:  # cheapest first: loose dopri5, then the fixed-step settings by their known NFE
        settings.sort(key=lambda s: (s.fixed_step, s.nfe or 0, -(s.rtol or 0.0)))
    plates = capacitor.plates(direction)
    param = next(capacitor.network.parameters())
    say(f"reference: dopri5 at rtol = atol = {reference_tol:g} on {len(points)} image(s)")
    truth, ref, dtype = reference(
        capacitor, points, direction=direction, tol=reference_tol, dtype=reference_precision, batch_size=batch_size
    )
    keep = ref.landed.cpu()
    if not keep.any():
        raise CapacitorError(
            "no reference field line landed: the field does not carry these images to the other plate",
            "check that the images belong to the capacitor's source domain (or pass --to for the other direction)",
        )
    points, truth = points[keep.to(points.device)], truth[keep.to(truth.device)]
    curve: list[Point] = []
    skipped: list[Setting] = []

    def run(setting: Setting) -> Point:
        say(f"measuring {setting.label}")
        result = _integrate(capacitor.network, points, plates, setting.sampler(), batch_size, precision)
        landed = result.landed.cpu()
        errors = endpoint_error(_decode(capacitor, result.x, batch_size), truth).cpu()
        mean, p95, worst = summarise(errors, landed)
        nfe = result.nfe.cpu()
        point = Point(
            setting,
            nfe_mean=float(nfe.double().mean()),
            nfe_max=int(nfe.max()),
            error_mean=mean,
            error_p95=p95,
            error_max=worst,
            failed=int((~landed).sum()),
            seconds=result.seconds,
            current=setting == current,
        )
        curve.append(point)
        return point

    for setting in settings:
        best = pick(curve, bound)
        if prune and best is not None and _dominated(setting, best, curve, bound):
            skipped.append(setting)
            continue
        run(setting)
    for solver in ("dopri5", "heun", "euler"):
        for _ in range(refine):
            setting = _refinement(curve, bound, solver)
            best = pick(curve, bound)
            if setting is None or (best is not None and _dominated(setting, best, curve, bound)):
                break
            run(setting)
    curve.sort(key=lambda p: (p.setting.solver, p.setting.steps or 0, -(p.setting.rtol or 0.0)))
    return Choice(
        bound=bound,
        curve=curve,
        chosen=pick(curve, bound),
        reference={
            "solver": "dopri5",
            "rtol": reference_tol,
            "atol": reference_tol,
            "dtype": str(dtype).removeprefix("torch."),
            "nfe": _round(float(ref.nfe[ref.landed].double().mean())),
            "seconds": _round(ref.seconds),
        },
        images=int(keep.sum()),
        dropped=int((~keep).sum()),
        direction=direction,
        device=str(param.device),
        previous=previous,
        skipped=skipped,
    )


def _dominated(setting: Setting, best: Point, curve: Sequence[Point], bound: float) -> bool:
    """Whether `setting` cannot be cheaper than `best` (within the bound): a fixed-step setting costing at least as
    much, or a dopri5 setting tighter than one of the same solver already within it."""
    if setting.nfe is not None:
        return setting.nfe >= best.nfe_mean
    return any(
        p.setting.solver == "dopri5"
        and p.within(bound)
        and (p.setting.rtol or 0) >= (setting.rtol or 0)
        and (p.setting.atol or 0) >= (setting.atol or 0)
        for p in curve
    )


def measure(
    capacitor: Capacitor,
    images: Tensor,
    *,
    direction: Direction = "forward",
    **options: Any,
) -> Choice:
    """`measure_points` for source images [b, C, S, S] in [−1, 1] at the capacitor's size (encoded first for a
    latent capacitor); `options` are `measure_points`'s."""
    size, channels = capacitor.config["image"]["size"], capacitor.config["image"]["channels"]
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        raise CapacitorError(f"expected images [b, {channels}, {size}, {size}], got {list(images.shape)}")
    param = next(capacitor.network.parameters())
    points = capacitor.encode(images.to(param.device, torch.float32))
    return measure_points(capacitor, points, direction=direction, **options)


def load_folder(capacitor: Capacitor, folder: Path, limit: int | None = None) -> tuple[Tensor, list[tuple[Path, str]]]:
    """The first `limit` images of `folder` (sorted, recursive) as the capacitor sees them — its size, its resize
    mode, its channels — and the unreadable files with their reasons."""
    from efm_cli.images import ImageError, find_images, load, to_tensor
    from efm_cli.translate import _to_model

    files = find_images(folder)
    size, channels = capacitor.config["image"]["size"], capacitor.config["image"]["channels"]
    mode = capacitor.config.get("preprocessing", {}).get("resize", "resize")
    images, skipped = [], []
    for path in files:
        if limit is not None and len(images) >= limit:
            break
        try:
            images.append(to_tensor(load(path).rgb, size, mode=mode))
        except ImageError as error:
            skipped.append((path, str(error)))
    if not images:
        return torch.zeros(0, channels, size, size), skipped
    return _to_model(torch.stack(images), channels), skipped


# --- writing the choice into a capacitor folder ----------------------------------------------------------------------


def _within(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _embedded_roots() -> list[Path]:
    import efm_cli

    package = Path(efm_cli.__file__).resolve().parent
    return [env.embedded_weights_dir(), package / "weights", package.parent / "weights"]


def writable_folder(ref: str | os.PathLike[str]) -> Path:
    """The capacitor folder `write` may rewrite for reference `ref`: a local folder of the user's own (a training
    run stands for its model/). An embedded capacitor, anything in the Hub cache, a Hub or short name, a folder of
    another user or one that cannot be written are refused, before anything is measured."""
    text = os.fspath(ref)
    path = Path(text).expanduser()
    hint = "copy the capacitor into a folder of yours (cp -rL FOLDER mine), then: efm sampler mine --images DIR --write"
    if not path.is_dir():
        if hub.parse_hub_ref(text) is not None:
            raise UsageError(f"{text!r} is not a folder but a Hub capacitor: --write never changes a download", hint)
        found = registry.resolve(text)  # an unknown name is an error of its own, with what is available
        kind = "embedded, installed with efm" if any(_within(found, r) for r in _embedded_roots()) else "in the cache"
        raise UsageError(f"{text!r} names a capacitor {kind}: --write only changes a folder of yours", hint)
    folder = hub.locate_capacitor(path)[0]
    if any(_within(folder, root) for root in _embedded_roots()):
        raise UsageError(f"{folder} is an embedded capacitor, installed with efm: --write never changes it", hint)
    if _within(folder, hub.cache_dir()):
        raise UsageError(f"{folder} lies in the Hugging Face cache: --write never changes a download", hint)
    config = folder / CONFIG_NAME
    if config.is_symlink():
        raise CapacitorError(f"{config} is a symbolic link: --write only replaces a file of the folder itself", hint)
    owner = getattr(os, "geteuid", None)
    if owner is not None and folder.stat().st_uid != owner():
        raise CapacitorError(f"{folder} belongs to another user: --write only changes a folder of yours", hint)
    if not os.access(folder, os.W_OK | os.X_OK) or (config.exists() and not os.access(config, os.R_OK)):
        raise CapacitorError(f"{folder} cannot be written", "check its permissions")
    return folder


def with_choice(config: dict[str, Any], choice: Choice, origin: str) -> dict[str, Any]:
    """`config` with the chosen sampler and the measured curve (`sampler_choice`), validated; the sampler stays as it
    was when nothing is within the bound."""
    sampler = choice.sampler()
    updated = {**config, "sampler": sampler if sampler is not None else config.get("sampler", {})}
    updated["sampler_choice"] = choice.to_json(origin)
    validate(updated)
    return updated


def write(folder: str | os.PathLike[str], choice: Choice) -> Path:
    """Store `choice` in the config.json of capacitor folder `folder` (checked by `writable_folder`), atomically: a
    reader sees the old config or the new one, never a mix. Only `sampler` and `sampler_choice` change."""
    if choice.chosen is None:
        raise CapacitorError(
            f"no setting stays within {choice.bound:g} levels of the reference", "raise --bound, or keep the sampler"
        )
    folder = writable_folder(folder)
    config = read_config(folder)
    validate(config)
    write_json(folder / CONFIG_NAME, with_choice(config, choice, "efm sampler"))
    return folder / CONFIG_NAME


EXPORT_IMAGES = 4
"""Images `efm train` measures at its last export: the first of its sample grid's fixed source images. On one busy
CPU core the choice then takes 64 s for the 32×32 digits and 203 s for the 64×64 horses (four fifths of it the
reference): 2.3 % and 3.1 % of the embedded recipes' 46 and 110 minutes."""
EXPORT_SHARE = 0.05
"""The export's choice runs only when its estimated cost is at most this share of the run's training time so far;
shorter runs (tests, quick trials, short CPU runs at 64×64) keep the default sampler and say so."""
EXPORT_EVALUATIONS = 1300
"""Batched field evaluations the export's choice takes, for its estimate: about 700 for the reference and at most
about 600 for the pruned candidates (both embedded capacitors took 1000–1100)."""


def _evaluation_seconds(capacitor: Capacitor, points: Tensor) -> float:
    """Seconds of one batched field evaluation of `points` (the faster of two, after a first that warms up)."""
    network, param = capacitor.network, next(capacitor.network.parameters())
    x = points.to(param.device, param.dtype)
    z = torch.full((len(x),), sum(capacitor.plates("forward")) / 2, device=param.device, dtype=param.dtype)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            start = time.perf_counter()
            network(z, x)
            if param.device.type == "cuda":
                torch.cuda.synchronize(param.device)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def at_export(capacitor: Capacitor, points: Tensor, *, seconds: float | None = None) -> Choice | None:
    """Choose the sampler of a freshly trained capacitor on a few field-space points (a run's fixed sample inputs)
    and store it, with the curve, in `capacitor.config`. Cheap: the short candidate list, pruned, one refinement,
    the device's default reference precision, and only when the estimate is at most `EXPORT_SHARE` of the run's
    `seconds` of training. The capacitor's sampler stays when the choice is skipped, finds nothing within the bound
    or no reference line lands; `sampler_choice` then says why."""
    points = points[:EXPORT_IMAGES]
    if seconds is not None:
        estimate = EXPORT_EVALUATIONS * _evaluation_seconds(capacitor, points)
        if estimate > EXPORT_SHARE * seconds:
            reason = (
                f"not measured: about {estimate:.0f} s, more than {EXPORT_SHARE:.0%} of the run's {seconds:.0f} s; "
                "run efm sampler on held-out images"
            )
            capacitor.config = {**capacitor.config, "sampler_choice": {"chosen": None, "skipped": reason}}
            return None
    try:
        choice = measure_points(capacitor, points, candidates=QUICK_CANDIDATES, refine=1, prune=True)
    except CapacitorError as error:
        capacitor.config = {**capacitor.config, "sampler_choice": {"chosen": None, "error": error.message}}
        return None
    capacitor.config = with_choice(capacitor.config, choice, "efm train")
    return choice
