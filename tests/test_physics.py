"""End to end physics: held-out source samples carried along the exact minibatch field land on the target.

No network is involved: the field at every point is the target a capacitor is trained on, computed from a minibatch
of charges (docs/method.md §3), and the integrator follows its lines between the plates L = 6 apart. The 2-D toy
pairs are those of the papers' notebooks. Landing points are compared with fresh target samples by energy distance,
against the noise floor: the energy distance between two independent target samples of the same size. Both sides of
that comparison are averaged over several fresh samples, so that one unlucky draw decides nothing.
"""

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from efm_cli.field import coulomb_target, tube_target
from efm_cli.integrator import Solution, integrate

L = 6.0
HELD_OUT = 512
FRESH = 32

Sampler = Callable[[int, torch.Generator], Tensor]


def gaussian(n: int, gen: torch.Generator) -> Tensor:
    return torch.randn(n, 2, generator=gen, dtype=torch.float64)


def two_gaussians(n: int, gen: torch.Generator) -> Tensor:
    """½ N((−8, 0), I) + ½ N((8, 0), I)."""
    side = torch.randint(0, 2, (n,), generator=gen).double() * 16.0 - 8.0
    return gaussian(n, gen) + torch.stack([side, torch.zeros(n, dtype=torch.float64)], dim=1)


def swiss_roll(n: int, gen: torch.Generator) -> Tensor:
    """scikit-learn's swiss roll with noise 0.8, its first and third coordinates, divided by 5, as in the notebooks."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=gen, dtype=torch.float64))
    roll = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (roll + 0.8 * gaussian(n, gen)) / 5


def energy_distance(a: Tensor, b: Tensor) -> float:
    """2·E|A − B| − E|A − A'| − E|B − B'| (V-statistics)."""
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def distance_and_floor(landed: Tensor, target: Sampler, gen: torch.Generator) -> tuple[float, float]:
    """Mean energy distance of the landing points to FRESH target samples, and the mean noise floor."""
    fresh = [target(len(landed), gen) for _ in range(FRESH)]
    distance = sum(energy_distance(landed, f) for f in fresh) / FRESH
    floor = sum(energy_distance(fresh[i], fresh[i - 1]) for i in range(1, FRESH, 2)) / (FRESH // 2)
    return distance, floor


def carry(kind: str, target: Sampler, charges: int, gen: torch.Generator) -> tuple[Solution, Tensor]:
    """Carry held-out Gaussian samples across the capacitor along the exact field; returns the solution and charges."""
    source_charges, target_charges = gaussian(charges, gen), target(charges, gen)
    held_out = gaussian(HELD_OUT, gen)
    if kind == "coulomb":

        def field(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            t = coulomb_target(z, x, source_charges, target_charges, L, mode="phys")
            return t[:, 0], t[:, 1:]

        # Start above the discrete charges; follow lines through the target plate until they come back.
        return integrate(field, held_out, 0.3, L, rtol=1e-3, atol=1e-3, behind="follow"), target_charges

    def field(z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        t = tube_target(z, x, source_charges, target_charges, L, S=1.0)
        return t[:, 0], t[:, 1:]

    # Tube width S = 1 as in the IFM toy runs; start and stop where tubes are wider than the charges are apart.
    return integrate(field, held_out, 0.1, L - 0.1, rtol=1e-3, atol=1e-3), target_charges


@pytest.mark.parametrize("target", [two_gaussians, swiss_roll], ids=["two-gaussians", "swiss-roll"])
def test_tube_field_carries_source_samples_onto_the_target(target: Sampler) -> None:
    gen = torch.Generator().manual_seed(0)
    sol, _ = carry("tube", target, 4096, gen)
    assert sol.landed.all(), sol.summary()
    distance, floor = distance_and_floor(sol.x, target, gen)
    assert distance <= 3 * floor, (distance, floor)


def test_coulomb_field_lands_every_line_on_the_target_charges() -> None:
    """Forward lines of the exact Coulomb field all reach the target plate, next to its charges, in both clusters.

    They do not reproduce the target distribution within 3× the noise floor (measured 5–10×): half of the flux
    leaves the small source plate backwards and reaches the outer sides of the clusters around the outside of the
    capacitor, and the practical algorithm, ours and the papers', starts every line forwards (docs/method.md §1). What
    is asserted is what forward lines do get right, and an energy distance far below that of no transport at all.
    """
    gen = torch.Generator().manual_seed(0)
    sol, charges = carry("coulomb", two_gaussians, 1024, gen)
    assert sol.landed.all(), sol.summary()
    assert torch.equal(sol.z, torch.full_like(sol.z, L))
    assert sol.crossed.any()  # some lines did pass through the plate and were followed back
    assert torch.cdist(sol.x, charges).min(1).values.median() < 0.05
    right = (sol.x[:, 0] > 0).double().mean().item()
    assert abs(right - 0.5) < 3 * math.sqrt(0.25 / HELD_OUT) + 0.02
    distance, _ = distance_and_floor(sol.x, two_gaussians, gen)
    untouched, _ = distance_and_floor(gaussian(HELD_OUT, gen), two_gaussians, gen)
    assert distance < 0.1 * untouched, (distance, untouched)


def test_the_energy_check_can_fail() -> None:
    """Untouched source samples are far beyond 3× the noise floor: the checks above are not vacuous."""
    gen = torch.Generator().manual_seed(0)
    for target in (two_gaussians, swiss_roll):
        distance, floor = distance_and_floor(gaussian(HELD_OUT, gen), target, gen)
        assert distance > 10 * floor
