"""Field networks: they learn the field (f_z, f_x) between the plates from the minibatch targets of `field`.

`UNetField` is the DDPM-style UNet of the papers (docs/method.md §6): GroupNorm, SiLU, residual blocks, attention at
low resolution, the height z entering through a sinusoidal embedding of 1000·z/L added in every residual block. Its
output has C + 1 channels: the first C are f_x, the last one is averaged over the image into the scalar f_z, times
√N (N = 1 + C·H·W), because the targets' height entry is O(√N) and a plain mean would stay far too small for
thousands of steps. `MLPField` is the same interface for low-dimensional (toy) data. Both are described completely
by a plain config dict, so that a capacitor's config.json rebuilds its network with no flags.

Samples never interact (GroupNorm, not BatchNorm), so the integrator may drop finished samples from a batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efm_cli.tensors import count, meta_shapes

Z_SCALE = 1000.0
MAX_ATTENTION_SIDE = 64
MAX_ATTENTION = MAX_ATTENTION_SIDE**2
"""Most positions one attention block may cover: its memory and time grow with their square, and 128×128 took
2.9 GB and minutes per image on a CPU (64×64: a sixteenth). The presets stay valid up to tiny at 128 pixels, small at
256 and base at 512; the embedded capacitors attend over 8×8 and 16×16."""


def height_embedding(z: Tensor, L: float, dim: int) -> Tensor:
    """Sinusoidal features [sin, cos] of 1000·z/L at `dim`/2 geometric frequencies (DDPM's timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=z.device, dtype=torch.float32) / max(half - 1, 1))
    angles = (Z_SCALE * z.float() / L)[:, None] * freqs[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 for wide layers, fewer for narrow ones, always with at least 4 channels a group."""
    return max(1, min(32, channels // 4))


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialised: residual branches start as the identity and the field starts at zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block: norm, SiLU, conv, + projected height embedding, norm, SiLU, dropout, conv."""

    def __init__(self, cin: int, cout: int, emb: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(cin), cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.drop = nn.GroupNorm(_groups(cout), cout, eps=1e-6), nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a low-resolution feature map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
        a = F.scaled_dot_product_attention(q, k, v)
        return x + self.out(a.transpose(1, 2).reshape(b, c, h, w))


@dataclass(frozen=True)
class UNetConfig:
    """Everything that defines a `UNetField`; stored verbatim in a capacitor's config.json."""

    channels: int = 3
    size: int = 64
    base: int = 128
    mult: tuple[int, ...] = (1, 2, 2, 2)
    blocks: int = 2
    attention: tuple[int, ...] = (16,)
    dropout: float = 0.1
    L: float = 20.0

    def __post_init__(self) -> None:
        levels = len(self.mult)
        whole = all(type(v) is int for v in (self.channels, self.size, self.base, self.blocks, *self.mult))
        if not whole:  # `true` in a JSON config is an int to Python, 32.0 a float that torch would refuse late
            raise ValueError(f"channels, size, base, blocks and mult must be integers in {self}")
        if self.size % 8 or self.size % 2 ** (levels - 1):
            raise ValueError(f"image size {self.size} must be a multiple of 8 and of {2 ** (levels - 1)}")
        sane = (
            4 <= self.base <= 1024
            and self.base % 4 == 0
            and 1 <= self.channels <= 64
            and 1 <= self.blocks <= 8
            and 1 <= levels <= 8
            and all(1 <= m <= 16 for m in self.mult)
            and 0 <= self.dropout < 1
            and 0 < self.L < math.inf
        )
        if not sane:
            raise ValueError(f"invalid UNet config {self}")
        side = self.attention_side
        if side * side > MAX_ATTENTION:
            raise ValueError(
                f"the UNet's attention would cover {side}×{side} = {side * side:,} positions, more than "
                f"{MAX_ATTENTION:,} ({MAX_ATTENTION_SIDE}×{MAX_ATTENTION_SIDE}); give 'mult' more levels (each "
                f"halves the resolution), list no resolution above {MAX_ATTENTION_SIDE} in 'attention', or use a "
                "smaller image size"
            )

    @property
    def attention_side(self) -> int:
        """Side of the widest feature map self-attention covers: the middle block's (the lowest resolution), or a
        larger resolution listed in `attention`."""
        sides = [self.size >> level for level in range(len(self.mult))]
        return max(side for side in sides if side == sides[-1] or side in self.attention)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "unet", **asdict(self)}


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"base": 16, "mult": (1, 2), "blocks": 1, "attention": (), "dropout": 0.0},
    "small": {"base": 32, "mult": (1, 2, 2), "blocks": 2, "attention": (8,), "dropout": 0.1},
    "base": {"base": 128, "mult": (1, 2, 2, 2), "blocks": 2, "attention": (16,), "dropout": 0.1},
}
"""Named sizes: `tiny` for tests, `small` trainable on 2 CPU cores at 32×32, `base` (≈ 36 M parameters) for GPUs."""


