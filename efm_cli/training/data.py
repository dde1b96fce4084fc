"""Training data: a plate's charges as a deterministic, resumable stream of batches.

Batch k of a stream is a pure function of (seed, k): epochs are seeded permutations of the images, flips are seeded
per epoch, and noise batches are seeded per batch. A resumed run therefore needs only the number of batches it has
consumed, whatever the number of DataLoader workers, and every DDP rank can load its own share of the same global
batch. Small folders are decoded once and kept in memory as uint8; large ones are decoded by DataLoader workers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from efm_cli.errors import EfmError
from efm_cli.images import LUMA, ImageError, find_images, load, to_tensor

ResizeMode = Literal["resize", "crop"]
CYCLEGAN_SPLITS = ("trainA", "trainB")
NOISE = "noise"


class DataError(EfmError):
    """Training data that cannot be used; the message names the folder or file."""


@dataclass(frozen=True)
class Preprocessing:
    """How a picture becomes a charge; recorded in the capacitor so that `translate` does the same."""

    size: int
    resize: ResizeMode = "resize"
    hflip: bool = False


def cyclegan_folders(root: Path) -> tuple[Path, Path] | None:
    """(trainA, trainB) when `root` is laid out like CycleGAN's datasets, else None."""
    a, b = (root / split for split in CYCLEGAN_SPLITS)
    return (a, b) if a.is_dir() and b.is_dir() else None


def domain_names(source: Path | str, target: Path | str, cyclegan_root: Path | None = None) -> tuple[str, str]:
    """Plate names for folders: 'horse2zebra/trainA|B' → horse, zebra; otherwise the folder names."""
    if cyclegan_root is not None:
        parts = re.split(r"[_-]?(?:2|to)[_-]?", cyclegan_root.resolve().name, maxsplit=1)
        if len(parts) == 2 and all(parts):
            return parts[0], parts[1]
    names = [NOISE if str(f) == NOISE else Path(f).resolve().name for f in (source, target)]
    return names[0], names[1]


