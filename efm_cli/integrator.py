"""Field-line integrator: moves each point of a batch along dx/dz = f_x / f_z from one plate to the other.

Every solver has the same signature, `solver(field, x, z0, z1, **options) -> Solution`, so swapping solvers is
swapping a function. Steps are per sample: each sample keeps its own step size and height, finished or failed samples
leave the batch, and the field is evaluated only on the samples still travelling. Runge–Kutta schemes are data
(`Tableau`) consumed by one generic step (`_rk_step`), as in torchdiffeq, whose shared step size — one hard sample
sets the pace of the whole batch — is what the per-sample control here avoids.

Nothing is silently wrong: a sample whose field is not finite, whose step size underflows or that exhausts its
evaluation budget is returned with its last good state and a `Status`; evaluations where the field barely climbs
(f_z ≤ fz_min·|f|, including f_z ≤ 0) are guarded and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal

import torch
from torch import Tensor

FieldFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""field(z [m], x [m, *shape]) -> (f_z [m], f_x [m, *shape]); samples must not interact (eval-mode network)."""

Slope = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""slope(t [m], y [m, S]) -> (dy/dt [m, S], climb [m]), climb = f_z/|f| in the direction of travel."""

Behind = Literal["stop", "follow"]


class Status(IntEnum):
    """Outcome of one sample's journey."""

    LANDED = 0
    NONFINITE = 1
    UNDERFLOW = 2
    MAX_NFE = 3
    UNRETURNED = 4


@dataclass(frozen=True)
class Tableau:
    """Butcher tableau of an explicit Runge–Kutta scheme; `error` holds b − b̂ for embedded pairs."""

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    error: tuple[float, ...] | None = None
    order: int = 1
    fsal: bool = False


