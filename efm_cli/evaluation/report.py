"""`efm eval`: how good a capacitor's translations are, in numbers that are hard to fool.

The report translates a held-out source folder and measures the result against a held-out target folder:

- target rate: the share of translations a domain classifier (`efm_cli.evaluation.classifier`) calls "target".
  The classifier is trained to ignore colour statistics, and every report proves it did: cheap tricks (desaturate,
  greyscale, darken, blur, noise) are applied to the untouched source images, and if any trick raises their target
  rate by more than 0.10 the target rate is marked untrustworthy. The robust target rate counts a translation only
  when the classifier calls it "target" untouched and under every trick at once. With too few held-out images of
  a domain, or a classifier that misjudges too many of them, the whole report is marked meaningless (and never
  trustworthy): a rate of 2 images, or of a judge that calls every image "target", says nothing;
- mean absolute change per pixel, in 8-bit levels: a field network that barely moves the images cannot hide;
- Fréchet distance in the classifier's feature space between translations and real targets, next to the same
  distance for the no-op translation (real source vs real target) and the noise floor (target train vs target test);
- standard errors of the target rates (binomial) and of the FD (bootstrap over both image sets), so that two
  reports can be called different only when they are;
- structure: SSIM of the luminance of each input and its translation at 64×64;
- colour preservation: the difference between the dominant hue of each input and of its translation;
- speed: mean number of field evaluations (NFE) per image, images per second, device;
- with `against`, a second capacitor translating the same images, judged by the same classifier, and the
  differences between the two with paired standard errors: both see the same held-out images, so the noise of
  that draw, which dominates each report's own error, cancels in the difference.

Metrics are plain functions of image batches ([b, 3, H, W] in [−1, 1]), so they are tested on their own;
`report` ties them to folders, a capacitor and a classifier.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efm_cli import devices
from efm_cli.capacitor import registry
from efm_cli.capacitor.model import Capacitor
from efm_cli.env import efm_cache_dir
from efm_cli.errors import EfmError
from efm_cli.evaluation import classifier as clf
from efm_cli.images import ImageError, find_images, load, to_tensor

TRUST_MARGIN = 0.10
"""A trick may raise the source images' target rate by at most this much before the target rate is distrusted."""
MIN_HELD_OUT = 50
"""Held-out images per domain below which no rate means anything: with fewer, one image moves a rate by more than
2 points and the trick test's 0.10 margin is a handful of images."""
MIN_ACCURACY = 0.7
"""Share of each domain's held-out images the classifier must get right: a judge that calls most untouched sources
"target" (or most real targets "source") gives a target rate that says nothing about the translations."""

SSIM_SIZE = 64
BOOTSTRAP_REPS = 200
"""Resamples behind the FD's standard error: enough for a standard error good to about 5 %, a second on CPU."""
FeatureKind = Literal["classifier", "inception"]
ResizeMode = Literal["resize", "crop"]
Judge = Callable[[Tensor], Tensor]
"""Images [b, 3, H, W] in [−1, 1] → bool [b], True where judged "target"."""


class EvalError(EfmError):
    """Inputs `efm eval` cannot report on; `hint` says what to do."""


# Tricks: what a lazy translation could do to look like the target without changing the content.


def desaturate(images: Tensor, generator: torch.Generator) -> Tensor:
    """Half the colour saturation."""
    return clf.saturate(images, 0.5)


def greyscale(images: Tensor, generator: torch.Generator) -> Tensor:
    """Luminance only."""
    return clf.greyscale(images)


def darken(images: Tensor, generator: torch.Generator) -> Tensor:
    """60 % of the brightness (black stays black)."""
    return (images + 1) * 0.6 - 1


