"""The training step of a capacitor: points between the plates, the minibatch field there, and a regression onto it.

One step (docs/method.md §4): pair the two charge batches (by index, or by an exact minibatch OT assignment),
draw points on the first b pair segments, compute the field of all 2B charges at those points, and regress the
network onto it with Adam, warm-up, gradient clipping and an EMA of the weights. Unlike the official code it runs
the network once per step, skips a step whose loss or gradient is not finite (and counts it), and never swaps EMA
weights into the trained ones (docs/method.md §4).

Randomness is reseeded from (seed, step) at every step, so a run resumed at step k draws exactly what an
uninterrupted run draws at step k; the checkpoint needs no generator states.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from efm_cli.devices import Precision, autocast
from efm_cli.field import coulomb_target, ot_pairing, sample_points, tube_target
from efm_cli.training import checkpoint

FieldKind = Literal["coulomb", "tube"]
Pairing = Literal["independent", "ot"]
CoulombMode = Literal["repo", "phys"]
Scheme = Literal["uniform", "pfgm"]
Decay = Literal["constant", "cosine"]

DEFAULT_L: dict[str, float] = {"coulomb": 10.0, "tube": 20.0}
"""Plate distances by field kind (docs/method.md §7)."""

DEFAULT_CHARGES: dict[str, int] = {"coulomb": 64, "tube": 256}
"""Charges per plate by field kind: EFM's 64, IFM's 256; more charges give the OT plan more choice
(docs/method.md §7, README's digits table)."""


def default_tube_width(size: int, channels: int = 3) -> float:
    """S grown with the typical distance between paired images (∝ √D, docs/method.md §7) from 5 at 32×32 RGB: a
    width far above the pair distances averages the directions of many tubes and the lines barely move."""
    return 5.0 * math.sqrt(channels * size * size / (3 * 32 * 32))


@dataclass(frozen=True)
class FieldSpec:
    """The field a capacitor learns, its training points and pairing; stored in config.json as `field`."""

    kind: FieldKind = "tube"
    L: float = 20.0
    eps: float = 1e-3
    mode: CoulombMode = "repo"
    gamma: float = 5.0
    S: float = 10.0
    K: float | None = None
    scheme: Scheme = "uniform"
    plan: Pairing = "ot"

    def __post_init__(self) -> None:
        if self.kind not in ("coulomb", "tube"):
            raise ValueError(f"unknown field kind {self.kind!r}; expected 'coulomb' or 'tube'")
        if self.plan not in ("independent", "ot"):
            raise ValueError(f"unknown pairing plan {self.plan!r}; expected 'independent' or 'ot'")
        if not (0 < self.L < 1e6 and 0 < self.eps < self.L / 2 and self.S > 0 and self.gamma >= 0):
            raise ValueError(f"invalid field settings: L={self.L}, eps={self.eps}, S={self.S}, gamma={self.gamma}")

    def to_config(self) -> dict[str, Any]:
        """The capacitor's `field` section: only what applies to this kind."""
        shared = {"kind": self.kind, "L": self.L, "eps": self.eps, "scheme": self.scheme, "plan": self.plan}
        if self.kind == "coulomb":
            return {**shared, "mode": self.mode, "gamma": self.gamma}
        return {**shared, "S": self.S, "K": self.K if self.K is not None else math.pi / self.L}

    def target_at(self, z: Tensor, x: Tensor, source: Tensor, target: Tensor) -> Tensor:
        """The field target [b, 1 + D] at points (z, x), from charge batches paired row by row."""
        if self.kind == "coulomb":
            return coulomb_target(z, x, source, target, self.L, mode=self.mode, gamma=self.gamma)
        return tube_target(z, x, source, target, self.L, S=self.S, K=self.K)


@dataclass(frozen=True)
class Schedule:
    """Optimiser settings (docs/method.md §4); `total` enables the cosine decay to `final` × lr."""

    lr: float = 2e-4
    warmup: int = 1000
    decay: Decay = "constant"
    total: int | None = None
    final: float = 0.1
    clip: float = 1.0
    ema: float = 0.9999

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine, which reaches
        the floor on the last step (`total` − 1)."""
        rate = self.lr * min((step + 1) / self.warmup, 1.0) if self.warmup > 0 else self.lr
        if self.decay == "cosine" and self.total and step >= self.warmup:
            progress = min((step - self.warmup) / max(self.total - 1 - self.warmup, 1), 1.0)
            rate *= self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * progress))
        return rate


class EMA:
    """Exponential moving average of the parameters, with the warm-up decay min(d, (1 + t)/(10 + t))."""

    def __init__(self, network: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone().float() for p in network.parameters()]

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        params = [p.detach().float() for p in network.parameters()]
        torch._foreach_lerp_(self.shadow, params, 1.0 - d)

    @torch.no_grad()
    def copy_to(self, network: nn.Module) -> nn.Module:
        for p, s in zip(network.parameters(), self.shadow, strict=True):
            p.copy_(s)
        return network


@dataclass
class StepStats:
    """What one step did: its loss (NaN when skipped), gradient norm before clipping, and whether it was applied."""

    loss: float
    grad_norm: float
    lr: float
    applied: bool


@dataclass
class Share:
    """This process's part of a data-parallel step: its rows of the points, and how to gather charges."""

    rank: int = 0
    world: int = 1

    def rows(self, count: int) -> slice:
        if count % self.world:
            raise ValueError(f"{count} rows cannot be split evenly over {self.world} processes")
        share = count // self.world
        return slice(self.rank * share, (self.rank + 1) * share)


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (1 << 62)


class Trainer:
    """Owns the network, optimiser, EMA and step counter of one run; `step()` applies one minibatch."""

    def __init__(
        self,
        network: nn.Module,
        spec: FieldSpec,
        schedule: Schedule,
        *,
        points: int,
        seed: int = 0,
        precision: Precision = "fp32",
        model: nn.Module | None = None,
        share: Share | None = None,
    ) -> None:
        self.network, self.spec, self.schedule, self.points, self.seed = network, spec, schedule, points, seed
        self.model = model if model is not None else network
        self.share = share or Share()
        self.device = next(network.parameters()).device
        self.precision = precision if self.device.type == "cuda" else "fp32"
        self.optimizer = torch.optim.Adam(network.parameters(), lr=schedule.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.ema = EMA(network, schedule.ema)
        self.step = 0
        self.skipped = 0

    def _autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.device.type, self.precision)

    def loss(self, source: Tensor, target: Tensor) -> Tensor:
        """This process's share of the step's loss: MSE of the network against the field at its points."""
        gen = torch.Generator(device=self.device).manual_seed(_step_seed(self.seed, self.step))
        if self.spec.plan == "ot":
            target = target[ot_pairing(source, target)]
        b = min(self.points, len(source))
        z, x = sample_points(
            source[:b], target[:b], self.spec.L, scheme=self.spec.scheme, eps=self.spec.eps, generator=gen
        )
        rows = self.share.rows(b)
        z, x = z[rows], x[rows]
        with torch.no_grad():
            wanted = self.spec.target_at(z, x, source, target)
        with self._autocast():
            f_z, f_x = self.model(z, x)
        predicted = torch.cat([f_z.float()[:, None], f_x.float().flatten(1)], dim=1)
        return (predicted - wanted).square().mean()

    def step_on(self, source: Tensor, target: Tensor) -> StepStats:
        """One optimiser step on full charge batches [B, ...] of both plates (already on the device)."""
        torch.manual_seed(_step_seed(self.seed, self.step) + 1)  # dropout
        self.network.train()
        lr = self.schedule.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(source, target)
        finite = self._everywhere(torch.isfinite(loss.detach()))
        grad_norm = math.nan
        applied = False
        if finite:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.schedule.clip)
            grad_norm = float(norm)
            if math.isfinite(grad_norm) or self.scaler.is_enabled():
                scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
                self.scaler.step(self.optimizer)
                self.scaler.update()
                applied = scale is None or self.scaler.get_scale() >= scale
        if applied:
            self.ema.update(self.network)
        else:
            self.skipped += 1
        self.step += 1
        return StepStats(
            loss=self._mean(loss.detach()) if finite else math.nan, grad_norm=grad_norm, lr=lr, applied=applied
        )

    def _mean(self, value: Tensor) -> float:
        """The step's loss over all processes (each holds the mean over its share of the points)."""
        if self.share.world > 1:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.share.world
        return float(value)

    def _everywhere(self, flag: Tensor) -> bool:
        """True only if the flag holds on every process, so that all ranks skip a step together."""
        if self.share.world > 1:
            import torch.distributed as dist

            flag = flag.to(torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    def ema_network(self, network: nn.Module) -> nn.Module:
        """`network` (a module of the same architecture) with this run's EMA weights, in eval mode."""
        return self.ema.copy_to(network).eval()

    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
        """Everything a resumed run needs: tensors by file name, and the JSON-able rest."""
        tensors, groups = checkpoint.optimizer_tensors(self.optimizer)
        meta = {
            "step": self.step,
            "skipped": self.skipped,
            "seed": self.seed,
            "ema_updates": self.ema.updates,
            "param_groups": groups,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        model = {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()}
        names = [name for name, _ in self.network.named_parameters()]
        ema = {name: s.cpu().contiguous() for name, s in zip(names, self.ema.shadow, strict=True)}
        return {"model": model, "ema": ema, "optimizer": tensors}, meta

    def load_state(self, tensors: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> None:
        """Restore what `state` saved; the checkpoint must come from the same architecture."""
        self.network.load_state_dict(tensors["model"])
        names = [name for name, _ in self.network.named_parameters()]
        self.ema.shadow = [tensors["ema"][name].to(self.device).float() for name in names]
        self.ema.updates = int(meta["ema_updates"])
        checkpoint.load_optimizer(self.optimizer, tensors["optimizer"], meta["param_groups"], self.device)
        if meta.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.skipped = int(meta["step"]), int(meta["skipped"])


def settings_dict(spec: FieldSpec, schedule: Schedule) -> dict[str, Any]:
    """Both settings as plain JSON, for the run's config.json."""
    return {"field": asdict(spec), "schedule": asdict(schedule)}
