"""Field targets between the two plates of a capacitor, and the points where they are evaluated.

Conventions (docs/method.md §1): a point of the augmented space R^N, N = D + 1, is given as its height `z` [b] and its
image part `x` [b, D]; source charges sit on the plate z = 0, target charges on the plate z = L. Every target is
returned as one [b, N] tensor with the z-component first, the layout of the field network's loss.

Both fields are sums over charges (or charge pairs) weighted by a softmax over the batch axis. The squared
distances behind those weights come from matrix products (the Gram identity): cheap, but it loses the digits of a
point that sits next to a charge. The few nearest charges of every point, the only ones that matter when a point is
that close, are therefore recomputed from explicit differences, and their share of the weighted sums uses those
differences too. No [b, B, N] tensor is formed: points are processed in chunks whose explicit block stays under
`MEMORY_BUDGET` elements.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

CoulombTarget = Literal["repo", "phys"]
PointScheme = Literal["uniform", "pfgm"]
PairingCost = Literal["sqeuclidean", "euclidean"]

MEMORY_BUDGET = 1 << 24
"""Elements of the largest explicit-difference block (64 MiB in fp32) a field target allocates at once."""

NEAREST = 4
"""Charges per point whose distances are recomputed from explicit differences.

Exactness matters for the charges a point is close to, where the Gram identity cancels; in high dimension the
weights are all but one-hot on the nearest charge, and in low dimension the Gram identity is accurate anyway.
"""


def _working(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Flattened, in at least fp32: targets are never differentiated, so half precision would only cost accuracy."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype).flatten(1) if t.dim() > 1 else t.to(dtype) for t in tensors)


def _chunks(rows: int, k: int, d: int) -> Iterator[slice]:
    """Row slices whose [rows, k, d] explicit-difference block fits the memory budget."""
    step = max(1, MEMORY_BUDGET // max(1, k * d))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _nearest(d2: Tensor, k: int) -> Tensor:
    """Indices of each row's k smallest approximate squared distances: the charges worth exact differences."""
    return d2.topk(k, dim=1, largest=False).indices


def _weighted_sum(w: Tensor, idx: Tensor, diff: Tensor, x: Tensor, *terms: tuple[float | Tensor, Tensor]) -> Tensor:
    """Σ_j w_ij · diff_ij, where diff_ij = x_i − Σ_t coef_t · charges_t[j] (explicit for the refined charges).

    For the far charges the sum splits into (Σ_j w_ij)·x_i − Σ_t (coef_t·w) @ charges_t, which needs no
    [b, B, D] tensor; `terms` are (coef, charges) with coef a scalar or a per-row column. Accumulated in place:
    the [b, D] temporaries would otherwise outweigh the explicit block.
    """
    w_far = w.scatter(1, idx, 0.0)
    total = torch.einsum("bk,bkd->bd", w.gather(1, idx), diff)
    total.addcmul_(w_far.sum(1, keepdim=True), x)
    for coef, charges in terms:
        total.addmm_(w_far * coef, charges, alpha=-1.0)
    return total


def _sq_norms(t: Tensor) -> Tensor:
    """Row-wise squared norms, without a temporary the size of `t`."""
    return torch.einsum("ij,ij->i", t, t)