class UNetField(nn.Module):
    """DDPM-style UNet predicting the field (f_z [b], f_x [b, C, H, W]) at heights z [b] and images x."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        emb = 4 * c.base
        self.embed = nn.Sequential(nn.Linear(c.base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(c.channels, c.base, 3, padding=1)
        self.down, widths, width, res = nn.ModuleList(), [c.base], c.base, c.size
        for level, m in enumerate(c.mult):
            for _ in range(c.blocks):
                self.down.append(self._stage(width, c.base * m, res))
                width = c.base * m
                widths.append(width)
            if level < len(c.mult) - 1:
                self.down.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
                widths.append(width)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(width, width, emb, c.dropout), AttnBlock(width)])
        self.mid_out = ResBlock(width, width, emb, c.dropout)
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(c.mult))):
            for _ in range(c.blocks + 1):
                self.up.append(self._stage(width + widths.pop(), c.base * m, res))
                width = c.base * m
            if level > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, width, 3, 1, 1))
                )
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(width), width, eps=1e-6)
        self.conv_out = _zero(nn.Conv2d(width, c.channels + 1, 3, padding=1))
        self.z_scale = math.sqrt(1 + c.channels * c.size**2)

    def _stage(self, cin: int, cout: int, res: int) -> nn.ModuleList:
        """A residual block, followed by attention at the configured resolutions."""
        parts: list[nn.Module] = [ResBlock(cin, cout, 4 * self.config.base, self.config.dropout)]
        if res in self.config.attention:
            parts.append(AttnBlock(cout))
        return nn.ModuleList(parts)

    @staticmethod
    def _run(stage: nn.ModuleList, h: Tensor, emb: Tensor) -> Tensor:
        for part in stage:
            h = part(h, emb) if isinstance(part, ResBlock) else part(h)
        return h

    def forward(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        emb = self.embed(height_embedding(z, self.config.L, self.config.base).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = self._run(module, h, emb) if isinstance(module, nn.ModuleList) else module(h)
            skips.append(h)
        h = self.mid_out(self.mid[1](self.mid[0](h, emb)), emb)
        for module in self.up:
            if isinstance(module, nn.ModuleList):
                h = self._run(module, torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = module(h)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out[:, -1].mean(dim=(1, 2)) * self.z_scale, out[:, :-1]


@dataclass(frozen=True)
class MLPConfig:
    """A `MLPField` for points in R^dim (toy data)."""

    dim: int = 2
    width: int = 256
    depth: int = 3
    L: float = 6.0
    embed: int = 64

    def __post_init__(self) -> None:
        if self.dim < 1 or self.width < 1 or self.depth < 1 or self.embed < 2 or self.L <= 0:
            raise ValueError(f"invalid MLP config {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "mlp", **asdict(self)}


class MLPField(nn.Module):
    """Toy field network: x and the height embedding, through SiLU layers, to (f_z, f_x) in R^(1+dim)."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = c = config
        layers: list[nn.Module] = [nn.Linear(c.dim + c.embed, c.width), nn.SiLU()]
        for _ in range(c.depth - 1):
            layers += [nn.Linear(c.width, c.width), nn.SiLU()]
        layers.append(nn.Linear(c.width, c.dim + 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(torch.cat([x, height_embedding(z, self.config.L, self.config.embed).to(x.dtype)], dim=1))
        return out[:, 0], out[:, 1:]


MAX_PARAMETERS = 2_000_000_000
"""Largest network a config may ask for (`base` has 36 M): an untrusted config must not exhaust memory."""


def build(config: dict[str, Any]) -> nn.Module:
    """The network a config dict (as stored in config.json) describes; sized on the meta device before allocation."""
    kind, rest = config.get("kind"), {k: v for k, v in config.items() if k != "kind"}
    if kind == "unet":
        rest = {k: tuple(v) if k in ("mult", "attention") else v for k, v in rest.items()}
        unet = UNetConfig(**rest)
        parameters = count(meta_shapes(lambda: UNetField(unet)))
        if parameters > MAX_PARAMETERS:
            raise ValueError(f"the network would have {parameters:.3g} parameters, more than {MAX_PARAMETERS:.3g}")
        return UNetField(unet)
    if kind == "mlp":
        return MLPField(MLPConfig(**rest))
    raise ValueError(f"unknown network kind {kind!r}; expected 'unet' or 'mlp'")


def preset(name: str, *, channels: int = 3, size: int = 64, L: float = 20.0) -> UNetConfig:
    """The UNet config of a named preset at the given image shape and plate distance."""
    if name not in PRESETS:
        raise ValueError(f"unknown network preset {name!r}; expected one of {', '.join(PRESETS)}")
    return UNetConfig(channels=channels, size=size, L=L, **PRESETS[name])
