"""The domain classifier behind `efm eval`: a small CNN that tells the two domains apart by content, not colour.

A translation is judged "target" when this classifier says so, so it must not be fooled by what a field network
learns first: global colour and brightness statistics. It is therefore trained on views with random hue, saturation,
brightness and contrast, random greyscale, blur and noise, and `efm eval` checks it on every run with cheap tricks
(see `efm_cli.evaluation.report`). Its pooled last-layer activations are the feature space of the report's Fréchet
distance.

Training takes a minute or two on two CPU cores for a few thousand 32×32 or 64×64 images. The result is cached as
safetensors plus a JSON sidecar, keyed by a hash of the training images' bytes and every setting that changes the
weights, so a second `efm eval` on the same data loads it instead of training again. Nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efm_cli.errors import EfmError
from efm_cli.files import atomic_path, write_json
from efm_cli.images import LUMA

FORMAT = "efm-domain-classifier"
FORMAT_VERSION = 1
CACHE_FOLDER = ".eval-cache"
"""Hidden folder beside a capacitor's config.json; hidden so image scans and uploads pass it by."""


class ClassifierError(EfmError):
    """A cached classifier that cannot be used, or training data that cannot train one."""

    default_hint = "rerun; delete the .eval-cache folder if the cache is damaged"


@dataclass(frozen=True)
class Settings:
    """Everything besides the training images that changes the classifier's weights; part of the cache key."""

    size: int
    """Side of the square images the classifier sees."""
    seed: int = 0
    steps_per_image: float = 24.0 / 64
    """Optimiser steps per training image (24 passes at batch 64), clamped to [min_steps, max_steps]. Eight passes
    left the horse/zebra classifier fooled by greyscale (+0.11 over untouched horses); 24 passes: +0.07."""
    min_steps: int = 300
    max_steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    max_per_domain: int = 2000
    """Training images per domain; larger folders contribute a seeded random subset."""
    preprocessing: str = "resize"
    """How files become squares (`images.to_tensor` mode): the capacitor's own preprocessing."""
    load_size: int = 32
    """Side files are decoded at (the capacitor's image size) before the resize to `size`."""

    def steps(self, count: int) -> int:
        return int(min(self.max_steps, max(self.min_steps, round(self.steps_per_image * count))))


class DomainClassifier(nn.Module):
    """Conv–BatchNorm–ReLU–max-pool stages down to 4×4, one more conv, global average pool, a linear logit.

    Channels double at every halving (16 at 32×32, 8 at 64×64, 64 at 8×8), so every stage costs about the same and
    64×64 inputs little more than 32×32 ones; the 128 pooled activations are the feature space of the Fréchet distance.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, width, side = 3, max(8, min(128, 512 // size)), size
        while side > 4:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            channels, width, side = width, min(128, width * 2), side // 2
        layers += [nn.Conv2d(channels, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128, 1)
        self.size = size

    def features(self, images: Tensor) -> Tensor:
        """Pooled activations [b, 128] of images [b, 3, size, size] in [−1, 1]."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """Logit [b] that the image belongs to the target domain."""
        return self.head(self.features(images)).squeeze(1)


def resize(images: Tensor, size: int) -> Tensor:
    """Square batch to `size` (antialiased when shrinking), so every input reaches the classifier at one scale."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def greyscale(images: Tensor) -> Tensor:
    """Luminance copied to all three channels (images in [−1, 1])."""
    weights = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand_as(images)


def saturate(images: Tensor, factor: Tensor | float) -> Tensor:
    """Blend with the greyscale image: 0 is grey, 1 leaves the image as it is, > 1 exaggerates colour."""
    factor = torch.as_tensor(factor, dtype=images.dtype, device=images.device).reshape(-1, 1, 1, 1)
    grey = greyscale(images)
    return grey + factor * (images - grey)


