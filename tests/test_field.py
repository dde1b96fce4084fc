"""Field targets and training points against independent float64 references (docs/method.md §2, §3).

The references here never use the Gram identity, top-k refinement or chunking of `efm_cli.field`: the Coulomb one sums
powers r^{−N} directly (small D) or materialises every difference vector with logsumexp weights (image D); the tube one
loops over pairs with the official formula. Agreement with them is what a user relies on; the tiny regularisers of
the library (1e-14 on r², 1e-5 and 1e-12 in the normalisations) are mirrored or compared through directions.
"""

import functools
import itertools
import math

import pytest
import torch
import torch.nn.functional as functional

from efm_cli import field

F64 = torch.float64
IMAGE = (3, 64, 64)  # D = 12288, the 64² experiments
PLATE_GAP = 20.0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _smooth_images(count: int, seed: int) -> torch.Tensor:
    """Image-like charges in [−1, 1]: upsampled coarse noise plus grain, so nearby charges share structure."""
    g = _gen(seed)
    coarse = 2 * torch.rand(count, IMAGE[0], 8, 8, generator=g) - 1
    fine = functional.interpolate(coarse, size=IMAGE[1:], mode="bilinear", align_corners=False)
    return (fine + 0.05 * torch.randn(count, *IMAGE, generator=g)).clamp(-1, 1)


def _augmented(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.to(F64)[:, None], x.to(F64).flatten(1)], dim=1)


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True)