def blur(images: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian blur of σ = 1 pixel per 32 pixels of side."""
    return clf.gaussian_blur(images, images.shape[-1] / 32)


def noise(images: Tensor, generator: torch.Generator) -> Tensor:
    """Gaussian noise of standard deviation 0.1 of the full range (about 25 levels of 255), seeded."""
    return (images + 0.2 * torch.randn(images.shape, generator=generator).to(images.device)).clamp(-1, 1)


TRICKS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "desaturate": desaturate,
    "greyscale": greyscale,
    "darken": darken,
    "blur": blur,
    "noise": noise,
}


def trick_views(images: Tensor, seed: int = 0) -> dict[str, Tensor]:
    """Every trick applied to a batch; the noise is the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return {name: trick(images, generator) for name, trick in TRICKS.items()}


@dataclass(frozen=True)
class TrickTest:
    """Target rates of untouched source images and of each trick view of them; which tricks fool the judge."""

    source_rate: float
    rates: dict[str, float]
    fooled_by: list[str]

    @property
    def trustworthy(self) -> bool:
        return not self.fooled_by


def trick_test(judge: Judge, source: Tensor, seed: int = 0, margin: float = TRUST_MARGIN) -> TrickTest:
    """Does any cheap trick on the source images raise their target rate by more than `margin`?"""
    source_rate = float(judge(source).float().mean())
    rates = {name: float(judge(view).float().mean()) for name, view in trick_views(source, seed).items()}
    return TrickTest(source_rate, rates, [name for name, rate in rates.items() if rate > source_rate + margin])


def meaningless_because(
    held_out: dict[str, int],
    accuracy: dict[str, float],
    min_images: int = MIN_HELD_OUT,
    min_accuracy: float = MIN_ACCURACY,
) -> list[str]:
    """Why the report's numbers mean nothing (none: they mean something), from the held-out images and the
    classifier's accuracy on them, each by domain name."""
    reasons = [
        f"only {count} held-out {domain} images (at least {min_images} needed)"
        for domain, count in held_out.items()
        if count < min_images
    ]
    reasons += [
        f"the classifier recognises {rate:.0%} of the held-out {domain} images (at least {min_accuracy:.0%} needed)"
        for domain, rate in accuracy.items()
        if not rate >= min_accuracy
    ]
    return reasons


def robust_target(judge: Judge, images: Tensor, seed: int = 0) -> Tensor:
    """bool [b]: judged "target" untouched and under every trick view at once."""
    verdict = judge(images)
    for view in trick_views(images, seed).values():
        verdict = verdict & judge(view)
    return verdict


def mean_abs_change(before: Tensor, after: Tensor) -> float:
    """Mean |after − before| over pixels and channels, in 8-bit levels (0–255)."""
    return float((after.double() - before.double()).abs().mean() * 127.5) if len(before) else math.nan


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussian fits to two feature sets [n, d] (float64).

    tr((Σa Σb)^½) is computed as Σ √λ of the symmetric matrix Σa^½ Σb Σa^½, which has the same eigenvalues and,
    unlike a general matrix square root, no complex round-off to discard.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    mean = a.mean(axis=0) - b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(mean @ mean + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def frechet_standard_error(a: np.ndarray, b: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0) -> float:
    """Bootstrap standard error of `frechet_distance(a, b)`: both feature sets are resampled with replacement, as a
    new draw of held-out images would change both, and the spread of the resampled distances is the error.

    Two reports on the same held-out images share this noise, so comparing them with √(se₁² + se₂²) errs on the
    cautious side; `frechet_difference_standard_error` (`efm eval --against`) pairs them instead.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2 or reps < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    draws = [
        frechet_distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(reps)
    ]
    return float(np.std(draws, ddof=1))


def frechet_difference_standard_error(
    a: np.ndarray, b: np.ndarray, target: np.ndarray, reps: int = BOOTSTRAP_REPS, seed: int = 0
) -> float:
    """Bootstrap standard error of FD(a, target) − FD(b, target), where row i of `a` and of `b` come from the same
    source image: each resample draws one set of rows for both and one of the targets, so what the two distances
    owe to the draw of held-out images cancels, as it does in the difference itself."""
    a, b, target = (np.asarray(x, dtype=np.float64) for x in (a, b, target))
    if len(a) != len(b):
        raise ValueError(f"paired features need the same rows: {len(a)} and {len(b)}")
    if len(a) < 2 or len(target) < 2 or reps < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(reps):
        rows, others = rng.integers(0, len(a), len(a)), rng.integers(0, len(target), len(target))
        draws.append(frechet_distance(a[rows], target[others]) - frechet_distance(b[rows], target[others]))
    return float(np.std(draws, ddof=1))


def paired_rate_standard_error(first: Tensor, second: Tensor) -> float:
    """Standard error of the difference of two rates judged on the same images (bool [n] each): the spread of the
    per-image differences over √n, so images both get right or both get wrong add no noise."""
    if len(first) != len(second):
        raise ValueError(f"paired verdicts need the same images: {len(first)} and {len(second)}")
    if len(first) < 2:
        return math.nan
    return float((first.double() - second.double()).std() / math.sqrt(len(first)))


def rate_standard_error(rate: float, count: int) -> float:
    """Binomial standard error √(p(1 − p)/n) of a rate measured on `count` images."""
    return math.sqrt(rate * (1 - rate) / count) if count > 0 and math.isfinite(rate) else math.nan


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (x·y/d + 1)³ between two feature sets [n, d]."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    d = a.shape[1]
    kaa, kbb, kab = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
    n, m = len(a), len(b)
    within_a = (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
    within_b = (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
    return float(within_a + within_b - 2 * kab.mean())


def luminance(images: Tensor) -> Tensor:
    """BT.601 luminance [b, 1, H, W] in [0, 1] of images in [−1, 1]."""
    return (clf.greyscale(images)[:, :1] + 1) / 2


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-0.5 * (offsets / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image SSIM [b] of two grey batches [b, 1, H, W] in [0, 1]: 11×11 Gaussian window (σ 1.5), valid region."""
    window = _gaussian_window().to(a.device)
    a, b = a.double(), b.double()
    mu_a, mu_b = F.conv2d(a, window), F.conv2d(b, window)
    var_a = F.conv2d(a * a, window) - mu_a**2
    var_b = F.conv2d(b * b, window) - mu_b**2
    cov = F.conv2d(a * b, window) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2, 3))