def _plate(x: Tensor, gap: Tensor, charges: Tensor, charges_sq: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """One plate's weighted offset Σ_j w_ij (x_i − c_j) and log((1/B) Σ_j r_ij^{−N}) at height gap `gap`."""
    gram = (_sq_norms(x)[:, None] + charges_sq[None] - 2.0 * (x @ charges.T)).clamp_min(0.0)
    idx = _nearest(gram, min(NEAREST, len(charges)))
    diff = charges[idx].sub_(x[:, None, :]).neg_()  # in place: one [rows, k, D] block, not two
    d2 = gram.scatter(1, idx, torch.linalg.vector_norm(diff, dim=-1).square())
    r2 = (d2 + gap.square()[:, None]).clamp(max=torch.finfo(d2.dtype).max)
    logit = -0.5 * n * torch.log(r2 + 1e-14)
    log_z = torch.logsumexp(logit, dim=1) - math.log(len(charges))
    return _weighted_sum(torch.softmax(logit, dim=1), idx, diff, x, (1.0, charges)), log_z


def coulomb_target(
    z: Tensor,
    x: Tensor,
    source: Tensor,
    target: Tensor,
    L: float,
    *,
    mode: CoulombTarget = "repo",
    gamma: float = 5.0,
) -> Tensor:
    """Minibatch Coulomb field target in R^{D+1} (EFM, docs/method.md §3), scaled to √N.

    `source` [B, ...] are positive charges on z = 0 and `target` [B', ...] negative charges on z = L, each of total
    charge one per plate. A charge weighs r^{−N}; weights are a softmax of −N·log r, so no power under- or
    overflows. `mode="repo"` normalises each plate's pull separately with `gamma` (the official code);
    `mode="phys"` is the direction of the exact superposition E = E⁺ + E⁻.
    """
    if mode not in ("repo", "phys"):
        raise ValueError(f"unknown Coulomb target mode {mode!r}; expected 'repo' or 'phys'")
    z, x, source, target = _working(z, x, source, target)
    b, n = x.shape[0], x.shape[1] + 1
    src_sq, tgt_sq = _sq_norms(source), _sq_norms(target)
    out = torch.empty(b, n, dtype=x.dtype, device=x.device)
    for rows in _chunks(b, min(NEAREST, max(len(source), len(target))), n):
        xc, zc = x[rows], z[rows]
        off_p, log_zp = _plate(xc, zc, source, src_sq, n)
        off_q, log_zq = _plate(xc, L - zc, target, tgt_sq, n)
        # away = x̃ − m⁺ = (z, off_p) points along E⁺, toward = m⁻ − x̃ = (L − z, −off_q) along E⁻; the target
        # α·away + β·toward is written straight into `out`, without forming either vector.
        if mode == "repo":
            alpha = 1.0 / (torch.sqrt(zc.square() + _sq_norms(off_p)) + gamma)
            beta = 1.0 / (torch.sqrt((L - zc).square() + _sq_norms(off_q)) + gamma)
        else:
            alpha = torch.sigmoid(log_zp - log_zq)  # Z⁺ / (Z⁺ + Z⁻)
            beta = 1.0 - alpha
        t = out[rows]
        t[:, 0] = alpha * zc + beta * (L - zc)
        torch.mul(off_p, alpha[:, None], out=t[:, 1:])
        t[:, 1:].addcmul_(off_q, beta[:, None], value=-1.0)
        if mode == "phys":
            t.div_(torch.linalg.vector_norm(t, dim=1, keepdim=True) + 1e-12)
        t.mul_(math.sqrt(n))
    return out


def tube_width(z: Tensor, L: float, S: float, K: float) -> Tensor:
    """Tube width s(z): S·sin(K·m) within the ramps of length π/(2K) next to each plate (m = distance to it), else S."""
    m = torch.minimum(z, L - z)
    return torch.where(m < math.pi / (2 * K), S * torch.sin(K * m.clamp_min(0.0)), torch.full_like(z, S))


def tube_target(
    z: Tensor,
    x: Tensor,
    source: Tensor,
    target: Tensor,
    L: float,
    *,
    S: float = 10.0,
    K: float | None = None,
) -> Tensor:
    """Interaction ("tube") field target (IFM, docs/method.md §3) of the pairs (source[k] at z=0, target[k] at z=L).

    Each pair's field fills a tube of width s(z) around its straight segment; inside the ramps the lines fan out from
    the source charge and converge on the target charge. Evaluated as a softmax over pairs in log space, so neither
    (s/S)^D nor the Gaussian factor underflows. `K` defaults to π/L (one ramp per half of the gap); the ramps, of
    length π/(2K), must fit in the gap. Points outside 0 ≤ z ≤ L get a zero target.
    """
    if len(source) != len(target):
        raise ValueError(f"the tube field needs pairs: got {len(source)} source and {len(target)} target charges")
    K = math.pi / L if K is None else K
    ramp = math.pi / (2 * K)
    if 2 * ramp > L * (1 + 1e-6):
        raise ValueError(f"tube ramps of length π/(2K) = {ramp:.4g} do not fit twice in the gap L = {L:.4g}")
    z, x, source, target = _working(z, x, source, target)
    b, d = x.shape
    n = d + 1
    seg = target - source
    axis = torch.cat([torch.full_like(seg[:, :1], L), seg], dim=1)
    axis = axis / axis.norm(dim=1, keepdim=True)  # unit segment direction n_k [B, N]
    src_sq, seg_sq, src_seg = _sq_norms(source), _sq_norms(seg), (source * seg).sum(1)
    out = torch.zeros(b, n, dtype=x.dtype, device=x.device)
    for rows in _chunks(b, min(NEAREST, len(source)), d):
        xc, zc = x[rows], z[rows]
        t = (zc / L)[:, None]
        gram = (
            _sq_norms(xc)[:, None]
            - 2.0 * (xc @ source.T)
            + src_sq[None]
            - 2.0 * t * (xc @ seg.T - src_seg[None])
            + t.square() * seg_sq[None]
        ).clamp_min(0.0)
        idx = _nearest(gram, min(NEAREST, len(source)))
        rho = (source[idx] + t[:, :, None] * seg[idx]).sub_(xc[:, None, :]).neg_()  # as segment_point computes it
        r2 = gram.scatter(1, idx, torch.linalg.vector_norm(rho, dim=-1).square())
        r = r2.sqrt()
        m = torch.minimum(zc, L - zc)[:, None]
        s = tube_width(zc, L, S, K).clamp_min(1e-12)[:, None]
        in_ramp = m < ramp
        near_source = zc[:, None] < L / 2
        # tan α = K·r / tan(K·m): lines fan out from the source charge and converge on the target charge. The
        # official code adds 1e-5 on the source side only; on the target side its tan(K(z − L + d_r)) form turns
        # into inf·0 at z = L, where an image rounded onto its own segment end would tilt by −π/2. Both sides are
        # regularised alike here, which keeps the target finite and symmetric under swapping the plates.
        q = torch.where(in_ramp, K * r / (torch.tan(K * m.clamp_min(0.0)) + 1e-5), torch.zeros_like(r))
        cos_a = torch.rsqrt(1.0 + q.square())
        sin_a = torch.where(near_source, 1.0, -1.0) * q * cos_a
        log_mass = torch.logaddexp(torch.log(cos_a + 1e-8) + d * torch.log(s / S), torch.full_like(r, math.log(0.01)))
        w = torch.softmax(-r2 / (2 * s.square()) - log_mass, dim=1)
        radial = _weighted_sum(w * sin_a / (r + 1e-11), idx, rho, xc, (1.0, source), (t, seg))
        f = (w * cos_a) @ axis
        f[:, 1:] += radial
        f = f * ((zc >= 0) & (zc <= L))[:, None]
        out[rows] = math.sqrt(n) * f / (f.norm(dim=1, keepdim=True) + 1e-5)
    return out


def segment_point(source: Tensor, target: Tensor, z: Tensor, L: float) -> Tensor:
    """The point at height z on the straight segment from source (z=0) to target (z=L), any image shape.

    `tube_target` recomputes a pair's segment point with the same operations, so a point drawn here lies on its own
    segment to the last bit (r = 0), which keeps the tube's tilt exact next to the plates.
    """
    t = (z / L).view(-1, *([1] * (source.dim() - 1)))
    return source + t * (target - source)


def uniform_z(count: int, L: float, eps: float, *, generator: torch.Generator | None = None, **like) -> Tensor:
    """Heights drawn uniformly in (eps, L − eps), away from the singular plates."""
    return eps + (L - 2 * eps) * torch.rand(count, generator=generator, **like)


def pfgm_z(
    count: int,
    L: float,
    eps: float,
    *,
    sigma_end: float = 0.1,
    tau: float = 0.03,
    M: int = 291,
    restrict_M: bool = False,
    generator: torch.Generator | None = None,
    **like,
) -> Tensor:
    """PFGM-style heights z = |N(0, σ_end²)|·(1+τ)^m, m ~ U[0, M] (docs/method.md §2), clamped to [eps, L − eps].

    They crowd next to the source plate, where the field changes fastest. `restrict_M` redraws m ~ U[0, ⌊0.7M⌋] for
    tiny z0 as the official code can. The clamp fixes the official EFM sampler, which lets z pass the target plate.
    """
    z0 = (sigma_end * torch.randn(count, generator=generator, **like)).abs()
    m = M * torch.rand(count, generator=generator, **like)
    if restrict_M:
        m = torch.where(z0 < 0.005, int(0.7 * M) * torch.rand(count, generator=generator, **like), m)
    return (z0 * (1 + tau) ** m).clamp(eps, L - eps)


def sample_points(
    source: Tensor,
    target: Tensor,
    L: float,
    *,
    scheme: PointScheme = "uniform",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    **pfgm,
) -> tuple[Tensor, Tensor]:
    """Training points on the segments between paired samples: heights by `scheme`, x = segment point. [b], [b, ...]."""
    like = {"device": source.device, "dtype": source.dtype if source.is_floating_point() else torch.float32}
    if scheme == "uniform":
        z = uniform_z(len(source), L, eps, generator=generator, **like)
    elif scheme == "pfgm":
        z = pfgm_z(len(source), L, eps, generator=generator, **pfgm, **like)
    else:
        raise ValueError(f"unknown point scheme {scheme!r}; expected 'uniform' or 'pfgm'")
    return z, segment_point(source, target, z, L)


def ot_pairing(source: Tensor, target: Tensor, *, cost: PairingCost = "sqeuclidean") -> Tensor:
    """Permutation `perm` such that (source[i], target[perm[i]]) is an exact minibatch optimal-transport assignment.

    Solves the B×B assignment problem exactly (scipy's Jonker–Volgenant solver) on squared Euclidean costs, or on
    plain Euclidean ones as the official IFM code does (`cost="euclidean"`).
    """
    from scipy.optimize import linear_sum_assignment

    if len(source) != len(target):
        raise ValueError(f"OT pairing needs equal batches: got {len(source)} and {len(target)}")
    if cost not in ("sqeuclidean", "euclidean"):
        raise ValueError(f"unknown pairing cost {cost!r}; expected 'sqeuclidean' or 'euclidean'")
    a, b = source.detach().flatten(1).double(), target.detach().flatten(1).double()
    dist = torch.cdist(a, b)
    costs = dist.square() if cost == "sqeuclidean" else dist
    _, cols = linear_sum_assignment(costs.cpu().numpy())
    return torch.as_tensor(cols, dtype=torch.long, device=source.device)