def gaussian_blur(images: Tensor, sigma: Tensor | float) -> Tensor:
    """Separable Gaussian blur with one σ (pixels) per image, as one grouped convolution over the whole batch."""
    b, c, h, w = images.shape
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1).expand(b)
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [b·c, 2r+1]
    flat = F.pad(images.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def rotate_hue(images: Tensor, angle: Tensor) -> Tensor:
    """Rotate every pixel's colour about the grey axis by `angle` radians per image (luminance kept)."""
    grey = greyscale(images)
    chroma = images - grey
    axis = images.new_ones(3) / math.sqrt(3.0)
    cos, sin = torch.cos(angle).view(-1, 1, 1, 1), torch.sin(angle).view(-1, 1, 1, 1)
    cross = torch.cross(axis.view(1, 3, 1, 1).expand_as(chroma), chroma, dim=1)
    along = (chroma * axis.view(1, 3, 1, 1)).sum(dim=1, keepdim=True) * axis.view(1, 3, 1, 1)
    rotated = chroma * cos + cross * sin + along * (1 - cos)
    return grey + rotated - greyscale(rotated)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random colour, greyscale, blur, noise and a small shift: the views a content classifier must not care about.

    Every random number comes from `generator` (on the CPU), so training is reproducible on any device.
    """
    b, _, size, _ = images.shape

    def uniform(low: float, high: float, shape: Sequence[int] = (b,)) -> Tensor:
        return (low + (high - low) * torch.rand(*shape, generator=generator)).to(images.device)

    def chance(p: float) -> Tensor:
        return (torch.rand(b, generator=generator) < p).to(images.device).view(-1, 1, 1, 1)

    x = rotate_hue(images, uniform(0.0, 2 * math.pi))
    x = saturate(x, uniform(0.0, 1.6))
    x = torch.where(chance(0.25), greyscale(x), x)
    mean = greyscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = mean + uniform(0.6, 1.4).view(-1, 1, 1, 1) * (x - mean)  # contrast
    x = (x + 1) * uniform(0.4, 1.3).view(-1, 1, 1, 1) - 1  # brightness: darker or lighter, black stays black
    x = torch.where(chance(0.3), gaussian_blur(x, uniform(0.3, 2.0) * size / 32), x)
    x = x + chance(0.3) * uniform(0.0, 0.3).view(-1, 1, 1, 1) * torch.randn(x.shape, generator=generator).to(x.device)
    shift = uniform(-1 / 8, 1 / 8, (b, 2))  # ±1/16 of the side, in grid units of [−1, 1]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return x.clamp(-1.0, 1.0)


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (folders of photos do not fit a single read comfortably)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(settings: Settings, source_files: Sequence[Path], target_files: Sequence[Path]) -> str:
    """Hash of the settings and of the training images' contents: same images and settings, same classifier.

    Contents, not names or modification times: renaming or touching a folder keeps the cache, editing, adding or
    removing an image does not. Each domain's digests are sorted, so the order a folder lists in does not matter.
    """
    digest = hashlib.sha256(json.dumps({"format": FORMAT, **asdict(settings)}, sort_keys=True).encode())
    for name, files in (("source", source_files), ("target", target_files)):
        digest.update(f"\n{name}:{len(files)}\n".encode())
        digest.update("\n".join(sorted(file_digest(path) for path in files)).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Trained:
    """A ready classifier (in eval mode) and where it came from."""

    model: DomainClassifier
    key: str
    path: Path
    cached: bool
    info: dict[str, Any]


def cache_folders(capacitor_folder: Path | None, efm_cache: Path) -> list[Path]:
    """Where to look for a cached classifier, in order: beside the capacitor (when given), then efm's own cache.

    Saving takes the first writable one, so a read-only capacitor folder falls back to efm's cache.
    """
    own = [capacitor_folder / CACHE_FOLDER] if capacitor_folder is not None else []
    return [*own, efm_cache / "classifiers"]


def _writable(folder: Path) -> bool:
    """Whether a cache file can be created in `folder` (made if missing): probe with a real temporary file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / ".probe") as temporary:
            temporary.write_bytes(b"")
        (folder / ".probe").unlink()
    except OSError:
        return False
    return True


