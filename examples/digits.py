"""Build the coloured-digits 2 → 3 benchmark folders from MNIST (the recipe of docs/method.md §8), or with
`--pair thin-bold` a second pair from the same digits: thin → bold strokes.

Each grey digit g (uint8 / 255) is resized 28 → 32 bilinearly and coloured with one random hue h ~ U[0°, 360°):
RGB = g · hsv_to_rgb(h, 1, 1), so the background stays black and the stroke takes the colour. Both domains use the
same recipe. The train split of MNIST feeds `train/`, its test split `test/`; a fixed seed makes every build of the
folders byte-identical.

    python examples/digits.py digits --per-split 2000
    efm train --source digits/train/two --target digits/train/three --size 32 --no-hflip --warmup 200 \\
        --steps 2000 --charges 1024 --out runs/digits
    efm eval --model runs/digits/model --source digits/test/two --target digits/test/three \\
        --train-source digits/train/two --train-target digits/train/three

`--pair thin-bold` splits each MNIST split in two halves by position, every class in both: the first half keeps its
strokes (`thin/`), the second has them thickened by a 3×3 grey dilation before resizing (`bold/`), so the plates hold
different digits (unpaired) and a translation must keep the digit and its colour while changing the stroke.

Digits are trained at their own 32×32 and without flips: a mirrored 2 is not a 2, and flips would teach the target
plate mirrored threes that no test three resembles.

MNIST comes from `--mnist PATH` (an `mnist.npz` with x_train, y_train, x_test, y_test, or a folder where torchvision
keeps MNIST/raw/), which never touches the network; else from the project's shared data folder when it exists; else
torchvision downloads it once into `--cache` (default `$EFM_CACHE/mnist`, that is `~/.cache/efm/mnist`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from efm_cli.env import efm_cache_dir

DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist.npz"
DOMAINS = {"two": 2, "three": 3}
PAIRS = ("two-three", "thin-bold")
SIZE = 32
Splits = dict[str, tuple[np.ndarray, np.ndarray]]
"""Digits [n, 28, 28] uint8 and their labels [n], by split ("train", "test")."""


class MnistError(Exception):
    """MNIST cannot be had; the message says why and `hint` what to do."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def from_npz(path: Path) -> Splits:
    with np.load(path, allow_pickle=False) as data:
        return {"train": (data["x_train"], data["y_train"]), "test": (data["x_test"], data["y_test"])}


def from_torchvision(root: Path, download: bool) -> Splits:
    """MNIST as torchvision keeps it under root/MNIST/raw; fetched there first when missing and `download` allows
    (the ecosystem's usual source, with its checksums), so later builds run offline."""
    from torchvision.datasets import MNIST

    splits: Splits = {}
    for split, train in (("train", True), ("test", False)):
        try:
            data = MNIST(root, train=train, download=False)
        except RuntimeError as missing:
            if not download:
                raise MnistError(f"{root} holds no MNIST/raw files", "pass --mnist PATH to mnist.npz") from missing
            try:
                data = MNIST(root, train=train, download=True)
            except (RuntimeError, OSError) as error:
                reason = str(error).strip().splitlines()[0].rstrip(":") if str(error).strip() else type(error).__name__
                raise MnistError(
                    f"MNIST is not in {root} and cannot be downloaded ({reason})",
                    "pass --mnist PATH to a copy of mnist.npz, or connect to the internet once",
                ) from error
        splits[split] = (data.data.numpy(), data.targets.numpy())
    return splits


def load_mnist(mnist: Path | None, cache: Path) -> tuple[Splits, str]:
    """The MNIST splits and where they came from: `mnist` (offline), else the shared data folder, else the
    torchvision download cache."""
    if mnist is not None:
        if mnist.is_file():
            return from_npz(mnist), str(mnist)
        if mnist.is_dir():
            return from_torchvision(mnist, download=False), str(mnist)
        raise MnistError(f"{mnist} not found", "pass --mnist PATH to mnist.npz, or leave --mnist out to download")
    if DEFAULT_MNIST.is_file():
        return from_npz(DEFAULT_MNIST), str(DEFAULT_MNIST)
    return from_torchvision(cache, download=True), str(cache)


