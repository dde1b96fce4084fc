"""Build the coloured-digits 2 → 3 benchmark folders from MNIST (the recipe of docs/method.md §8).

Each grey digit g (uint8 / 255) is resized 28 → 32 bilinearly and coloured with one random hue h ~ U[0°, 360°):
RGB = g · hsv_to_rgb(h, 1, 1), so the background stays black and the stroke takes the colour. Both domains use the
same recipe. The train split of MNIST feeds `train/`, its test split `test/`; a fixed seed makes every build of the
folders byte-identical.

    python examples/digits.py digits --per-split 2000
    efm train --source digits/train/two --target digits/train/three --size 32 --no-hflip --warmup 200 \\
        --steps 2000 --charges 1024 --out runs/digits
    efm eval --model runs/digits/model --source digits/test/two --target digits/test/three \\
        --train-source digits/train/two --train-target digits/train/three

Digits are trained at their own 32×32 and without flips: a mirrored 2 is not a 2, and flips would teach the target
plate mirrored threes that no test three resembles.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist" / "mnist.npz"
DOMAINS = {"two": 2, "three": 3}
SIZE = 32


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


def build(mnist: Path, out: Path, per_split: int | None, seed: int) -> dict[str, int]:
    """Write out/{train,test}/{two,three}/NNNNN.png; return how many images each folder got."""
    with np.load(mnist, allow_pickle=False) as data:
        splits = {"train": (data["x_train"], data["y_train"]), "test": (data["x_test"], data["y_test"])}
    rng = np.random.default_rng(seed)
    written: dict[str, int] = {}
    for split, (digits, labels) in splits.items():
        for name, label in DOMAINS.items():
            chosen = digits[labels == label][:per_split]
            coloured, _ = colour_digits(chosen, rng)
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index, image in enumerate(coloured):
                Image.fromarray(image).save(folder / f"{index:05d}.png", optimize=False)
            written[f"{split}/{name}"] = len(coloured)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the coloured MNIST 2 → 3 folders (32×32 PNG).")
    parser.add_argument("out", type=Path, help="output folder; gets train/two, train/three, test/two, test/three")
    parser.add_argument("--per-split", type=int, default=None, help="at most N digits per folder (default: all)")
    parser.add_argument("--mnist", type=Path, default=DEFAULT_MNIST, help=f"mnist.npz (default: {DEFAULT_MNIST})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the colours (default: 0)")
    args = parser.parse_args(argv)
    if args.per_split is not None and args.per_split < 1:
        parser.error("--per-split must be at least 1")
    if not args.mnist.is_file():
        print(f"error: {args.mnist} not found — pass --mnist PATH to mnist.npz", file=sys.stderr)
        return 1
    written = build(args.mnist, args.out, args.per_split, args.seed)
    for folder, count in written.items():
        print(f"{args.out / folder}\t{count} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