def load_cached(folders: Sequence[Path], key: str, device: torch.device) -> Trained | None:
    """The cached classifier for `key` from the first folder that has it, or None."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for folder in folders:
        weights, sidecar = folder / f"classifier-{key[:16]}.safetensors", folder / f"classifier-{key[:16]}.json"
        if not (weights.is_file() and sidecar.is_file()):
            continue
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            if info.get("format") != FORMAT or info.get("key") != key:
                continue
            model = DomainClassifier(int(info["settings"]["size"]))
            model.load_state_dict(load_file(weights))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as error:
            raise ClassifierError(f"cached classifier {weights} is damaged ({error}); delete it to retrain") from error
        return Trained(model.to(device).eval(), key, weights, True, info)
    return None


def save(trained_model: DomainClassifier, folders: Sequence[Path], key: str, info: dict[str, Any]) -> Path:
    """Write weights and sidecar into the first writable cache folder (weights first: the sidecar marks it done)."""
    from safetensors.torch import save_file

    for folder in folders:
        if not _writable(folder):
            continue
        weights = folder / f"classifier-{key[:16]}.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in trained_model.state_dict().items()}
        with atomic_path(weights) as temporary:
            save_file(state, str(temporary), metadata={"format": FORMAT})
        write_json(weights.with_suffix(".json"), info)
        return weights
    raise ClassifierError(f"no writable cache folder for the domain classifier (tried {', '.join(map(str, folders))})")


def train(source: Tensor, target: Tensor, settings: Settings, device: torch.device) -> tuple[DomainClassifier, dict]:
    """Fit a classifier to images [n, 3, size, size] in [−1, 1] of each domain; deterministic for a seed.

    Every batch holds as many source as target images, so unequal folder sizes do not bias the decision.
    """
    if len(source) < 2 or len(target) < 2:
        raise ClassifierError("the domain classifier needs at least two training images of each domain")
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    model = DomainClassifier(settings.size).to(device)
    steps = settings.steps(len(source) + len(target))
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    half = settings.batch // 2
    labels = torch.cat([torch.zeros(half), torch.ones(half)]).to(device)
    started, loss_sum = time.perf_counter(), 0.0
    model.train()
    for step in range(steps):
        pick_source = torch.randint(len(source), (half,), generator=generator)
        pick_target = torch.randint(len(target), (half,), generator=generator)
        batch = torch.cat([source[pick_source], target[pick_target]]).to(device)
        loss = F.binary_cross_entropy_with_logits(model(augment(batch, generator)), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step >= steps - 50:
            loss_sum += loss.item()
    model.eval()
    info = {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        "final_loss": round(loss_sum / min(50, steps), 4),
        "images": {"source": len(source), "target": len(target)},
    }
    return model, info


@torch.inference_mode()
def logits(model: DomainClassifier, images: Tensor, batch: int = 256) -> Tensor:
    """Target logits [n] of images at any square size in [−1, 1], on the CPU."""
    device = next(model.parameters()).device
    parts = [model(resize(images[i : i + batch].to(device), model.size)).cpu() for i in range(0, len(images), batch)]
    return torch.cat(parts) if parts else torch.zeros(0)


@torch.inference_mode()
def features(model: DomainClassifier, images: Tensor, batch: int = 256) -> Tensor:
    """Pooled features [n, 128] of images at any square size in [−1, 1], on the CPU."""
    device = next(model.parameters()).device
    parts = [
        model.features(resize(images[i : i + batch].to(device), model.size)).cpu() for i in range(0, len(images), batch)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 128)


def obtain(
    source_files: Sequence[Path],
    target_files: Sequence[Path],
    load_images: Callable[[Sequence[Path]], Tensor],
    settings: Settings,
    folders: Sequence[Path],
    device: torch.device,
    say: Callable[[str], None] = lambda message: None,
) -> Trained:
    """The classifier for these training files and settings: from the cache when it has it, else trained and saved.

    `load_images(files)` turns files into a [n, 3, size, size] batch in [−1, 1]; it is only called on a cache miss.
    """
    key = cache_key(settings, source_files, target_files)
    found = load_cached(folders, key, device)
    if found is not None:
        return found
    say(f"training the domain classifier on {len(source_files)} + {len(target_files)} images (once for this data)…")
    model, info = train(load_images(source_files), load_images(target_files), settings, device)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "settings": asdict(settings), **info}
    path = save(model, folders, key, info)
    return Trained(model, key, path, False, info)
