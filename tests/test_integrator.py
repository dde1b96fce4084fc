"""Field-line integrator against closed-form lines: accuracy, per-sample control, guards, behind-the-plate.

Every field here has lines known exactly, so each assertion compares an endpoint with the truth rather than with
another solver. Per-sample constants (rotation frequency, growth rate, flags) ride along as extra state coordinates
whose slope is zero: the field sees only the samples still travelling, so it cannot look them up by batch index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise

import pytest
import torch
from torch import Tensor

from efm_cli.integrator import Solution, Status, dopri5, euler, heun, integrate

F64 = torch.float64
Field = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def rotation(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """x = (u, v, w): (u, v) turns at angular rate w per unit z."""
    u, v, w = x.unbind(1)
    return torch.ones_like(z), torch.stack([-w * v, w * u, torch.zeros_like(w)], 1)


def rotated(x0: Tensor, z0: Tensor | float, z1: Tensor | float) -> Tensor:
    """Closed-form endpoint of `rotation`."""
    u, v, w = x0.unbind(1)
    angle = w * (torch.as_tensor(z1, dtype=x0.dtype) - torch.as_tensor(z0, dtype=x0.dtype))
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([c * u - s * v, s * u + c * v, w], 1)


def rotation_batch(w: list[float], dtype: torch.dtype = F64) -> Tensor:
    n = len(w)
    return torch.stack([torch.ones(n, dtype=dtype), torch.zeros(n, dtype=dtype), torch.tensor(w, dtype=dtype)], 1)


def growth(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """x = (y, λ): dy/dz = λ·y."""
    return torch.ones_like(z), torch.stack([x[:, 1] * x[:, 0], torch.zeros_like(z)], 1)


def counting(field: Field, sizes: list[int]) -> Field:
    """The same field, recording how many samples each call receives."""

    def wrapped(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        sizes.append(len(z))
        return field(z, x)

    return wrapped


def flagged(field: Field, bad: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> Field:
    """`field` for samples whose last coordinate is 0, `bad(z, x)` for those where it is 1 (the flag is inert)."""

    def wrapped(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = field(z, x[:, :-1])
        bz, bx = bad(z, x[:, :-1])
        hit = x[:, -1] > 0
        fz = torch.where(hit, bz, fz)
        fx = torch.where(hit[:, None], bx, fx)
        return fz, torch.cat([fx, torch.zeros_like(fx[:, :1])], 1)

    return wrapped


def with_flags(x: Tensor, flags: list[int]) -> Tensor:
    return torch.cat([x, torch.tensor(flags, dtype=x.dtype)[:, None]], 1)


def circle(plate: float) -> Field:
    """f = (x + 1, −(z − plate)): circles centred at (plate, −1); they cross that plate and come back from behind."""

    def field(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, 0] + 1, -(z - plate)[:, None]

    return field


# --- accuracy -----------------------------------------------------------------------------------------------


def test_dopri5_global_error_follows_the_tolerance() -> None:
    x0 = rotation_batch([0.5, 1.0, 2.0, 3.0])
    exact = rotated(x0, 0.0, 1.0)
    errors = []
    for tol in (1e-3, 1e-5, 1e-7):
        sol = dopri5(rotation, x0, 0.0, 1.0, rtol=tol, atol=tol)
        err = (sol.x - exact).norm(dim=1)
        assert sol.landed.all()
        assert (err <= 5 * tol * (1 + exact[:, :2].norm(dim=1))).all(), (tol, err)
        errors.append(float(err.mean()))
    assert errors[0] > 10 * errors[1] > 100 * errors[2]


@pytest.mark.parametrize("z1", [1.5, -1.5])
def test_dopri5_exponential_growth(z1: float) -> None:
    lam = torch.linspace(-2, 2, 9, dtype=F64)
    x0 = torch.stack([torch.full_like(lam, 0.7), lam], 1)
    for tol in (1e-4, 1e-8):
        sol = dopri5(growth, x0, 0.0, z1, rtol=tol, atol=tol)
        exact = 0.7 * torch.exp(lam * z1)
        assert ((sol.x[:, 0] - exact).abs() <= 5 * tol * (1 + exact.abs())).all()
        assert torch.equal(sol.x[:, 1], lam)


def test_positive_rescaling_of_the_field_keeps_the_lines() -> None:
    """dx/dz = x/(1 + z) in both plain and rescaled form: only the direction of f matters."""

    def plain(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return 1 + z, x

    def rescaled(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        g = torch.exp(torch.sin(3 * x[:, 0]) + z) * (2 + x[:, 0].square())
        return (1 + z) * g, x * g[:, None]

    x0 = torch.linspace(-1, 1, 5, dtype=F64)[:, None]
    for z0, z1 in ((0.0, 2.0), (2.0, 0.0)):
        exact = x0 * (1 + z1) / (1 + z0)
        a, b = dopri5(plain, x0, z0, z1), dopri5(rescaled, x0, z0, z1)
        torch.testing.assert_close(a.x, exact, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(b.x, exact, rtol=1e-9, atol=1e-9)
        assert (a.guarded == 0).all() and (b.guarded == 0).all()


@pytest.mark.parametrize(("solver", "order", "stages"), [(euler, 1, 1), (heun, 2, 2)])
def test_fixed_step_convergence_order(solver: Callable[..., Solution], order: int, stages: int) -> None:
    x0 = rotation_batch([0.5, 1.0, 2.0])
    exact = rotated(x0, 0.0, 1.0)
    errors = []
    for steps in (20, 40, 80):
        sol = solver(rotation, x0, 0.0, 1.0, steps=steps)
        assert (sol.nfe == stages * steps).all() and (sol.accepted == steps).all()
        assert (sol.z == 1.0).all()
        errors.append((sol.x - exact).norm(dim=1))
    for coarse, fine in pairwise(errors):
        assert torch.allclose(torch.log2(coarse / fine), torch.full_like(coarse, float(order)), atol=0.15)


@pytest.mark.parametrize("solver", ["dopri5", "heun", "euler"])
@pytest.mark.parametrize(("z0", "z1"), [((0.0, 0.3, 0.9, 1.4), 2.0), ((2.0, 1.7, 1.1, 0.6), 0.0)])
def test_both_directions_with_per_sample_start(solver: str, z0: tuple[float, ...], z1: float) -> None:
    x0 = rotation_batch([0.5, 1.0, 1.5, 2.0])
    start = torch.tensor(z0, dtype=F64)
    sol = integrate(rotation, x0, start, z1, solver=solver, steps=400)
    assert sol.landed.all()
    assert torch.equal(sol.z, torch.full_like(start, z1))
    exact = rotated(x0, start, z1)
    tol = {"dopri5": 1e-3, "heun": 1e-4, "euler": 2e-2}[solver]
    assert (sol.x - exact).norm(dim=1).max() < tol


def test_float32_lands_bitwise_on_the_plate() -> None:
    x0 = rotation_batch([0.3, 1.0, 7.0], dtype=torch.float32)
    z0 = torch.tensor([0.0, 0.1, 0.7])
    for solver in ("dopri5", "heun", "euler"):
        sol = integrate(rotation, x0, z0, 0.9, solver=solver)
        assert torch.equal(sol.z, torch.full((3,), 0.9))


# --- per-sample control ---------------------------------------------------------------------------------


def test_easy_samples_leave_the_batch_early() -> None:
    w = [0.1, 0.2, 0.1, 0.3, 20.0, 25.0, 20.0, 22.0]
    x0 = rotation_batch(w)
    exact = rotated(x0, 0.0, 1.0)
    sizes: list[int] = []
    sol = dopri5(counting(rotation, sizes), x0, 0.0, 1.0, sync_every=1)
    easy, hard = sol.nfe[:4], sol.nfe[4:]
    assert sol.landed.all()
    assert easy.max() * 5 < hard.min()
    assert ((sol.x - exact).norm(dim=1)[:4] < 1e-6).all()
    assert ((sol.x - exact).norm(dim=1)[4:] < 3e-3).all()  # three turns at rtol 1e-4
    # Each call evaluates exactly the travelling samples: the batch shrinks as soon as the easy ones land.
    assert sizes == [int((sol.nfe > call).sum()) for call in range(len(sizes))]

    later: list[int] = []
    lazy = dopri5(counting(rotation, later), x0, 0.0, 1.0, sync_every=4)
    for name in ("x", "z", "status", "nfe", "accepted", "rejected", "guarded"):
        assert torch.equal(getattr(lazy, name), getattr(sol, name)), name
    assert later.count(len(w)) > sizes.count(len(w)) and sum(later) > sum(sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["dopri5", "heun", "euler"])
def test_dtype_shape_and_device_are_kept(dtype: torch.dtype, solver: str) -> None:
    rate = torch.tensor([0.5, -0.3, 0.2], dtype=dtype)[None, :, None, None]

    def field(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        assert x.shape[1:] == (3, 4, 5) and x.dtype == dtype
        return torch.ones_like(z), rate * x

    x0 = torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=dtype)
    sol = integrate(field, x0, 0.0, 1.0, solver=solver, steps=200)
    assert sol.x.shape == x0.shape and sol.x.dtype == dtype and sol.z.dtype == dtype
    assert sol.status.dtype == torch.int8 and sol.crossed.dtype == torch.bool
    for counts in (sol.nfe, sol.accepted, sol.rejected, sol.guarded):
        assert counts.dtype == torch.int64 and counts.shape == (6,)
    for t in (sol.x, sol.z, sol.status, sol.nfe, sol.crossed):
        assert t.device == x0.device
    torch.testing.assert_close(sol.x, x0 * torch.exp(rate), rtol=5e-3, atol=1e-4)


# --- guards and failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["dopri5", "heun", "euler"])
def test_backward_field_is_guarded_and_others_unaffected(solver: str) -> None:
    def backward(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = rotation(z, x)
        return -fz, fx

    x0 = rotation_batch([0.5, 1.0, 1.5, 2.0])
    flags = [0, 1, 0, 1]
    sol = integrate(flagged(rotation, backward), with_flags(x0, flags), 0.0, 1.0, solver=solver)
    alone = integrate(flagged(rotation, backward), with_flags(x0[[0, 2]], [0, 0]), 0.0, 1.0, solver=solver)
    bad = torch.tensor(flags, dtype=torch.bool)
    assert ((sol.guarded[bad] > 0) | (sol.status[bad] != Status.LANDED)).all()
    assert (sol.guarded[~bad] == 0).all() and sol.landed[~bad].all()
    assert torch.equal(sol.x[~bad], alone.x) and torch.equal(sol.nfe[~bad], alone.nfe)
    assert sol.summary()["guarded"] == 2


@pytest.mark.parametrize("solver", ["dopri5", "heun", "euler"])
def test_nonfinite_field_returns_last_finite_state(solver: str) -> None:
    def poisoned(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = rotation(z, x)
        return fz, torch.where((z > 0.5)[:, None], torch.nan, fx)

    x0 = rotation_batch([0.5, 1.0, 1.5, 2.0])
    flags = [1, 0, 1, 0]
    sol = integrate(flagged(rotation, poisoned), with_flags(x0, flags), 0.0, 1.0, solver=solver, steps=400)
    bad = torch.tensor(flags, dtype=torch.bool)
    assert (sol.status[bad] == Status.NONFINITE).all()
    assert torch.isfinite(sol.x).all()
    assert ((sol.z[bad] > 0.45) & (sol.z[bad] < 0.51)).all()
    tol = {"dopri5": 1e-3, "heun": 1e-4, "euler": 1e-2}[solver]
    assert (sol.x[bad, :3] - rotated(x0[bad], 0.0, sol.z[bad])).norm(dim=1).max() < tol
    assert sol.landed[~bad].all()
    assert (sol.x[~bad, :3] - rotated(x0[~bad], 0.0, 1.0)).norm(dim=1).max() < tol
    assert sol.summary()["failed"]["nonfinite"] == 2


@pytest.mark.parametrize(
    "value",
    [
        torch.nan,
        torch.inf,
    ],
)
@pytest.mark.parametrize("solver", ["dopri5", "heun", "euler"])
def test_field_nonfinite_at_the_start(solver: str, value: float) -> None:
    def broken(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = rotation(z, x)
        return torch.full_like(fz, value), fx

    x0 = with_flags(rotation_batch([0.5, 1.0]), [1, 0])
    sol = integrate(flagged(rotation, broken), x0, 0.0, 1.0, solver=solver)
    assert sol.status.tolist() == [Status.NONFINITE, Status.LANDED]
    assert torch.equal(sol.x[0], x0[0]) and sol.z[0] == 0.0 and sol.nfe[0] <= 2


def test_field_nonfinite_just_after_the_start_is_nonfinite() -> None:
    """The starting-step probe (z0 + h0, h0 ≈ 0.01 here) lands where the field is NaN: NONFINITE, not MAX_NFE."""

    def poisoned(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = rotation(z, x)
        return fz, torch.where((z > 1e-3)[:, None], torch.nan, fx)

    sol = dopri5(poisoned, rotation_batch([10.0]), 0.0, 1.0)
    assert sol.status.tolist() == [Status.NONFINITE]


def test_a_rejected_step_is_not_retried_unchanged() -> None:
    """(u, v) starts turning just before the plate, after the controller has grown h past the remaining distance."""
    ends: list[float] = []

    def late_turn(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        ends.append(float(z[0]))
        w = 30 * torch.sigmoid((z - 0.9965) / 0.003)
        return torch.ones_like(z), torch.stack([-w * x[:, 1], w * x[:, 0]], 1)

    sol = dopri5(late_turn, torch.tensor([[1.0, 0.0]], dtype=F64), 0.0, 1.0)
    attempts = ends[2 + 4 :: 6]  # after the two start-up calls, the fifth stage of each try sits at z + h
    assert len(attempts) == int(sol.accepted + sol.rejected)
    assert all(a != b for a, b in pairwise(attempts))


def test_slope_blow_up_underflows_without_guard_and_is_guarded_with_it() -> None:
    """dx/dz = 1/(z − 0.5)² for flagged samples: the line escapes to infinity at z = 0.5."""

    def singular(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fz, fx = rotation(z, x)
        return fz, fx + (1 / (z - 0.5).square())[:, None] * torch.tensor([1.0, 0.0, 0.0], dtype=x.dtype)

    x0 = rotation_batch([0.5, 1.0, 1.5, 2.0])
    flags = [0, 1, 0, 1]
    field = flagged(rotation, singular)
    bad = torch.tensor(flags, dtype=torch.bool)
    sol = dopri5(field, with_flags(x0, flags), 0.0, 1.0, fz_min=0.0)
    assert torch.isin(sol.status[bad], torch.tensor([Status.UNDERFLOW, Status.MAX_NFE], dtype=torch.int8)).all()
    assert (sol.z[bad] < 0.5).all() and torch.isfinite(sol.x).all()
    assert sol.landed[~bad].all()
    assert (sol.x[~bad, :3] - rotated(x0[~bad], 0.0, 1.0)).norm(dim=1).max() < 1e-3
    summary = sol.summary()
    assert summary["landed"] == 2 and summary["failed"]["underflow"] + summary["failed"]["max_nfe"] == 2

    guarded = dopri5(field, with_flags(x0, flags), 0.0, 1.0)
    assert (guarded.guarded[bad] > 0).all() and (guarded.guarded[~bad] == 0).all()


@pytest.mark.parametrize("solver", ["dopri5", "heun", "euler"])
def test_evaluation_cap(solver: str) -> None:
    x0 = rotation_batch([0.1, 30.0, 0.2, 40.0])
    sol = integrate(rotation, x0, 0.0, 1.0, solver=solver, max_nfe=30)
    per_iteration = {"dopri5": 6, "heun": 2, "euler": 1}[solver]
    assert (sol.nfe < 30 + per_iteration).all()
    failed = sol.status == Status.MAX_NFE
    assert (sol.z[failed] < 1.0).all() and (sol.z[~sol.landed] == sol.z[failed]).all()
    if solver == "dopri5":
        assert failed.tolist() == [False, True, False, True]
    else:
        assert failed.all()
    summary = sol.summary()
    assert summary["failed"]["max_nfe"] == int(failed.sum())
    assert summary["landed"] == int(sol.landed.sum())
    assert summary["nfe_total"] == int(sol.nfe.sum()) and summary["nfe_max"] == int(sol.nfe.max())


def test_start_on_the_destination_plate_is_refused() -> None:
    with pytest.raises(ValueError, match="start away"):
        dopri5(rotation, rotation_batch([1.0, 2.0]), torch.tensor([0.0, 1.0], dtype=F64), 1.0)


# --- behind the plate ------------------------------------------------------------------------------------

CIRCLE_X0 = torch.tensor([[0.0], [0.5], [-0.5], [2.0]], dtype=F64)
CIRCLE_GAP = torch.tensor([1.0, 0.7, 0.3, 0.9], dtype=F64)  # distance of the start from the destination plate


@pytest.mark.parametrize(("rising", "plate"), [(True, 1.0), (False, 0.0)])
def test_behind_the_plate_on_circles(rising: bool, plate: float) -> None:
    """Lines cross the plate at −1 + R, circle behind it and return at −1 − R."""
    z0 = plate - CIRCLE_GAP if rising else plate + CIRCLE_GAP
    radius = (CIRCLE_GAP.square() + (CIRCLE_X0[:, 0] + 1).square()).sqrt()
    field = circle(plate)
    stop = dopri5(field, CIRCLE_X0, z0, plate)
    report = dopri5(field, CIRCLE_X0, z0, plate, behind="report")
    follow = dopri5(field, CIRCLE_X0, z0, plate, behind="follow")
    for sol in (stop, report, follow):
        assert sol.landed.all() and torch.equal(sol.z, torch.full_like(z0, plate))
    assert not stop.crossed.any() and report.crossed.all() and follow.crossed.all()
    assert torch.equal(report.x, stop.x)
    assert ((stop.x[:, 0] - (radius - 1)).abs() < 1e-4 * radius).all()
    assert ((follow.x[:, 0] - (-1 - radius)).abs() < 5e-3 * radius).all()
    assert (follow.nfe > stop.nfe).all()


def test_behind_the_plate_return_is_as_accurate_as_the_tolerance() -> None:
    radius = (CIRCLE_GAP.square() + (CIRCLE_X0[:, 0] + 1).square()).sqrt()
    sol = dopri5(circle(1.0), CIRCLE_X0, 1.0 - CIRCLE_GAP, 1.0, behind="follow", rtol=1e-6, atol=1e-6)
    assert ((sol.x[:, 0] - (-1 - radius)).abs() < 2e-5 * radius).all()


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_fixed_step_solvers_report_crossing(solver: str) -> None:
    stop = integrate(circle(1.0), CIRCLE_X0, 1.0 - CIRCLE_GAP, 1.0, solver=solver)
    report = integrate(circle(1.0), CIRCLE_X0, 1.0 - CIRCLE_GAP, 1.0, solver=solver, behind="report")
    assert report.crossed.all() and not stop.crossed.any()
    assert torch.equal(report.nfe, stop.nfe + 1)


def test_short_behind_length_leaves_lines_unreturned() -> None:
    sol = dopri5(circle(1.0), CIRCLE_X0, 1.0 - CIRCLE_GAP, 1.0, behind="follow", behind_length=0.5)
    assert (sol.status == Status.UNRETURNED).all()
    assert (sol.z > 1.0).all() and torch.isfinite(sol.x).all()
    assert sol.summary()["failed"]["unreturned"] == 4


def test_only_crossing_lines_are_followed() -> None:
    """Flagged samples keep x on a field whose f_z falls to zero at the plate: they land and stop there."""

    def stopping(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 - z, torch.zeros_like(x)

    x0 = with_flags(torch.tensor([[0.5], [0.0], [0.3], [0.5]], dtype=F64), [1, 0, 1, 0])
    sol = dopri5(flagged(circle(1.0), stopping), x0, 0.0, 1.0, behind="follow")
    assert sol.crossed.tolist() == [False, True, False, True]
    assert sol.landed.all()
    radius = (1 + (x0[:, 0] + 1).square()).sqrt()
    crossed = sol.crossed
    assert ((sol.x[crossed, 0] - (-1 - radius[crossed])).abs() < 5e-3 * radius[crossed]).all()
    assert torch.equal(sol.x[~crossed], x0[~crossed])


# --- callback and API -------------------------------------------------------------------------------------


def test_callback_records_every_iteration_and_the_trajectory() -> None:
    w = [0.5, 8.0, 1.0]
    x0 = rotation_batch(w)
    events: list[dict] = []
    sol = dopri5(rotation, x0, 0.0, 1.0, callback=lambda info: events.append({k: v for k, v in info.items()}))
    assert [e["iteration"] for e in events] == list(range(len(events)))
    assert {e["phase"] for e in events} == {"slab"}
    assert len(events) == int((sol.accepted + sol.rejected).max())
    paths: dict[int, list[tuple[float, Tensor]]] = {i: [] for i in range(len(w))}
    for e in events:
        for row in e["accepted"].nonzero().flatten().tolist():
            paths[int(e["index"][row])].append((float(e["t"][row]), e["y"][row].clone()))
    for i, path in paths.items():
        heights = [t for t, _ in path]
        assert len(path) == int(sol.accepted[i])
        assert heights == sorted(heights) and heights[-1] == 1.0
        assert torch.equal(path[-1][1], sol.x[i])
        for t, y in path:
            assert (y - rotated(x0[i : i + 1], 0.0, t)[0]).norm() < 1e-3


def test_behind_phase_callback_indices_refer_to_the_batch() -> None:
    def stopping(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return 1.0 - z, torch.zeros_like(x)

    x0 = with_flags(torch.tensor([[0.5], [0.0], [0.3], [0.5]], dtype=F64), [1, 0, 1, 0])
    seen: set[int] = set()

    def record(info: dict) -> None:
        if info["phase"] == "behind":
            seen.update(info["index"].tolist())

    dopri5(flagged(circle(1.0), stopping), x0, 0.0, 1.0, behind="follow", callback=record)
    assert seen == {1, 3}


def test_named_solvers_are_the_functions() -> None:
    x0 = rotation_batch([0.5, 2.0])
    for name, fn in (("dopri5", dopri5), ("heun", heun), ("euler", euler)):
        a, b = integrate(rotation, x0, 0.0, 1.0, solver=name), fn(rotation, x0, 0.0, 1.0)
        assert torch.equal(a.x, b.x) and torch.equal(a.nfe, b.nfe)
    with pytest.raises(ValueError, match="nope"):
        integrate(rotation, x0, 0.0, 1.0, solver="nope")


def test_summary_of_a_clean_run() -> None:
    sol = dopri5(rotation, rotation_batch([0.5, 2.0, 4.0]), 0.0, 1.0)
    summary = sol.summary()
    assert summary["samples"] == 3 and summary["landed"] == 3
    assert summary["failed"] == {"nonfinite": 0, "underflow": 0, "max_nfe": 0, "unreturned": 0}
    assert summary["guarded"] == 0 and summary["crossed"] == 0
    assert math.isclose(summary["nfe_mean"], float(sol.nfe.double().mean()))