def hsv_to_rgb_full(hue_degrees: np.ndarray) -> np.ndarray:
    """RGB [n, 3] in [0, 1] of fully saturated, full-value colours with the given hues (degrees)."""
    sector = hue_degrees / 60.0
    channel_offsets = np.array([5.0, 3.0, 1.0])  # the red, green and blue ramps of the HSV hexcone
    k = (channel_offsets[None, :] + sector[:, None]) % 6.0
    return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def resize_digits(grey: np.ndarray) -> np.ndarray:
    """uint8 digits [n, 28, 28] to float [n, 32, 32] in [0, 1] (bilinear, on the float values)."""
    planes = [Image.fromarray(d.astype(np.float32) / 255.0).resize((SIZE, SIZE), Image.BILINEAR) for d in grey]
    return np.clip(np.stack([np.asarray(p) for p in planes]), 0.0, 1.0)


def colour_digits(grey: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Coloured uint8 RGB digits [n, 32, 32, 3] and the hue (degrees) each one got."""
    hues = rng.uniform(0.0, 360.0, size=len(grey))
    rgb = resize_digits(grey)[..., None] * hsv_to_rgb_full(hues)[:, None, None, :]
    return np.rint(rgb * 255.0).astype(np.uint8), hues


def thicken(grey: np.ndarray) -> np.ndarray:
    """Digits [n, 28, 28] with strokes about two pixels wider: a 3×3 grey dilation of each digit."""
    return ndimage.grey_dilation(grey, size=(1, 3, 3))


def domains(digits: np.ndarray, labels: np.ndarray, pair: str) -> dict[str, np.ndarray]:
    """The grey digits of each domain of `pair` in one split."""
    if pair == "two-three":
        return {name: digits[labels == label] for name, label in DOMAINS.items()}
    half = len(digits) // 2
    return {"thin": digits[:half], "bold": thicken(digits[half:])}


def build(splits: Splits, out: Path, per_split: int | None, seed: int, pair: str = "two-three") -> dict[str, int]:
    """Write out/{train,test}/{domain}/NNNNN.png; return how many images each folder got."""
    rng = np.random.default_rng(seed)
    written: dict[str, int] = {}
    for split, (digits, labels) in splits.items():
        for name, grey in domains(digits, labels, pair).items():
            chosen = grey[:per_split]
            coloured, _ = colour_digits(chosen, rng)
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(coloured):
                Image.fromarray(image).save(folder / f"{index:05d}.png", optimize=False)
            written[f"{split}/{name}"] = len(coloured)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the coloured MNIST 2 → 3 (or thin → bold) folders, 32×32 PNG.")
    parser.add_argument("out", type=Path, help="output folder; gets train/two, train/three, test/two, test/three")
    parser.add_argument(
        "--pair", choices=PAIRS, default="two-three", help="two-three (default) or thin-bold (train/thin, train/bold…)"
    )
    parser.add_argument("--per-split", type=int, default=None, help="at most N digits per folder (default: all)")
    parser.add_argument(
        "--mnist",
        type=Path,
        default=None,
        help="mnist.npz, or a folder holding torchvision's MNIST/raw/; read offline "
        f"(default: {DEFAULT_MNIST} if it exists, else a download into --cache)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where torchvision downloads MNIST to, once (default: $EFM_CACHE/mnist, i.e. ~/.cache/efm/mnist)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the colours (default: 0)")
    args = parser.parse_args(argv)
    if args.per_split is not None and args.per_split < 1:
        parser.error("--per-split must be at least 1")
    try:
        splits, origin = load_mnist(args.mnist, args.cache or efm_cache_dir() / "mnist")
    except MnistError as error:
        print(f"error: {error} — {error.hint}", file=sys.stderr)
        return 1
    print(f"MNIST from {origin}", file=sys.stderr)
    written = build(splits, args.out, args.per_split, args.seed, args.pair)
    for folder, count in written.items():
        print(f"{args.out / folder}\t{count} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