EULER = Tableau(c=(0.0,), a=((),), b=(1.0,))
HEUN = Tableau(c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5), order=2)
DOPRI5 = Tableau(
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    error=(71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
    order=5,
    fsal=True,
)

SAFETY, IFACTOR, DFACTOR = 0.9, 10.0, 0.2


@dataclass
class Solution:
    """Endpoints and per-sample statistics of one integration."""

    x: Tensor
    z: Tensor
    status: Tensor
    nfe: Tensor
    accepted: Tensor
    rejected: Tensor
    guarded: Tensor
    crossed: Tensor

    @property
    def landed(self) -> Tensor:
        return self.status == Status.LANDED

    def summary(self) -> dict[str, Any]:
        """Batch totals for logs and reports."""
        return {
            "samples": len(self.status),
            "landed": int(self.landed.sum()),
            "failed": {s.name.lower(): int((self.status == s).sum()) for s in Status if s != Status.LANDED},
            "guarded": int((self.guarded > 0).sum()),
            "crossed": int(self.crossed.sum()),
            "nfe_mean": float(self.nfe.double().mean()) if len(self.nfe) else 0.0,
            "nfe_max": int(self.nfe.max()) if len(self.nfe) else 0,
            "nfe_total": int(self.nfe.sum()),
        }


def _combine(y: Tensor | None, h: Tensor, coefs: tuple[float, ...], ks: list[Tensor]) -> Tensor:
    """y + h·Σ coef_j·k_j (just the sum when y is None), skipping zero coefficients."""
    acc = None
    for coef, k in zip(coefs, ks, strict=False):
        if coef:
            acc = coef * k if acc is None else acc.add(k, alpha=coef)
    if acc is None:
        return y
    acc = h[:, None] * acc
    return acc if y is None else y + acc


def _rk_step(
    slope: Slope, tab: Tableau, t: Tensor, y: Tensor, h: Tensor, k1: Tensor, climb1: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """One step of any tableau: (y_new, error estimate or None, last stage, last stage's climb, min climb)."""
    ks, climb_min, climb = [k1], climb1, climb1
    for c, a in zip(tab.c[1:], tab.a[1:], strict=True):
        k, climb = slope(t + c * h, _combine(y, h, a, ks))
        ks.append(k)
        climb_min = torch.minimum(climb_min, climb)
    y_new = _combine(y, h, tab.b, ks)
    err = None if tab.error is None else _combine(None, h, tab.error, ks)
    return y_new, err, ks[-1], climb, climb_min


def _rms(v: Tensor) -> Tensor:
    """Root mean square per row: the error norm of Hairer's step-size control."""
    return v.square().mean(1).sqrt()


def _initial_step(
    slope: Slope, t0: Tensor, y0: Tensor, k0: Tensor, span: Tensor, rtol: float, atol: float, order: int
) -> Tensor:
    """Hairer's starting step, per sample (Solving ODEs I, §II.4): one extra evaluation."""
    scale = atol + rtol * y0.abs()
    d0, d1 = _rms(y0 / scale), _rms(k0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, span.abs())
    k1, _ = slope(t0 + span.sign() * h0, y0 + (span.sign() * h0)[:, None] * k0)
    d2 = _rms((k1 - k0) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1.0 / order))
    h = torch.minimum(torch.minimum(100 * h0, h1), span.abs())
    return torch.where(torch.isfinite(h), h, h0)  # a non-finite probe: let the first step find out


def _hermite(y0: Tensor, y1: Tensor, k0: Tensor, k1: Tensor, h: Tensor, theta: Tensor) -> Tensor:
    """Cubic Hermite interpolant of a step at fraction theta (per row), from both ends' values and slopes."""
    th = theta[:, None]
    h00, h10 = 2 * th**3 - 3 * th**2 + 1, th**3 - 2 * th**2 + th
    h01, h11 = -2 * th**3 + 3 * th**2, th**3 - th**2
    return h00 * y0 + h10 * h[:, None] * k0 + h01 * y1 + h11 * h[:, None] * k1


def _locate(y0: Tensor, y1: Tensor, k0: Tensor, k1: Tensor, h: Tensor, event: Callable[[Tensor], Tensor]) -> Tensor:
    """Fraction of a step where `event` changes sign (event(y0) ≥ 0 > event(y1)): bisection on the interpolant."""
    lo, hi = torch.zeros_like(h), torch.ones_like(h)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        below = event(_hermite(y0, y1, k0, k1, h, mid)) < 0
        lo, hi = torch.where(below, lo, mid), torch.where(below, mid, hi)
    return hi


@dataclass
class _Rows:
    """Full-batch rows of one drive: each sample's results, filled in as it leaves the active set."""

    y: Tensor
    t: Tensor
    status: Tensor
    nfe: Tensor
    accepted: Tensor
    rejected: Tensor
    guarded: Tensor
    climb: Tensor
    hit: Tensor

    @classmethod
    def start(cls, y0: Tensor, t0: Tensor) -> _Rows:
        b, dev = len(y0), y0.device
        counts = [torch.zeros(b, dtype=torch.long, device=dev) for _ in range(4)]
        return cls(
            y0.clone(),
            t0.clone(),
            torch.zeros(b, dtype=torch.int8, device=dev),
            *counts,
            climb=torch.zeros(b, dtype=y0.dtype, device=dev),
            hit=torch.zeros(b, dtype=torch.bool, device=dev),
        )


_ROW_FIELDS = ("y", "t", "status", "nfe", "accepted", "rejected", "guarded", "climb", "hit")


def _drive(
    slope: Slope,
    tab: Tableau,
    y0: Tensor,
    t0: Tensor,
    t1: Tensor,
    *,
    adaptive: bool,
    steps: int,
    rtol: float,
    atol: float,
    max_nfe: int,
    min_step: float,
    fz_min: float,
    event: Callable[[Tensor], Tensor] | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    sync_every: int = 1,
    phase: str = "slab",
    origin: Tensor | None = None,
) -> _Rows:
    """Integrate y' = slope(t, y) from t0 to t1 per sample; with `event`, stop where event(y) crosses from ≥ 0 to < 0.

    Finished and failed samples are frozen (zero step) until the next compaction, every `sync_every` iterations:
    compaction needs the host to know who finished, so on a GPU a larger value spares a sync per step.
    `origin` maps rows to the caller's batch indices for the callback.
    """
    run = _Rows.start(y0, t0)
    span = t1 - t0
    tol = 1e-9 * span.abs()
    h = span.abs() / steps
    a = _Rows.start(y0, t0)  # the active rows, compacted as samples leave
    idx = torch.arange(len(y0), device=y0.device)
    t_end, h_min = t1, min_step * span.abs()
    live = torch.ones(len(y0), dtype=torch.bool, device=y0.device)
    after_reject = torch.zeros_like(live)
    k = None
    if tab.fsal or adaptive:
        k, a.climb = slope(a.t, a.y)
        a.nfe += 1
        live = torch.isfinite(k).all(1)
        a.status[~live] = Status.NONFINITE
        if adaptive:
            h = _initial_step(slope, a.t, a.y, k, span, rtol, atol, tab.order)
            a.nfe += 1
    iteration = 0
    while True:
        if not tab.fsal:
            k, a.climb = slope(a.t, a.y)
            a.nfe += live
        remaining = t_end - a.t
        last = live & ((a.accepted == steps - 1) if not adaptive else (h >= remaining.abs() - tol))
        step = torch.where(last, remaining, remaining.sign() * torch.minimum(h, remaining.abs())) * live
        y_new, err, k_last, climb_last, climb_min = _rk_step(slope, tab, a.t, a.y, step, k, a.climb)
        a.nfe += live * (len(tab.c) - 1)
        finite = torch.isfinite(y_new).all(1)  # every scheme here weighs k1 in y_new; DP5's last stage is not
        if tab.fsal:
            finite &= torch.isfinite(k_last).all(1)
        if adaptive:
            scale = atol + rtol * torch.maximum(a.y.abs(), y_new.abs())
            ratio = _rms(err / scale)
            ok = finite & (ratio <= 1.0)
            factor = (SAFETY * ratio.clamp_min(1e-10) ** (-1.0 / tab.order)).clamp(DFACTOR, IFACTOR)
            factor = torch.where(ok & ~after_reject, factor, factor.clamp(max=1.0))
            factor = torch.where(finite, factor, DFACTOR)
            # From the step actually taken: a last step clipped to the plate and rejected must shrink.
            h = torch.where(live, step.abs() * factor, h)
            after_reject = live & ~ok
        else:
            ok = finite
        accept = live & ok
        if event is not None:
            fired = accept & (event(a.y) >= 0) & (event(y_new) < 0)
            if fired.any():
                # Locate on the interpolant, then take the exact step to there: as accurate as the integration.
                f = fired.nonzero().flatten()
                theta = _locate(a.y[f], y_new[f], k[f], k_last[f], step[f], event)
                y_new[f], _, k_last[f], climb_last[f], _ = _rk_step(
                    slope, tab, a.t[f], a.y[f], theta * step[f], k[f], a.climb[f]
                )
                a.nfe[f] += len(tab.c) - 1
            a.hit |= fired
        else:
            fired = torch.zeros_like(accept)
        a.y = torch.where(accept[:, None], y_new, a.y)
        a.t = torch.where(accept, torch.where(last, t_end, a.t + step), a.t)
        if tab.fsal:  # the last stage is the next step's first, at the point just reached
            k = torch.where(accept[:, None], k_last, k)
            a.climb = torch.where(accept, climb_last, a.climb)
        a.accepted += accept
        a.rejected += live & ~ok
        a.guarded += accept & (climb_min < fz_min)
        if callback is not None:
            rows = idx if origin is None else origin[idx]
            callback({"phase": phase, "index": rows, "t": a.t, "y": a.y, "accepted": accept, "iteration": iteration})
        done = accept & (last | fired)
        failing = live & ~done
        underflow = adaptive & ~(h >= h_min)  # NaN counts
        a.status = torch.where(
            failing & ~finite & (underflow | (not adaptive)),
            Status.NONFINITE,
            torch.where(
                failing & underflow,
                Status.UNDERFLOW,
                torch.where(failing & (a.nfe >= max_nfe), Status.MAX_NFE, a.status),
            ),
        ).to(torch.int8)
        live = live & ~done & (a.status == Status.LANDED)
        iteration += 1
        if iteration % sync_every:
            continue
        leave = ~live
        if leave.any():
            gone = idx[leave]
            for name in _ROW_FIELDS:
                getattr(run, name)[gone] = getattr(a, name)[leave]
            keep = live
            idx, t_end, h, h_min, tol, k, live, after_reject = (
                v[keep] for v in (idx, t_end, h, h_min, tol, k, live, after_reject)
            )
            for name in _ROW_FIELDS:
                setattr(a, name, getattr(a, name)[keep])
        if not len(idx):
            return run


def _z_slope(field: FieldFn, shape: torch.Size, fz_min: float) -> Slope:
    """dx/dz = f_x / f_z, with f_z raised to fz_min·|f| where the field barely climbs (the guard)."""

    def slope(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = field(z, x.view(len(x), *shape))
        fz, fx = fz.reshape(len(x)).to(x.dtype), fx.reshape(len(x), -1).to(x.dtype)
        norm = (fz.square() + fx.square().sum(1)).sqrt()
        climb = torch.where(norm > 0, fz / norm, torch.zeros_like(fz))
        denom = torch.maximum(fz, fz_min * norm).clamp_min(torch.finfo(x.dtype).tiny)
        finite = torch.isfinite(norm)[:, None]  # an infinite f_z would otherwise pass as a zero slope
        return torch.where(finite, fx / denom[:, None], torch.nan), climb

    return slope


def _arc_slope(field: FieldFn, shape: torch.Size, sign: float) -> Slope:
    """Unit tangent of the field line by arc length, state (z, x): lines that turn around in z stay integrable."""

    def slope(s: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = field(y[:, 0], y[:, 1:].view(len(y), *shape))
        f = torch.cat([fz.reshape(len(y), 1), fx.reshape(len(y), -1)], dim=1).to(y.dtype)
        norm = f.norm(dim=1, keepdim=True)
        unit = sign * f / norm.clamp_min(torch.finfo(y.dtype).tiny)
        return unit, unit[:, 0] * sign

    return slope


def _integrate(
    tab: Tableau,
    adaptive: bool,
    field: FieldFn,
    x: Tensor,
    z0: float | Tensor,
    z1: float,
    *,
    steps: int = 40,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    max_nfe: int = 2000,
    min_step: float = 1e-8,
    fz_min: float = 1e-3,
    behind: Literal["stop", "report", "follow"] = "stop",
    behind_length: float | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    sync_every: int = 1,
) -> Solution:
    """Shared body of the solvers; see `dopri5` for the options."""
    b, shape = len(x), x.shape[1:]
    t0 = torch.as_tensor(z0, dtype=x.dtype, device=x.device).expand(b).clone()
    t1 = torch.full((b,), float(z1), dtype=x.dtype, device=x.device)
    rising = t1 > t0
    if b == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return Solution(x.clone(), t0, empty.to(torch.int8), empty, empty, empty, empty, empty.bool())
    if not (rising.all() or (t1 < t0).all()):
        raise ValueError("every sample must start away from the plate it travels to, all on the same side of it")
    opts = {
        "rtol": rtol,
        "atol": atol,
        "max_nfe": max_nfe,
        "min_step": min_step,
        "callback": callback,
        "sync_every": sync_every,
    }
    run = _drive(
        _z_slope(field, shape, fz_min),
        tab,
        x.reshape(b, -1),
        t0,
        t1,
        adaptive=adaptive,
        steps=steps,
        fz_min=fz_min,
        **opts,
    )
    crossed = torch.zeros(b, dtype=torch.bool, device=x.device)
    if behind != "stop":
        landed = (run.status == Status.LANDED).nonzero().flatten()
        climb = run.climb[landed]
        if not tab.fsal and len(landed):
            _, climb = _z_slope(field, shape, fz_min)(run.t[landed], run.y[landed])
            run.nfe[landed] += 1
        crossed[landed] = climb > fz_min
    if behind == "follow" and crossed.any():
        rows = crossed.nonzero().flatten()
        sign = 1.0 if bool(rising[0]) else -1.0
        length = 10.0 * float((t1 - t0).abs().max()) if behind_length is None else behind_length
        start = torch.cat([run.t[rows, None], run.y[rows]], dim=1)
        arc = _drive(
            _arc_slope(field, shape, sign),
            DOPRI5,
            start,
            torch.zeros(len(rows), dtype=x.dtype, device=x.device),
            torch.full((len(rows),), length, dtype=x.dtype, device=x.device),
            adaptive=True,
            steps=1,
            fz_min=-math.inf,
            event=lambda y: sign * (y[:, 0] - z1),
            phase="behind",
            origin=rows,
            **opts,
        )
        arc.y[arc.hit, 0] = z1
        run.t[rows], run.y[rows] = arc.y[:, 0], arc.y[:, 1:]
        run.status[rows] = torch.where((arc.status == Status.LANDED) & ~arc.hit, Status.UNRETURNED, arc.status).to(
            torch.int8
        )
        for name in ("nfe", "accepted", "rejected"):
            getattr(run, name)[rows] += getattr(arc, name)
    return Solution(
        x=run.y.view(b, *shape),
        z=run.t,
        status=run.status,
        nfe=run.nfe,
        accepted=run.accepted,
        rejected=run.rejected,
        guarded=run.guarded,
        crossed=crossed,
    )


def euler(field: FieldFn, x: Tensor, z0: float | Tensor, z1: float, **options: Any) -> Solution:
    """Explicit Euler in z with `steps` equal steps: the official EFM/IFM sampler (docs/method.md §5), for parity."""
    return _integrate(EULER, False, field, x, z0, z1, **options)


def heun(field: FieldFn, x: Tensor, z0: float | Tensor, z1: float, **options: Any) -> Solution:
    """Heun's second-order method (explicit trapezoid) in z with `steps` equal steps."""
    return _integrate(HEUN, False, field, x, z0, z1, **options)


def dopri5(field: FieldFn, x: Tensor, z0: float | Tensor, z1: float, **options: Any) -> Solution:
    """Dormand–Prince 5(4) with FSAL and per-sample error control (Dormand & Prince, 1980).

    Options: `rtol`, `atol` (error control), `max_nfe` (per-sample evaluation cap), `min_step` (step-size floor,
    relative to the plate distance), `fz_min` (guard: f_z is raised to fz_min·|f|, and counted, where it is
    smaller), `behind` ("stop"; "report" marks lines that continue through the destination plate; "follow" also
    follows them by arc length until they come back to the plate from behind, docs/method.md §1), `behind_length`
    (arc-length cap for that), `callback` (called with a dict after every step), `sync_every` (compaction period).
    """
    return _integrate(DOPRI5, True, field, x, z0, z1, **options)


SOLVERS: dict[str, Callable[..., Solution]] = {"dopri5": dopri5, "heun": heun, "euler": euler}


def integrate(
    field: FieldFn, x: Tensor, z0: float | Tensor, z1: float, *, solver: str = "dopri5", **options: Any
) -> Solution:
    """Move the batch `x` at heights `z0` along the field lines of `field` to the plate at height `z1`."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return SOLVERS[solver](field, x, z0, z1, **options)