def _max_direction_gap(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest entry of the difference of the two unit directions: sensitive to 1e-15, unlike 1 − cos."""
    return (_unit(out.to(F64)) - _unit(ref)).abs().max().item()


def _min_cosine(out: torch.Tensor, ref: torch.Tensor) -> float:
    return functional.cosine_similarity(out.to(F64), ref, dim=1).min().item()


# ------------------------------------------------------------------------------------------------ Coulomb references


def _coulomb_direct(
    z: torch.Tensor, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, L: float, gamma: float = 5.0
) -> dict[str, torch.Tensor]:
    """Small-D reference by plain powers in float64: E = (1/B⁺)Σ(x̃−p̃)/r^N − (1/B⁻)Σ(x̃−q̃)/r^N.

    r² carries the library's documented 1e-14, so a point exactly on a charge gets a finite (huge) weight there and
    the charge's own zero difference vector contributes nothing.
    """
    xt = _augmented(z, x)
    n = xt.shape[1]
    p = _augmented(torch.zeros(len(source)), source)
    q = _augmented(torch.full((len(target),), L), target)
    dp, dq = xt[:, None] - p[None], xt[:, None] - q[None]
    wp = (dp.square().sum(-1) + 1e-14) ** (-n / 2)
    wq = (dq.square().sum(-1) + 1e-14) ** (-n / 2)
    field_e = (wp[..., None] * dp).sum(1) / len(p) - (wq[..., None] * dq).sum(1) / len(q)
    a = xt - (wp / wp.sum(1, keepdim=True)) @ p
    c = (wq / wq.sum(1, keepdim=True)) @ q - xt
    repo = a / (a.norm(dim=1, keepdim=True) + gamma) + c / (c.norm(dim=1, keepdim=True) + gamma)
    return {"repo": math.sqrt(n) * repo, "phys": math.sqrt(n) * _unit(field_e)}


def _coulomb_materialised(
    z: torch.Tensor, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, L: float, gamma: float = 5.0
) -> dict[str, torch.Tensor]:
    """Image-D reference in float64: explicit [B, N] differences per point, weights by logsumexp (powers underflow)."""
    xt = _augmented(z, x)
    n = xt.shape[1]
    p = _augmented(torch.zeros(len(source)), source)
    q = _augmented(torch.full((len(target),), L), target)

    def pull(point: torch.Tensor, charges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ_j w_j (x̃ − c_j) over the materialised differences, and log((1/B) Σ_j r_j^{−N})."""
        diff = point - charges
        logit = -0.5 * n * torch.log(diff.square().sum(1) + 1e-14)
        offset = (torch.softmax(logit, 0)[:, None] * diff).sum(0)
        return offset, torch.logsumexp(logit, 0) - math.log(len(charges))

    repo, phys = [], []
    for point in xt:
        a, log_zp = pull(point, p)
        off_q, log_zq = pull(point, q)
        c = -off_q
        repo.append(a / (a.norm() + gamma) + c / (c.norm() + gamma))
        lam = torch.sigmoid(log_zp - log_zq)
        phys.append(_unit((lam * a + (1 - lam) * c)[None])[0])
    return {"repo": math.sqrt(n) * torch.stack(repo), "phys": math.sqrt(n) * torch.stack(phys)}


def _small_problem(d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Unequal plates with a duplicated charge on each, and points in the gap, on and behind the plates.

    Returns z, x, source, target, L and a mask of the points that sit exactly on a charge of a plate (z = 0 or L),
    where the physical field is undefined.
    """
    g = _gen(d)
    L = 1.5
    source = torch.randn(7, d, generator=g, dtype=F64)
    target = torch.randn(5, d, generator=g, dtype=F64) + 0.5
    source[6] = source[2]
    target[4] = target[0]
    z = torch.cat([L * torch.rand(10, generator=g, dtype=F64), torch.tensor([-0.4, L + 0.4])])
    x = torch.randn(12, d, generator=g, dtype=F64)
    near = [
        (1e-4, source[1]),  # 1e-4 above a source charge
        (1e-4, source[2]),  # ... above a duplicated one
        (1e-3, source[3] + 1e-4),
        (L - 1e-4, target[1] + 1e-3),  # 1e-3 off a target charge
        (L - 1e-4, target[0] + 1e-3),  # ... off a duplicated one
        (0.0, x[0]),  # on the plates, away from the charges
        (L, x[1]),
        (0.0, source[4]),  # exactly on a charge
        (0.0, source[6]),  # exactly on a duplicated charge
        (L, target[2]),
    ]
    z = torch.cat([z, torch.tensor([h for h, _ in near], dtype=F64)])
    x = torch.cat([x, torch.stack([p for _, p in near])])
    on_charge = torch.zeros(len(z), dtype=torch.bool)
    on_charge[-3:] = True
    cast = (t.to(dtype) for t in (z, x, source, target))
    return (*cast, L, on_charge)


@pytest.mark.parametrize("d", [2, 3, 10])
@pytest.mark.parametrize("mode", ["repo", "phys"])
def test_coulomb_target_matches_direct_coulomb_sum(d: int, mode: str) -> None:
    z, x, source, target, L, on_charge = _small_problem(d, F64)
    ref = _coulomb_direct(z, x, source, target, L)[mode]
    out = field.coulomb_target(z, x, source, target, L, mode=mode)
    assert out.dtype == F64 and out.shape == (len(z), d + 1)
    assert torch.isfinite(out).all()
    # The charge's own field is undefined on it; repo drops that plate's term, phys has no direction to match.
    check = ~on_charge if mode == "phys" else torch.ones_like(on_charge)
    assert _max_direction_gap(out[check], ref[check]) < 1e-10
    torch.testing.assert_close(out[check].norm(dim=1), ref[check].norm(dim=1), rtol=1e-7, atol=0)

    z32, x32, source32, target32, _, _ = _small_problem(d, torch.float32)
    ref32 = _coulomb_direct(z32, x32, source32, target32, L)[mode]  # same fp32 values, exact arithmetic
    out32 = field.coulomb_target(z32, x32, source32, target32, L, mode=mode)
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()
    assert _min_cosine(out32[check], ref32[check]) > 1 - 1e-6


def test_coulomb_target_near_plates_points_along_the_nearby_charge() -> None:
    """Within 1e-3 of a charge its own field dominates: straight up from a source, straight at a target.

    In fp32 this needs that charge's exact distance: the Gram identity loses r ≈ 1e-4 next to |x|² ≈ 3.
    """
    _, _, source, target, L, _ = _small_problem(3, torch.float32)
    z = torch.tensor([1e-4, 1e-4, L - 1e-4])
    x = torch.stack([source[1], source[2], target[1] + 1e-3])  # source[2] is a duplicated charge
    out = field.coulomb_target(z, x, source, target, L, mode="phys").double()
    torch.testing.assert_close(out[:2], torch.tensor([[2.0, 0, 0, 0]] * 2, dtype=F64), rtol=0, atol=1e-6)
    offset = _augmented(L - z[2:], target[1:2] - x[2:])  # the fp32 point's exact offset, about (1e-4, −1e-3, …)
    torch.testing.assert_close(out[2:], 2 * _unit(offset), rtol=0, atol=1e-6)


def test_coulomb_target_on_a_plate_charge_is_finite() -> None:
    """Points exactly on a charge (z = 0 or L) are singular: both modes stay finite and within their norm bounds."""
    for d, dtype in itertools.product([3, 10], [torch.float32, F64]):
        z, x, source, target, L, on_charge = _small_problem(d, dtype)
        for mode in ("repo", "phys"):
            out = field.coulomb_target(z[on_charge], x[on_charge], source, target, L, mode=mode)
            assert torch.isfinite(out).all()
            assert (out.norm(dim=1) <= 2 * math.sqrt(d + 1) * (1 + 1e-6)).all()


@pytest.fixture(scope="module")
def image_problem() -> dict[str, object]:
    """B = 256 image charges per plate and points from `sample_points`, next to and on the plates."""
    source, target = _smooth_images(256, seed=1), _smooth_images(256, seed=2)
    z, x = field.sample_points(source[:8], target[:8], PLATE_GAP, generator=_gen(3))
    extra = [
        (1e-4, source[10]),  # 1e-4 above a source charge
        (1e-3, source[11] + 1e-3 * torch.randn(IMAGE, generator=_gen(4))),
        (PLATE_GAP - 1e-4, target[12] + 1e-3),  # 1e-3 off a target charge
        (0.0, 0.3 * source[13] + 0.7 * source[14]),  # on the plates, between charges (not midway: a saddle)
        (PLATE_GAP, target[15] - 0.01),
        (0.0, source[16]),  # exactly on a charge
    ]
    z = torch.cat([z, torch.tensor([h for h, _ in extra])])
    x = torch.cat([x, torch.stack([p for _, p in extra])])
    on_charge = torch.zeros(len(z), dtype=torch.bool)
    on_charge[-1] = True
    ref = _coulomb_materialised(z, x, source, target, PLATE_GAP)
    return {"z": z, "x": x, "source": source, "target": target, "ref": ref, "on_charge": on_charge}


@pytest.mark.parametrize("mode", ["repo", "phys"])
def test_coulomb_target_image_dimension(image_problem: dict, mode: str) -> None:
    """D = 12288: powers r^{−N} underflow even in float64, yet targets stay finite and match the reference."""
    z, x, source, target = (image_problem[k] for k in ("z", "x", "source", "target"))
    ref, check = image_problem["ref"][mode], torch.ones(len(z), dtype=torch.bool)
    if mode == "phys":
        check = ~image_problem["on_charge"]
    out = field.coulomb_target(z, x, source, target, PLATE_GAP, mode=mode)
    assert out.shape == (len(z), 12289) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert _min_cosine(out[check], ref[check]) >= 0.99999

    out64 = field.coulomb_target(z.double(), x.double(), source.double(), target.double(), PLATE_GAP, mode=mode)
    assert torch.isfinite(out64).all()
    assert _max_direction_gap(out64[check], ref[check]) < 1e-10
    torch.testing.assert_close(out64[check].norm(dim=1), ref[check].norm(dim=1), rtol=1e-7, atol=0)


def test_coulomb_target_norms() -> None:
    """phys has norm √N (per-entry RMS 1); repo, a sum of two sub-unit vectors, at most 2√N."""
    for d in (3, 10, 500):
        g = _gen(d)
        source, target = torch.randn(64, d, generator=g), torch.randn(48, d, generator=g)
        z, x = field.sample_points(source[:40], target[:40], 4.0, generator=g)
        z[:4] = torch.tensor([1e-6, 1e-3, 4.0 - 1e-3, 4.0 - 1e-6])
        phys = field.coulomb_target(z, x, source, target, 4.0, mode="phys")
        torch.testing.assert_close(phys.norm(dim=1), torch.full((40,), math.sqrt(d + 1)), rtol=1e-5, atol=0)
        repo = field.coulomb_target(z, x, source, target, 4.0, mode="repo", gamma=1e-7)
        assert (repo.norm(dim=1) <= 2 * math.sqrt(d + 1) * (1 + 1e-6)).all()
        assert repo.norm(dim=1).max() > math.sqrt(d + 1)


def test_gamma_only_matters_for_repo() -> None:
    z, x, source, target, L, _ = _small_problem(10, F64)
    phys = [field.coulomb_target(z, x, source, target, L, mode="phys", gamma=g) for g in (1e-7, 5.0, 100.0)]
    assert torch.equal(phys[0], phys[1]) and torch.equal(phys[0], phys[2])
    for gamma in (1e-7, 100.0):
        repo = field.coulomb_target(z, x, source, target, L, mode="repo", gamma=gamma)
        torch.testing.assert_close(repo, _coulomb_direct(z, x, source, target, L, gamma)["repo"], rtol=1e-9, atol=0)
    default = field.coulomb_target(z, x, source, target, L)
    assert torch.equal(default, field.coulomb_target(z, x, source, target, L, mode="repo", gamma=5.0))
    assert not torch.allclose(default, repo)


def test_coulomb_target_plates_have_unit_total_charge() -> None:
    """Doubling every charge of a plate changes nothing: each plate's charges are averaged, not summed."""
    z, x, source, target, L, on_charge = _small_problem(3, F64)
    z, x = z[~on_charge], x[~on_charge]
    for mode in ("repo", "phys"):
        once = field.coulomb_target(z, x, source, target, L, mode=mode)
        twice = field.coulomb_target(z, x, source.repeat(2, 1), target.repeat(3, 1), L, mode=mode)
        torch.testing.assert_close(twice, once, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nearest", [1, 4, 16, 64])
def test_targets_independent_of_chunking(monkeypatch: pytest.MonkeyPatch, nearest: int) -> None:
    """Row chunks and the number of exactly recomputed charges are memory/speed knobs, not part of the result."""
    cases = []
    for d in (3, 300):
        z, x, source, target, L, _ = _small_problem(d, F64)
        source = torch.cat([source, torch.randn(40, d, generator=_gen(d), dtype=F64)])  # more charges than NEAREST
        for mode in ("repo", "phys"):
            cases.append((functools.partial(field.coulomb_target, L=L, mode=mode), (z, x, source, target), d))
    z, x, source, target = _tube_problem(8, 6, seed=8, S=1.0, K=math.pi / PLATE_GAP)
    cases.append((functools.partial(field.tube_target, L=PLATE_GAP, S=1.0), (z, x, source, target), 8))
    before = [(target_fn(*args), target_fn(*(t.float() for t in args))) for target_fn, args, _ in cases]
    monkeypatch.setattr(field, "MEMORY_BUDGET", 1)
    monkeypatch.setattr(field, "NEAREST", nearest)
    for (target_fn, args, d), (exact, single) in zip(cases, before, strict=True):
        torch.testing.assert_close(target_fn(*args), exact, rtol=0, atol=1e-10)
        if nearest >= 4:  # with one or two exact charges, fp32 Gram distances decide the weights of the next ones
            out = target_fn(*(t.float() for t in args))
            torch.testing.assert_close(out, single, rtol=0, atol=1e-6 * math.sqrt(d + 1))


def test_coulomb_target_image_dimension_chunked(monkeypatch: pytest.MonkeyPatch, image_problem: dict) -> None:
    """Row-by-row evaluation at image size, including the points next to the plates."""
    rows = torch.cat([torch.arange(4), torch.arange(-6, 0)])
    z, x = image_problem["z"][rows], image_problem["x"][rows]
    source, target = image_problem["source"][:64], image_problem["target"][:48]
    baseline = {mode: field.coulomb_target(z, x, source, target, PLATE_GAP, mode=mode) for mode in ("repo", "phys")}
    monkeypatch.setattr(field, "MEMORY_BUDGET", 1)
    monkeypatch.setattr(field, "NEAREST", 5)
    for mode, expected in baseline.items():
        out = field.coulomb_target(z, x, source, target, PLATE_GAP, mode=mode)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * math.sqrt(12289))


def test_targets_computed_in_at_least_fp32() -> None:
    z, x, source, target, L, _ = _small_problem(10, torch.float32)
    half = [t.bfloat16() for t in (z, x, source, target)]
    widened = [t.float() for t in half]
    for mode in ("repo", "phys"):
        out = field.coulomb_target(*half, L, mode=mode)
        assert out.dtype == torch.float32
        assert torch.equal(out, field.coulomb_target(*widened, L, mode=mode))
    pairs = (half[0][:5], half[1][:5], half[2][:5], half[3][:5])
    tube = field.tube_target(*pairs, L, S=1.0)
    assert tube.dtype == torch.float32
    assert torch.equal(tube, field.tube_target(*(t.float() for t in pairs), L, S=1.0))


def test_coulomb_target_keeps_image_shapes_and_rejects_unknown_modes() -> None:
    source, target = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    z, x = field.sample_points(source, target, 2.0, generator=_gen(0))
    flat = field.coulomb_target(z, x.flatten(1), source.flatten(1), target.flatten(1), 2.0)
    assert torch.equal(field.coulomb_target(z, x, source, target, 2.0), flat)
    with pytest.raises(ValueError, match="mode"):
        field.coulomb_target(z, x, source, target, 2.0, mode="exact")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- tube reference


def _tube_official(
    z: torch.Tensor, x: torch.Tensor, source: torch.Tensor, target: torch.Tensor, L: float, S: float, K: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official "Shifted" tube field (docs/method.md §3), pair by pair in float64.

    Returns the unit direction of F = Σ_k m_k u_k (zero outside [0, L]) and, per point, the largest log m_k. The
    Gaussian factor is kept as a logarithm and every m_k is scaled by the same exp(−max log m): the direction is the
    official one exactly, and it survives where the official magnitudes underflow.
    """
    dr = math.pi / (2 * K)
    x, source, target = (t.to(F64).flatten(1) for t in (x, source, target))
    d = x.shape[1]
    out = torch.zeros(len(z), d + 1, dtype=F64)
    top = torch.full((len(z),), -math.inf, dtype=F64)
    for i, h in enumerate(z.tolist()):
        if not 0.0 <= h <= L:
            continue
        log_m, u = [], []
        for a, b in zip(source, target, strict=True):
            axis = torch.cat([torch.tensor([L], dtype=F64), b - a])
            rho = x[i] - (a + (h / L) * (b - a))
            r = rho.norm().item()
            e = torch.cat([torch.zeros(1, dtype=F64), rho / (r + 1e-11)])
            if h < dr:
                s, alpha = S * math.sin(K * h), math.atan(K * r / (math.tan(K * h) + 1e-5))
            elif h <= L - dr:
                s, alpha = S, 0.0
            else:
                # Official: atan(−K·r·tan(K(h − L + d_r))) = −atan(K·r / tan(K(L − h))); efm regularises this
                # side with the same +1e-5 as the source side, so that it stays finite at h = L.
                s = S * math.cos(K * (h - L + dr))
                alpha = -math.atan(K * r / (math.tan(K * (L - h)) + 1e-5))
            u.append(math.cos(alpha) * axis / axis.norm() + math.sin(alpha) * e)
            log_m.append(-(r**2) / (2 * s**2) - math.log((math.cos(alpha) + 1e-8) * (s / S) ** d + 0.01))
        logs = torch.tensor(log_m, dtype=F64)
        total = (torch.exp(logs - logs.max())[:, None] * torch.stack(u)).sum(0)
        out[i], top[i] = total / total.norm(), logs.max()
    return out, top


# Both ramps, their ends, the band around L/2 where (s/S)^D is not negligible for small D, and the middle.
_TUBE_HEIGHTS = [1e-3, 0.01, 0.5, 3, 5, 7, 9.5, 9.95, 10, 10.05, 10.5, 13, 15, 17, 19.5, 19.99, PLATE_GAP - 1e-3]


def _tube_problem(d: int, count: int, seed: int, S: float, K: float) -> tuple[torch.Tensor, ...]:
    """fp64 pairs and points in every part of the tube profile: on their own segment or off by ~ the tube width."""
    g = _gen(seed)
    source, target = torch.randn(count, d, generator=g, dtype=F64), torch.randn(count, d, generator=g, dtype=F64)
    z = torch.tensor(_TUBE_HEIGHTS, dtype=F64)
    k = torch.arange(len(z)) % count
    on = field.segment_point(source[k], target[k], z, PLATE_GAP)
    width = field.tube_width(z, PLATE_GAP, S, K)
    off = on + torch.randn(len(z), d, generator=g, dtype=F64) * (0.5 * width + 1e-4)[:, None] / math.sqrt(d)
    return torch.cat([z, z]), torch.cat([on, off]), source, target


@pytest.mark.parametrize("d", [3, 8])
@pytest.mark.parametrize(("S", "K"), [(10.0, None), (1.0, None), (2.0, 2 * math.pi / PLATE_GAP)])
def test_tube_target_matches_official_formula(d: int, S: float, K: float | None) -> None:
    ramp_k = math.pi / PLATE_GAP if K is None else K
    z, x, source, target = _tube_problem(d, 6, seed=d, S=S, K=ramp_k)
    ref, _ = _tube_official(z, x, source, target, PLATE_GAP, S, ramp_k)
    out = field.tube_target(z, x, source, target, PLATE_GAP, S=S, K=K)
    assert out.dtype == F64 and torch.isfinite(out).all()
    assert _max_direction_gap(out, ref) < 1e-9
    torch.testing.assert_close(out.norm(dim=1), torch.full((len(z),), math.sqrt(d + 1), dtype=F64), rtol=1e-4, atol=0)

    # fp32 inputs: on-segment points are exactly on their segment for the library; the reference gets those fp32
    # pairs' exact float64 segment points (its own fp32 rounding would move them off by ~1e-7·|x|).
    z32, x32, source32, target32 = (t.float() for t in (z, x, source, target))
    half = len(z) // 2
    k = torch.arange(half) % len(source)
    x32[:half] = field.segment_point(source32[k], target32[k], z32[:half], PLATE_GAP)
    x_exact = x32.double()
    x_exact[:half] = field.segment_point(source32[k].double(), target32[k].double(), z32[:half].double(), PLATE_GAP)
    ref32, _ = _tube_official(z32.double(), x_exact, source32, target32, PLATE_GAP, S, ramp_k)
    out32 = field.tube_target(z32, x32, source32, target32, PLATE_GAP, S=S, K=K)
    assert out32.dtype == torch.float32
    assert _min_cosine(out32, ref32) > 1 - 1e-6


def test_tube_target_image_dimension() -> None:
    """D = 12288: (s/S)^D and the Gaussian factors underflow in float64; the log-space target still matches."""
    count = 24
    source, target = _smooth_images(count, seed=5), _smooth_images(count, seed=6)
    K = math.pi / PLATE_GAP
    z = torch.tensor([1e-3, 0.05, 2.0, 5.0, 9.9, 9.97, 10.0, 10.1, 15.0, 19.95, PLATE_GAP - 1e-3])
    k = torch.arange(len(z)) % count
    on = field.segment_point(source[k], target[k], z, PLATE_GAP)
    off = on + 0.02 * torch.randn(on.shape, generator=_gen(7))  # ~1.4 from the segment: weights mix near L/2
    z, x = torch.cat([z, z]), torch.cat([on, off])
    x_exact = x.double()
    x_exact[: len(k)] = field.segment_point(source[k].double(), target[k].double(), z[: len(k)].double(), PLATE_GAP)
    ref, top = _tube_official(z.double(), x_exact, source, target, PLATE_GAP, 10.0, K)
    assert (top[[len(k), -1]] < -745).all()  # exp underflows: next to the plates the official F is zero, even in fp64

    out = field.tube_target(z, x, source, target, PLATE_GAP)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert _min_cosine(out, ref) >= 0.99999
    out64 = field.tube_target(z.double(), x_exact, source.double(), target.double(), PLATE_GAP)
    assert _max_direction_gap(out64, ref) < 1e-9
    torch.testing.assert_close(out64.norm(dim=1), torch.full((len(z),), math.sqrt(12289), dtype=F64), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("scheme", ["uniform", "pfgm"])
def test_tube_target_on_own_segment_is_the_segment_direction(dtype: torch.dtype, scheme: str) -> None:
    """A training point lies on its own segment to the last bit, so with a narrow tube its target is that segment's
    direction even next to the plates, where a round-off r ≈ 1e-7·|x| would tilt it (docs/method.md §3)."""
    g = _gen(11)
    source = (3 * torch.randn(32, 3, 8, 8, generator=g)).to(dtype)
    target = (3 * torch.randn(32, 3, 8, 8, generator=g)).to(dtype)
    z, x = field.sample_points(source, target, PLATE_GAP, scheme=scheme, eps=1e-6, generator=g)
    out = field.tube_target(z, x, source, target, PLATE_GAP, S=1e-3)
    axis = torch.cat([torch.full((32, 1), PLATE_GAP, dtype=dtype), (target - source).flatten(1)], dim=1)
    expected = math.sqrt(axis.shape[1]) * _unit(axis)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-4)
    assert _max_direction_gap(out, expected.double()) < (1e-6 if dtype == torch.float32 else 1e-12)


def test_tube_target_finite_everywhere_and_zero_outside_the_gap() -> None:
    heights = [0.0, 1e-6, PLATE_GAP / 2, PLATE_GAP - 1e-6, PLATE_GAP, -1.0, PLATE_GAP + 1.0]
    for dtype, d in itertools.product([torch.float32, F64], [3, 12288]):
        g = _gen(d)
        source, target = torch.randn(8, d, generator=g, dtype=dtype), torch.randn(8, d, generator=g, dtype=dtype)
        z = torch.tensor(heights * 2, dtype=dtype)
        k = torch.arange(len(z)) % 8
        x = field.segment_point(source[k], target[k], z, PLATE_GAP)
        x[len(heights) :] += 0.3 * torch.randn(len(heights), d, generator=g, dtype=dtype)
        out = field.tube_target(z, x, source, target, PLATE_GAP)
        assert torch.isfinite(out).all()
        outside = (z < 0) | (z > PLATE_GAP)
        assert torch.equal(out[outside], torch.zeros_like(out[outside]))
        inside = (z >= 0) & (z < PLATE_GAP)  # z = L: see the tests below
        assert (out[inside].norm(dim=1) > 0.99 * math.sqrt(d + 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tube_target_at_target_plate_is_the_limit_from_below(dtype: torch.dtype) -> None:
    """At z = L the lines converge on the target charge (α = −π/2): the target points from x straight at it,
    continuing the values just below the plate rather than collapsing to zero."""
    g = _gen(12)
    source, target = torch.randn(3, 4, generator=g, dtype=dtype), torch.randn(3, 4, generator=g, dtype=dtype)
    x = target[:1] + 0.5
    below = field.tube_target(torch.tensor([PLATE_GAP * (1 - 1e-6)], dtype=dtype), x, source, target, PLATE_GAP)
    at = field.tube_target(torch.tensor([PLATE_GAP], dtype=dtype), x, source, target, PLATE_GAP)
    expected = torch.tensor([[0.0, -1.0, -1.0, -1.0, -1.0]], dtype=dtype) * math.sqrt(5) / 2
    # cos α = 1e-5 / (K·r) there, from the 1e-5 that regularises both ramps alike.
    torch.testing.assert_close(at, expected, rtol=0, atol=1e-3)
    torch.testing.assert_close(at, below, rtol=0, atol=1e-3)


@pytest.mark.parametrize("plate", ["source", "target"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tube_target_at_a_plate_image_is_its_segment_direction(plate: str, dtype: torch.dtype) -> None:
    """A source image at z = 0 or a target image at z = L is the end of its own segment: the target there is that
    segment's direction, as everywhere else along it (an ODE from the target plate starts exactly there)."""
    g = _gen(13)
    source, target = torch.randn(3, 4, generator=g, dtype=dtype), torch.randn(3, 4, generator=g, dtype=dtype)
    z = torch.full((3,), 0.0 if plate == "source" else PLATE_GAP, dtype=dtype)
    x = source if plate == "source" else target
    out = field.tube_target(z, x, source, target, PLATE_GAP)
    axis = torch.cat([torch.full((3, 1), PLATE_GAP, dtype=dtype), target - source], dim=1)
    # In fp32, a + 1·(b − a) misses b by ~1e-7·|b|: a tilt K·r/1e-5 of a few 1e-3 rad remains at the target end.
    tolerance = 5e-3 if dtype == torch.float32 and plate == "target" else 1e-4
    torch.testing.assert_close(out, math.sqrt(5) * _unit(axis), rtol=0, atol=tolerance)


def test_tube_target_rejects_bad_geometry() -> None:
    source, target = torch.randn(4, 3), torch.randn(4, 3)
    z, x = field.sample_points(source, target, 4.0, generator=_gen(0))
    with pytest.raises(ValueError, match="ramps"):
        field.tube_target(z, x, source, target, 4.0, K=0.9 * math.pi / 4.0)
    assert torch.isfinite(field.tube_target(z, x, source, target, 4.0, K=math.pi / 4.0)).all()
    with pytest.raises(ValueError, match="pairs"):
        field.tube_target(z, x, source, target[:3], 4.0)


# ----------------------------------------------------------------------------------------------------------- samplers


def test_uniform_z_range_and_mean() -> None:
    z = field.uniform_z(200_000, 20.0, 0.5, generator=_gen(0), dtype=F64)
    assert z.shape == (200_000,) and z.dtype == F64
    assert z.min() >= 0.5 and z.max() <= 19.5
    assert abs(z.mean().item() - 10.0) < 0.05  # 4.5 standard errors (19/√12/√2e5 ≈ 0.012)
    assert z.min() < 0.51 and z.max() > 19.49


def test_pfgm_z_quantiles_match_method_monte_carlo() -> None:
    """docs/method.md §2 (σ_end=0.1, τ=0.03, M=291): 10/50/90% ≈ 0.12 / 3.9 / 152, P(z<1) ≈ 0.34; L huge: no clamp."""
    z = field.pfgm_z(200_000, 1e9, 1e-12, generator=_gen(1), dtype=F64)
    q = torch.quantile(z, torch.tensor([0.1, 0.5, 0.9], dtype=F64))
    torch.testing.assert_close(q, torch.tensor([0.12, 3.9, 152.0], dtype=F64), rtol=0.07, atol=0)
    assert abs((z < 1).double().mean().item() - 0.34) < 0.01


def test_pfgm_z_is_clamped_to_the_gap() -> None:
    """Heights past either margin are clamped, not redrawn: the same draws as without a limit, cut to [ε, L − ε]."""
    z = field.pfgm_z(100_000, 20.0, 0.05, generator=_gen(2), dtype=F64)
    free = field.pfgm_z(100_000, 1e9, 1e-12, generator=_gen(2), dtype=F64)
    assert torch.equal(z, free.clamp(0.05, 19.95))
    assert (z == 0.05).double().mean() > 0.03 and (z == 19.95).double().mean() > 0.25  # ~31% pass the target plate


def test_pfgm_z_restrict_m_caps_growth_of_tiny_starts() -> None:
    """restrict_M redraws m ~ U[0, ⌊0.7M⌋] where z0 < 0.005: those heights stay below 0.005·1.03^203 ≈ 2."""
    plain = field.pfgm_z(100_000, 1e9, 1e-12, generator=_gen(3), dtype=F64)
    restricted = field.pfgm_z(100_000, 1e9, 1e-12, restrict_M=True, generator=_gen(3), dtype=F64)
    changed = plain != restricted
    assert 0.03 < changed.double().mean() < 0.05  # P(|N(0, 0.1²)| < 0.005) ≈ 0.040
    assert restricted[changed].max() < 0.005 * 1.03**203
    assert plain[changed].max() > 2.1
    assert torch.equal(plain[~changed], restricted[~changed])


def test_samplers_are_deterministic_given_a_generator() -> None:
    source, target = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)

    def points(g: torch.Generator, scheme: str) -> torch.Tensor:
        z, x = field.sample_points(source, target, 5.0, scheme=scheme, generator=g)  # type: ignore[arg-type]
        return torch.cat([z, x.flatten()])

    for draw in (
        lambda g: field.uniform_z(100, 5.0, 1e-3, generator=g),
        lambda g: field.pfgm_z(100, 5.0, 1e-3, restrict_M=True, generator=g),
        lambda g: points(g, "uniform"),
        lambda g: points(g, "pfgm"),
    ):
        assert torch.equal(draw(_gen(7)), draw(_gen(7)))
        assert not torch.equal(draw(_gen(7)), draw(_gen(8)))


@pytest.mark.parametrize("scheme", ["uniform", "pfgm"])
def test_sample_points_lie_on_the_pair_segments(scheme: str) -> None:
    source, target = torch.randn(64, 3, 8, 8, generator=_gen(0)), torch.randn(64, 3, 8, 8, generator=_gen(1))
    z, x = field.sample_points(source, target, 20.0, scheme=scheme, eps=0.01, generator=_gen(2))
    assert z.shape == (64,) and x.shape == (64, 3, 8, 8) and z.dtype == x.dtype == torch.float32
    assert (z >= 0.01).all() and (z <= 19.99).all()
    assert torch.equal(x, field.segment_point(source, target, z, 20.0))
    t = (z.double() / 20.0)[:, None, None, None]
    torch.testing.assert_close(x.double(), (1 - t) * source.double() + t * target.double(), rtol=0, atol=1e-5)


def test_sample_points_pfgm_options_and_errors() -> None:
    source, target = torch.randn(20_000, 1), torch.randn(20_000, 1)
    z, _ = field.sample_points(source, target, 1e6, scheme="pfgm", eps=1e-9, sigma_end=0.01, generator=_gen(0))
    assert 0.35 < z.median() < 0.43  # docs/method.md §2: σ_end = 0.01, M = 291 ⇒ median ≈ 0.39
    with pytest.raises(ValueError, match="scheme"):
        field.sample_points(source, target, 1.0, scheme="mesh")  # type: ignore[arg-type]


def test_segment_point_endpoints_and_dtype() -> None:
    source, target = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    assert torch.equal(field.segment_point(source, target, torch.zeros(5, dtype=F64), 2.0), source)
    torch.testing.assert_close(field.segment_point(source, target, torch.full((5,), 2.0, dtype=F64), 2.0), target)
    mid = field.segment_point(source, target, torch.ones(5, dtype=F64), 2.0)
    torch.testing.assert_close(mid, (source + target) / 2)


# ----------------------------------------------------------------------------------------------------- OT pairing


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_ot_pairing_is_the_best_permutation(cost: str) -> None:
    for seed in range(3):
        source, target = torch.randn(6, 5, generator=_gen(seed)), torch.randn(6, 5, generator=_gen(seed + 10))
        dist = torch.cdist(source.double(), target.double())
        costs = dist.square() if cost == "sqeuclidean" else dist
        every = torch.tensor(list(itertools.permutations(range(6))))
        best = every[costs[torch.arange(6), every].sum(1).argmin()]
        perm = field.ot_pairing(source, target, cost=cost)
        assert perm.dtype == torch.long
        assert torch.equal(perm, best)


def test_ot_pairing_costs_differ() -> None:
    """Squared costs avoid one long move, plain ones keep a coincident pair: the option is not cosmetic."""
    source = torch.tensor([[-3.0, 3.0], [-1.0, 1.0]])
    target = torch.tensor([[-1.0, 1.0], [-2.0, -1.0]])  # squared: 13 kept vs 17 swapped; plain: 5.06 vs 4.12
    assert field.ot_pairing(source, target).tolist() == [0, 1]
    assert field.ot_pairing(source, target, cost="euclidean").tolist() == [1, 0]


def test_ot_pairing_identity_and_planted_permutation() -> None:
    source = _smooth_images(64, seed=8)
    for cost in ("sqeuclidean", "euclidean"):
        assert torch.equal(field.ot_pairing(source, source.clone(), cost=cost), torch.arange(64))
    planted = torch.randperm(64, generator=_gen(9))
    target = source[planted] + 0.01 * torch.randn(source.shape, generator=_gen(10))
    perm = field.ot_pairing(source, target)
    assert sorted(perm.tolist()) == list(range(64))
    assert torch.equal(planted[perm], torch.arange(64))  # target[perm[i]] is the noisy copy of source[i]


def test_ot_pairing_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal"):
        field.ot_pairing(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="cost"):
        field.ot_pairing(torch.randn(4, 3), torch.randn(4, 3), cost="cosine")  # type: ignore[arg-type]