def structure(before: Tensor, after: Tensor) -> Tensor:
    """SSIM [b] of the luminance of input and translation, both resized to 64×64: is the layout kept?"""
    return ssim(clf.resize(luminance(before), SSIM_SIZE), clf.resize(luminance(after), SSIM_SIZE))


def dominant_hue(images: Tensor) -> Tensor:
    """HSV hue (degrees) of each image's colour, [b]; NaN for an image with no colour at all.

    The circular mean of every pixel's hue weighted by its chroma (max − min of R, G, B): dark background and grey
    pixels count for nothing, a coloured stroke for everything.
    """
    rgb = (images.double() + 1) / 2
    top, which = rgb.max(dim=1)
    chroma = top - rgb.min(dim=1).values
    r, g, b = rgb.unbind(dim=1)
    safe = chroma.clamp_min(1e-12)
    sector = torch.where(
        which == 0,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(which == 1, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    angle = sector * (math.pi / 3)
    x, y = (chroma * torch.cos(angle)).sum(dim=(1, 2)), (chroma * torch.sin(angle)).sum(dim=(1, 2))
    hue = torch.remainder(torch.rad2deg(torch.atan2(y, x)), 360.0)
    colourless = torch.hypot(x, y) <= 1e-6 * chroma[0].numel()
    return torch.where(colourless, torch.full_like(hue, math.nan), hue)


def hue_difference(before: Tensor, after: Tensor) -> Tensor:
    """Absolute circular difference [b] in degrees (0–180) of the dominant hues; NaN where either has no colour."""
    delta = torch.remainder(dominant_hue(after) - dominant_hue(before), 360.0)
    return torch.minimum(delta, 360.0 - delta)


# Inception features (optional; the weights must already be on this machine).


def inception_weights_path() -> Path:
    """Where torchvision keeps its Inception v3 ImageNet weights once downloaded (TORCH_HOME/hub/checkpoints)."""
    from torchvision.models import Inception_V3_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(Inception_V3_Weights.IMAGENET1K_V1.url).name


def inception_network(device: torch.device) -> nn.Module:
    """torchvision's Inception v3 with ImageNet weights from the local cache, up to its 2048-d pooled features."""
    from torchvision.models import inception_v3

    path = inception_weights_path()
    if not path.is_file():
        raise EvalError(
            f"torchvision's Inception v3 weights are not on this machine ({path})",
            f"copy {path.name} there (TORCH_HOME sets the folder); efm never downloads them, "
            "or use --features classifier",
        )
    network = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    try:
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError) as error:
        raise EvalError(
            f"{path} is not a usable Inception v3 checkpoint ({error})", "delete it and copy it again"
        ) from error
    network.fc = nn.Identity()
    return network.to(device).eval()


@torch.inference_mode()
def inception_features(network: nn.Module, images: Tensor, batch: int = 32) -> Tensor:
    """Pooled Inception features [n, 2048]: images resized to 299×299, normalised as for ImageNet."""
    device = next(network.parameters()).device
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    parts = []
    for start in range(0, len(images), batch):
        x = (images[start : start + batch].to(device) + 1) / 2
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        parts.append(network((x - mean) / std).float().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, 2048)


# Folders to tensors.


@dataclass
class Skipped:
    """Unreadable inputs, each with its reason (collected across folders, reported once)."""

    files: list[tuple[Path, str]] = field(default_factory=list)


def load_images(
    files: Sequence[Path], size: int, mode: ResizeMode, skipped: Skipped, to_size: int | None = None
) -> Tensor:
    """Decode files into a batch [n, 3, s, s] in [−1, 1] at the capacitor's size and preprocessing.

    `to_size` resizes each image further (the classifier's side) right away, so large training folders never sit
    in memory at full size. Unreadable files are left out and recorded in `skipped`.
    """
    tensors = []
    for path in files:
        try:
            image = to_tensor(load(path).rgb, size, mode=mode)
        except ImageError as error:
            skipped.files.append((path, str(error)))
            continue
        tensors.append(image if to_size in (None, size) else clf.resize(image[None], to_size)[0])
    side = size if to_size is None else to_size
    return torch.stack(tensors) if tensors else torch.zeros(0, 3, side, side)


def split_halves(files: Sequence[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded random half of the files for training, the other half held out (both in the listing's order)."""
    order = np.random.default_rng(seed).permutation(len(files))
    train = set(order[: len(files) // 2].tolist())
    return [f for i, f in enumerate(files) if i in train], [f for i, f in enumerate(files) if i not in train]


def subset(files: Sequence[Path], count: int, seed: int) -> list[Path]:
    """At most `count` files, a seeded random choice kept in the listing's order."""
    if len(files) <= count:
        return list(files)
    keep = set(np.random.default_rng(seed).choice(len(files), size=count, replace=False).tolist())
    return [f for i, f in enumerate(files) if i in keep]


def _listing(folder: Path, what: str) -> list[Path]:
    files = find_images(folder)
    if not files:
        raise EvalError(f"{what} folder {folder} holds no images", "point it at a folder of JPEG/PNG/WebP files")
    return files


@dataclass(frozen=True)
class Roles:
    """Which files play which part, and how that was decided (said to the user when it is a fallback)."""

    test_source: list[Path]
    test_target: list[Path]
    train_source: list[Path]
    train_target: list[Path]
    split: Literal["given", "halves"]


def assign_roles(
    source: Path,
    target: Path,
    train_source: Path | None,
    train_target: Path | None,
    limit: int | None,
    seed: int,
) -> Roles:
    """Assign files: the given train folders, or else a seeded half of each evaluation folder for the classifier."""
    test_source, test_target = _listing(source, "source"), _listing(target, "target")
    if train_source is not None and train_target is not None:
        split: Literal["given", "halves"] = "given"
        fit_source, fit_target = _listing(train_source, "train source"), _listing(train_target, "train target")
    else:
        if min(len(test_source), len(test_target)) < 4:
            raise EvalError(
                "without --train-source/--train-target each folder is split in half, which needs 4 images or more",
                "add images, or pass the train folders",
            )
        split = "halves"
        fit_source, test_source = split_halves(test_source, seed)
        fit_target, test_target = split_halves(test_target, seed + 1)
    if limit is not None:
        test_source, test_target = test_source[:limit], test_target[:limit]
    return Roles(test_source, test_target, fit_source, fit_target, split)


def _rate(verdicts: Tensor) -> float:
    return float(verdicts.float().mean()) if len(verdicts) else math.nan


def _nan_mean(values: Tensor) -> tuple[float, int]:
    finite = values[torch.isfinite(values)]
    return (float(finite.mean()), len(finite)) if len(finite) else (math.nan, 0)


def _clean(value: Any) -> Any:
    """NaN and infinities become null: the JSON report stays standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _round_trip(
    capacitor: Capacitor,
    judge: Judge,
    fd: Callable[[Tensor, Tensor], float],
    sources: Tensor,
    targets: Tensor,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """What a latent capacitor's autoencoder alone does to real images: the scores of real targets after encode and
    decode are the best its translations can reach, so a gap between the two is the field's, and a low ceiling the
    autoencoder's."""
    device = next(capacitor.network.parameters()).device

    def round_trip(images: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat(
                [
                    capacitor.decode(capacitor.encode(chunk.to(device))).float().cpu()
                    for chunk in images.split(batch_size)
                ]
            )

    targets_back, sources_back = round_trip(targets), round_trip(sources)
    return {
        "target_rate": _rate(judge(targets_back)),
        "robust_target_rate": _rate(robust_target(judge, targets_back, seed)),
        "source_target_rate": _rate(judge(sources_back)),
        "fd": fd(targets_back, targets),
        "ssim": float(structure(targets, targets_back).mean()),
    }


@dataclass
class Translations:
    """One capacitor's translations of the held-out sources, with what they cost."""

    images: Tensor
    nfe: Tensor
    landed: int
    seconds: float
    device: torch.device

    def speed(self) -> dict[str, Any]:
        return {
            "nfe_mean": float(self.nfe.double().mean()),
            "images_per_second": len(self.images) / self.seconds if self.seconds > 0 else math.nan,
            "seconds": self.seconds,
            "device": str(self.device),
            "landed": self.landed,
        }


def translate_all(capacitor: Capacitor, sources: Tensor, batch_size: int, where: torch.device) -> Translations:
    """Translate `sources` forward in batches, timed (synchronised on CUDA so the time is the work's)."""
    outputs, nfe, landed = [], [], 0
    if where.type == "cuda":
        torch.cuda.synchronize(where)
    started = time.perf_counter()
    for start in range(0, len(sources), batch_size):
        result = capacitor.translate(sources[start : start + batch_size], direction="forward")
        outputs.append(result.images.float().cpu())
        nfe.append(result.solution.nfe.cpu())
        landed += int(result.solution.landed.sum())
    if where.type == "cuda":
        torch.cuda.synchronize(where)
    return Translations(torch.cat(outputs), torch.cat(nfe), landed, time.perf_counter() - started, where)


def _open_against(against: str, capacitor: Capacitor, model: str, where: torch.device) -> tuple[Path, Capacitor]:
    """The second capacitor of a paired report; it must see the pictures as the first does, or the pairing breaks."""
    folder = registry.resolve(against)
    other = Capacitor.from_pretrained(folder, device=where)

    def seen(c: Capacitor) -> tuple[int, int, str]:
        image = c.config["image"]
        return image["size"], image["channels"], c.config.get("preprocessing", {}).get("resize", "resize")

    if seen(other) != seen(capacitor):
        (size, channels, mode), (other_size, other_channels, other_mode) = seen(capacitor), seen(other)
        raise EvalError(
            f"{against} sees {other_size}×{other_size}×{other_channels} pictures ({other_mode}), {model} "
            f"{size}×{size}×{channels} ({mode}): a paired report needs both to translate the same pictures",
            "compare capacitors trained at the same --size and --resize",
        )
    return folder, other


def report(
    model: str,
    source: Path,
    target: Path,
    *,
    train_source: Path | None = None,
    train_target: Path | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    device: str = "auto",
    seed: int = 0,
    features: FeatureKind = "classifier",
    against: str | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """The full quality report of capacitor `model` translating `source` towards `target`, as a JSON-ready dict;
    with `against`, also that capacitor on the same images and the paired differences (`model` minus it)."""
    where = devices.choose(device)
    network = inception_network(where) if features == "inception" else None  # fail before any training
    folder = registry.resolve(model)
    capacitor = Capacitor.from_pretrained(folder, device=where)
    size, channels = capacitor.config["image"]["size"], capacitor.config["image"]["channels"]
    if channels != 3:
        raise EvalError(f"efm eval reports on RGB capacitors; {folder} has {channels} channel(s)")
    mode = capacitor.config.get("preprocessing", {}).get("resize", "resize")
    if mode not in ("resize", "crop"):
        raise EvalError(f"{folder}: unknown preprocessing resize mode {mode!r}", "expected 'resize' or 'crop'")
    other = _open_against(against, capacitor, model, where) if against is not None else None
    files = assign_roles(source, target, train_source, train_target, limit, seed)
    if files.split == "halves":
        say(
            "no --train-source/--train-target: the classifier trains on a seeded half of each folder "
            f"({len(files.train_source)} + {len(files.train_target)} images) and the report uses the other half"
        )
    skipped = Skipped()
    settings = clf.Settings(size=min(size, 64), seed=seed, preprocessing=mode, load_size=size)
    fit_source = subset(files.train_source, settings.max_per_domain, seed)
    fit_target = subset(files.train_target, settings.max_per_domain, seed + 1)

    unreadable_training = Skipped()  # reported, but only held-out inputs decide the exit code

    def load_for_classifier(paths: Sequence[Path]) -> Tensor:
        return load_images(paths, size, mode, unreadable_training, settings.size)

    # Beside a capacitor the user pointed at by path; embedded and Hub capacitors are not ours to write into.
    own_folder = Path(model).expanduser().is_dir()
    folders = clf.cache_folders(folder, efm_cache_dir()) if own_folder else clf.cache_folders(None, efm_cache_dir())
    trained = clf.obtain(fit_source, fit_target, load_for_classifier, settings, folders, where, say)
    say(f"domain classifier {'loaded from' if trained.cached else 'saved to'} {trained.path}")

    def judge(images: Tensor) -> Tensor:
        return clf.logits(trained.model, images) > 0

    sources = load_images(files.test_source, size, mode, skipped)
    targets = load_images(files.test_target, size, mode, skipped)
    if len(sources) == 0 or len(targets) == 0:
        raise EvalError("no readable images to evaluate", "check the --source and --target folders")
    accuracy_source, accuracy_target = 1 - _rate(judge(sources)), _rate(judge(targets))

    say(f"translating {len(sources)} images to {capacitor.target!r} on {where}…")
    ours = translate_all(capacitor, sources, batch_size, where)
    translated = ours.images

    tricks = trick_test(judge, sources, seed)
    reasons = meaningless_because(
        {capacitor.source: len(sources), capacitor.target: len(targets)},
        {capacitor.source: accuracy_source, capacitor.target: accuracy_target},
    )
    hue_error, hue_count = _nan_mean(hue_difference(sources, translated))
    floor_files = subset(files.train_target, len(sources), seed + 2)
    floor_targets = load_images(floor_files, size, mode, skipped)

    def features(images: Tensor) -> np.ndarray:
        return clf.features(trained.model, images).numpy()

    def fd(a: Tensor, b: Tensor) -> float:
        return frechet_distance(features(a), features(b))

    translated_features, target_features = features(translated), features(targets)  # once for all three FDs
    verdicts, robust_verdicts = judge(translated), robust_target(judge, translated, seed)
    target_rate, robust_rate = _rate(verdicts), _rate(robust_verdicts)

    result: dict[str, Any] = {
        "autoencoder": (
            _round_trip(capacitor, judge, fd, sources, targets, batch_size, seed) if capacitor.latent else None
        ),
        "model": {
            "ref": model,
            "path": str(folder),
            "source": capacitor.source,
            "target": capacitor.target,
            "size": size,
        },
        "data": {
            "source": str(source),
            "target": str(target),
            "train_source": str(train_source or source),
            "train_target": str(train_target or target),
            "split": files.split,
            "images": {
                "source": len(sources),
                "target": len(targets),
                "train_source": len(fit_source),
                "train_target": len(fit_target),
            },
        },
        "classifier": {
            "accuracy": (accuracy_source + accuracy_target) / 2,
            "accuracy_source": accuracy_source,
            "accuracy_target": accuracy_target,
            "size": settings.size,
            "cached": trained.cached,
            "path": str(trained.path),
            "key": trained.key,
            "train_seconds": trained.info.get("seconds"),
            "skipped": [{"path": str(path), "reason": reason} for path, reason in unreadable_training.files],
        },
        "target_rate": target_rate,
        "target_rate_se": rate_standard_error(target_rate, len(translated)),
        "robust_target_rate": robust_rate,
        "robust_target_rate_se": rate_standard_error(robust_rate, len(translated)),
        "trick_test": {
            "source_rate": tricks.source_rate,
            "rates": tricks.rates,
            "margin": TRUST_MARGIN,
            "fooled_by": tricks.fooled_by,
            "trustworthy": tricks.trustworthy and not reasons,
        },
        "meaningful": not reasons,
        "meaningless_because": reasons,
        "mean_abs_change": mean_abs_change(sources, translated),
        "fd": {
            "features": "classifier",
            "translated": frechet_distance(translated_features, target_features),
            "translated_se": frechet_standard_error(translated_features, target_features, seed=seed),
            "no_op": frechet_distance(features(sources), target_features),
            "noise_floor": frechet_distance(features(floor_targets), target_features),
        },
        "structure_ssim": float(structure(sources, translated).mean()),
        "hue_difference_deg": hue_error,
        "hue_images": hue_count,
        "speed": ours.speed(),
        "against": None,
        "inception": None,
        "skipped": [{"path": str(path), "reason": reason} for path, reason in skipped.files],
    }
    if other is not None:
        other_folder, other_capacitor = other
        say(f"translating the same {len(sources)} images with {against}…")
        theirs = translate_all(other_capacitor, sources, batch_size, where)
        their_verdicts = judge(theirs.images)
        their_robust = robust_target(judge, theirs.images, seed)
        their_rate, their_robust_rate = _rate(their_verdicts), _rate(their_robust)
        their_features = features(theirs.images)
        their_fd = frechet_distance(their_features, target_features)
        result["against"] = {
            "model": {"ref": against, "path": str(other_folder)},
            "target_rate": their_rate,
            "target_rate_se": rate_standard_error(their_rate, len(theirs.images)),
            "robust_target_rate": their_robust_rate,
            "robust_target_rate_se": rate_standard_error(their_robust_rate, len(theirs.images)),
            "fd": their_fd,
            "fd_se": frechet_standard_error(their_features, target_features, seed=seed),
            "mean_abs_change": mean_abs_change(sources, theirs.images),
            "structure_ssim": float(structure(sources, theirs.images).mean()),
            "hue_difference_deg": _nan_mean(hue_difference(sources, theirs.images))[0],
            "speed": theirs.speed(),
            "difference": {
                "target_rate": target_rate - their_rate,
                "target_rate_se": paired_rate_standard_error(verdicts, their_verdicts),
                "robust_target_rate": robust_rate - their_robust_rate,
                "robust_target_rate_se": paired_rate_standard_error(robust_verdicts, their_robust),
                "fd": result["fd"]["translated"] - their_fd,
                "fd_se": frechet_difference_standard_error(
                    translated_features, their_features, target_features, seed=seed
                ),
            },
        }
    if network is not None:
        say("computing Inception features…")
        real_targets = inception_features(network, targets).numpy()
        views = {"translated": translated, "no_op": sources, "noise_floor": floor_targets}
        feats = {name: inception_features(network, images).numpy() for name, images in views.items()}
        result["inception"] = {
            "fid": {name: frechet_distance(f, real_targets) for name, f in feats.items()},
            "kid": {name: kernel_inception_distance(f, real_targets) for name, f in feats.items()},
        }
    return _clean(result)