def median_shorter_side(paths: list[Path], sample: int = 256) -> int | None:
    """Median shorter side in pixels of up to `sample` evenly spaced files, read from their headers only (cheap even
    for folders too large to decode up front); None when none of them can be opened."""
    step = max(1, len(paths) // sample)
    sides = []
    for path in paths[::step][:sample]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


LARGEST_DEFAULT_SIZE = 64
"""The default training size never exceeds this: 64×64 trains at about 0.3 steps/s on 2 CPU cores (README)."""
SMALLEST_DEFAULT_SIZE = 32
"""Nor falls below this, the smallest size the defaults were measured at."""


def fitting_size(folders: list[Path], step: int) -> int:
    """The default `--size`: the smaller of the plates' median shorter sides, rounded down to a multiple of
    `step`, within SMALLEST/LARGEST_DEFAULT_SIZE, so that small images are not blown up into blurred charges
    (32×32 digits train at 32) and large photos train at the size a CPU can afford."""
    sides = [median_shorter_side(find_images(folder)) for folder in folders]
    known = [side for side in sides if side is not None]
    side = min(known) if known else LARGEST_DEFAULT_SIZE
    size = min(max(side, SMALLEST_DEFAULT_SIZE), LARGEST_DEFAULT_SIZE)
    return max(step, size // step * step)


MIRROR_LIMIT = 0.7
"""Random flips are on by default only when every plate's mirror asymmetry is below this. Measured on 512 pictures
(standard error about 0.02): photos about 0.5 (horse2zebra's horses 0.50, zebras 0.49), digits 0.87-0.99 (two 0.98,
three 0.99, thin 0.87, bold 0.88), whose mirror images are not digits."""
MIRROR_SIZE, MIRROR_SAMPLE = 32, 512
"""The asymmetry is measured on up to MIRROR_SAMPLE evenly spaced images of a plate, squashed to MIRROR_SIZE."""


def mirror_asymmetry(paths: list[Path], resize: ResizeMode = "resize") -> float | None:
    """The share of a plate's pictures that are farther from every other picture of the plate once mirrored: 0.5
    when a mirror image is as much like the others as the picture itself (photos, whose things face either way),
    near 1 when a flip makes pictures the domain never shows (digits, text), near 0 when the plate already holds
    each picture's mirror image. None with fewer than three readable images.

    Distances are between luminance pictures, so colour, which a flip keeps, does not decide the nearest picture.
    It judges the whole distribution, not its mean: mixed digits average to a nearly symmetric blur, yet each
    mirrored digit lands far from every real one. Ties (a picture that is its own mirror image) count half."""
    prep = Preprocessing(size=MIRROR_SIZE, resize=resize)
    step = max(1, len(paths) // MIRROR_SAMPLE)

    def attempt(path: Path) -> Tensor | None:
        try:
            return _decode(path, prep)
        except ImageError:
            return None

    with ThreadPoolExecutor(4) as pool:
        decoded = [d for d in pool.map(attempt, paths[::step][:MIRROR_SAMPLE]) if d is not None]
    if len(decoded) < 3:
        return None
    pictures = torch.stack(decoded).double() / 255.0
    grey = torch.einsum("bchw,c->bhw", pictures, pictures.new_tensor(LUMA))
    plain, mirrored = grey.flatten(1), grey.flip(-1).flatten(1)
    others = ~torch.eye(len(plain), dtype=torch.bool)
    itself = torch.cdist(plain, plain).where(others, torch.inf).amin(1)
    flipped = torch.cdist(mirrored, plain).where(others, torch.inf).amin(1)
    return float(((flipped > itself).double() + 0.5 * (flipped == itself).double()).mean())


def _decode(path: Path, prep: Preprocessing) -> Tensor:
    """One picture as uint8 [3, size, size]: exact, since `to_tensor` is uint8 pixels / 127.5 − 1."""
    return ((to_tensor(load(path).rgb, prep.size, mode=prep.resize) + 1.0) * 127.5).round().to(torch.uint8)


class ImageFolder:
    """The images of one folder, recursively, preprocessed to the training size."""

    def __init__(self, root: Path, prep: Preprocessing, *, cache_bytes: int = 4 << 30, threads: int = 4) -> None:
        if not root.is_dir():
            raise DataError(f"{root} is not a folder")
        self.root, self.prep = root, prep
        self.paths = find_images(root)
        if not self.paths:
            raise DataError(f"{root} holds no images ({', '.join(('.jpg', '.png', '.webp', '…'))})")
        self.skipped: list[tuple[Path, str]] = []
        self.pixels: Tensor | None = None
        if len(self.paths) * 3 * prep.size**2 <= cache_bytes:
            self._preload(threads)

    def _preload(self, threads: int) -> None:
        """Decode everything once (PIL releases the GIL, so threads overlap); unreadable files are dropped."""

        def attempt(path: Path) -> Tensor | str:
            try:
                return _decode(path, self.prep)
            except ImageError as error:
                return str(error)

        with ThreadPoolExecutor(threads) as pool:
            decoded = list(pool.map(attempt, self.paths))
        kept = [(p, d) for p, d in zip(self.paths, decoded, strict=True) if isinstance(d, Tensor)]
        self.skipped = [(p, d) for p, d in zip(self.paths, decoded, strict=True) if isinstance(d, str)]
        if not kept:
            raise DataError(f"{self.root}: none of its {len(self.paths)} images can be read ({self.skipped[0][1]})")
        self.paths = [p for p, _ in kept]
        self.pixels = torch.stack([d for _, d in kept])

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def streaming(self) -> bool:
        """Whether images are decoded per batch (too many to keep in memory)."""
        return self.pixels is None

    def get(self, indices: Tensor, flips: Tensor | None = None) -> Tensor:
        """float32 [k, 3, size, size] in [−1, 1] for the given indices, mirrored where `flips` says."""
        if self.pixels is not None:
            pixels = self.pixels[indices]
        else:
            images = []
            for i in indices.tolist():
                try:
                    images.append(_decode(self.paths[i], self.prep))
                except ImageError as error:
                    raise DataError(f"{self.paths[i]}: {error}; remove it or convert it and resume") from error
            pixels = torch.stack(images)
        images = pixels.float() / 127.5 - 1.0
        if flips is not None:
            images = torch.where(flips[:, None, None, None], images.flip(-1), images)
        return images


class LatentFolder:
    """The images of an `ImageFolder` as latent codes, encoded once (mirrored copies too when the plate flips)."""

    streaming = False

    def __init__(self, images: ImageFolder, encode: Callable[[Tensor], Tensor], *, batch: int = 32) -> None:
        self.prep, self.paths, self.skipped = images.prep, images.paths, images.skipped

        def codes(flip: bool) -> Tensor:
            parts = []
            for chunk in torch.arange(len(images)).split(batch):
                parts.append(encode(images.get(chunk, torch.full((len(chunk),), flip))).float().cpu())
            return torch.cat(parts)

        self.codes = codes(False)
        self.mirrored = codes(True) if self.prep.hflip else None

    def __len__(self) -> int:
        return len(self.codes)

    def get(self, indices: Tensor, flips: Tensor | None = None) -> Tensor:
        """float32 codes [k, c, h, w]: of the mirrored image where `flips` says."""
        if flips is None or self.mirrored is None:
            return self.codes[indices]
        return torch.where(flips[:, None, None, None], self.mirrored[indices], self.codes[indices])

    def normalise(self, transform: Callable[[Tensor], Tensor]) -> None:
        """Apply `transform` (per-channel normalisation) to every stored code."""
        self.codes = transform(self.codes)
        if self.mirrored is not None:
            self.mirrored = transform(self.mirrored)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class BatchStream:
    """Batch k of a plate: rows k·B … (k+1)·B − 1 of the endless sequence of seeded epochs."""

    def __init__(
        self, data: ImageFolder | LatentFolder | None, batch: int, seed: int, *, shape: tuple[int, ...] = ()
    ) -> None:
        self.data, self.batch, self.seed, self.shape = data, batch, seed, shape
        self._epoch: tuple[int, Tensor, Tensor] | None = None

    def _order(self, epoch: int) -> tuple[Tensor, Tensor]:
        if self._epoch is None or self._epoch[0] != epoch:
            assert self.data is not None
            gen = _epoch_generator(self.seed, epoch)
            n = len(self.data)
            order = torch.randperm(n, generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
            self._epoch = (epoch, order, flips)
        return self._epoch[1], self._epoch[2]

    def rows(self, k: int, rows: slice = slice(None)) -> Tensor:
        """Batch k (or the given rows of it) as float32: images in [−1, 1], or codes."""
        positions = torch.arange(k * self.batch, (k + 1) * self.batch)[rows]
        if self.data is None:
            gen = _epoch_generator(self.seed, k)
            return torch.randn(self.batch, *self.shape, generator=gen)[rows]
        n = len(self.data)
        indices, flips = [], []
        for epoch in (positions // n).unique().tolist():
            mine = positions[positions // n == epoch] % n
            order, flip = self._order(epoch)
            indices.append(order[mine])
            flips.append(flip[mine])
        index, flip = torch.cat(indices), torch.cat(flips)
        return self.data.get(index, flip if self.data.prep.hflip else None)


class _Pairs(Dataset[tuple[Tensor, Tensor]]):
    """Map-style view for DataLoader: item k is this rank's rows of batch k of both plates."""

    def __init__(self, source: BatchStream, target: BatchStream, rows: slice) -> None:
        self.source, self.target, self.rows = source, target, rows

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, k: int) -> tuple[Tensor, Tensor]:
        return self.source.rows(k, self.rows), self.target.rows(k, self.rows)


def batches(
    source: BatchStream, target: BatchStream, *, start: int, rows: slice = slice(None), workers: int = 0
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches start, start+1, … of both plates, decoded ahead by `workers` processes when there are any."""
    loader = DataLoader(
        _Pairs(source, target, rows),
        batch_size=None,
        sampler=_Count(start),
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    return iter(loader)


class _Count:
    """start, start+1, … forever: the batch numbers a run still has to consume."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        k = self.start
        while True:
            yield k
            k += 1
