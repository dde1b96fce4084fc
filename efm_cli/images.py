"""Images in, images out: decode any common file to 8-bit RGB, convert to and from model tensors, write atomically.

Everything a translation run touches on disk goes through here, so the rules of README's "Output layout"
live in one place: inputs are only ever read, every PIL mode becomes RGB with its alpha kept aside, unreadable files
raise `ImageError` with a short reason the CLI can print, and outputs appear under their final name only once complete.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from efm_cli.errors import EfmError
from efm_cli.files import atomic_path

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
"""Lower-case file suffixes `find_images` picks up; matching is case-insensitive."""

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights: the grey a person sees in an RGB colour."""
OUTPUT_MARKER = ".efm-output"
"""Hidden file that marks a folder of `efm translate` outputs; `find_images` does not enter such folders."""

_SAVE_FORMATS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
}
_ALPHA_FORMATS = frozenset({"PNG", "WEBP", "TIFF"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(EfmError):
    """An input that cannot be read as an image; the message is a short reason fit for a one-line skip notice."""

    default_hint = "check the image file"


@dataclass(frozen=True)
class Loaded:
    """A decoded input: 8-bit RGB pixels, the alpha set aside for re-attaching on save, and what the file was."""

    rgb: np.ndarray
    """uint8 [H, W, 3]."""
    alpha: np.ndarray | None
    """uint8 [H, W], or None when the file has no transparency."""
    size: tuple[int, int]
    """(width, height) after EXIF orientation, the size outputs are written at by default."""
    format: str
    """PIL format name of the file, e.g. "JPEG" or "PNG"."""
    mode: str
    """PIL mode of the file before conversion, e.g. "P" or "I;16"."""


def load(path: str | os.PathLike[str]) -> Loaded:
    """Decode the first frame of `path` to upright RGB; any reason it cannot be read becomes an `ImageError`.

    The decode is forced here (not left lazy) so a truncated file is reported as unreadable instead of failing later
    inside a batch. PIL's decompression-bomb warning is treated as an error: a translation run has no use for images
    that large, and a warning would only scroll past.
    """
    path = Path(path)
    try:
        empty = path.stat().st_size == 0
    except OSError as error:
        raise ImageError(f"cannot read ({error.strerror or error})") from error
    if empty:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                file_format, mode = image.format or "", image.mode
                upright = ImageOps.exif_transpose(image)
    except UnidentifiedImageError as error:
        raise ImageError("not an image") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(_too_large_reason(error)) from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError("truncated or corrupt") from error
    rgb, alpha = _to_rgb(upright)
    return Loaded(rgb=rgb, alpha=alpha, size=upright.size, format=file_format, mode=mode)


def _too_large_reason(error: Exception) -> str:
    """PIL states the pixel count only in its message; the limit quoted is the one enforced (warnings are errors)."""
    match = re.search(r"\((\d+) pixels\)", str(error))
    if match is None:
        return f"too large (limit {Image.MAX_IMAGE_PIXELS} pixels)"
    return f"too large ({match.group(1)} pixels, limit {Image.MAX_IMAGE_PIXELS})"


def _to_rgb(image: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Any PIL mode to uint8 RGB plus alpha (None when the image has no transparency)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        grey = _wide_grey_to_uint8(image)
        return np.repeat(grey[:, :, None], 3, axis=2), None
    try:
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"))
            return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
        return np.asarray(image.convert("RGB")), None
    except ValueError as error:
        raise ImageError(f"unsupported mode {image.mode}") from error


def _wide_grey_to_uint8(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float grey to 8 bits by scaling their range, never by clipping at 255.

    16-bit values map 0..65535 to 0..255 (divide by 257). Mode "I" usually holds 16-bit data too (TIFF, older PNG
    decoders) and is scaled the same way when it fits; mode "F" is taken as 0..1 when it fits. Anything else is
    stretched from its own minimum to its maximum, the only range such data reliably has.
    """
    values = np.asarray(image).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)


def to_tensor(rgb: np.ndarray, size: int, *, mode: Literal["resize", "crop"] = "resize") -> torch.Tensor:
    """uint8 RGB [H, W, 3] to the model's input: float32 [3, size, size] in [−1, 1].

    "resize" squashes the whole picture to a square; "crop" keeps the aspect ratio by scaling the short side to
    `size` and taking the centre square. PIL's bicubic resize antialiases when shrinking and clamps to 0..255.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 RGB [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
    if mode not in ("resize", "crop"):
        raise ValueError(f"unknown mode {mode!r}: expected 'resize' or 'crop'")
    height, width = rgb.shape[:2]
    box = None
    if mode == "crop":
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        box = (left, top, left + side, top + side)
    square = Image.fromarray(rgb).resize((size, size), Image.BICUBIC, box=box, reducing_gap=None)
    pixels = torch.from_numpy(np.array(square)).permute(2, 0, 1)
    return pixels.to(torch.float32) / 127.5 - 1.0


def from_tensor(t: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Model output float [3, h, w] in [−1, 1] to uint8 RGB [H, W, 3] at `size` = (width, height).

    The resize runs on the float values, before rounding, so going back to the input's pixel size costs one
    quantisation, not two; it uses the same PIL bicubic kernel as `to_tensor`.
    """
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a [3, h, w] tensor, got {list(t.shape)}")
    channels = ((t.detach().to("cpu", torch.float32) + 1.0) * 127.5).numpy()
    planes = [np.asarray(Image.fromarray(c).resize(size, Image.BICUBIC, reducing_gap=None)) for c in channels]
    return np.clip(np.rint(np.stack(planes, axis=2)), 0, 255).astype(np.uint8)


def save_atomic(
    path: str | os.PathLike[str],
    rgb: np.ndarray,
    *,
    alpha: np.ndarray | None = None,
    format: str | None = None,
    quality: int = 95,
) -> None:
    """Write an image so that `path` only ever holds a complete file: the old one, or the new one.

    See `files.atomic_path`. `alpha` is re-attached for PNG, WebP and TIFF and dropped for the formats without one.
    """
    path = Path(path)
    file_format = (format or _SAVE_FORMATS.get(path.suffix.lower(), "")).upper()
    if not file_format:
        raise ValueError(f"cannot tell the image format from {path.name!r}; pass format=")
    if alpha is not None and file_format in _ALPHA_FORMATS:
        image = Image.fromarray(np.dstack([rgb, alpha]))
    else:
        image = Image.fromarray(rgb)
    options: dict[str, int] = {}
    if file_format == "JPEG":
        options = {"quality": quality, "subsampling": 0}
    elif file_format == "WEBP":
        options = {"quality": quality}
    with atomic_path(path) as temporary:
        image.save(temporary, format=file_format, **options)


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable order (sorted by relative POSIX path).

    Hidden files and folders are skipped (editor and OS litter, our own temporary files), and so are subfolders
    marked as outputs of an earlier translation (`OUTPUT_MARKER`): a run over a folder never takes them for inputs.
    `root` itself is always searched, marked or not: translating outputs back is the user's choice. Symlinked folders
    are not entered, so a link back up the tree can neither loop nor list a file twice. Symlinked files are kept, and
    so are dangling or looping links, which `load` then reports as unreadable instead of their vanishing without a
    word; FIFOs and devices are left out, since reading one could block forever.
    """
    root = Path(root)
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root, followlinks=False):
        subfolders[:] = [
            name for name in subfolders if not name.startswith(".") and not Path(folder, name, OUTPUT_MARKER).exists()
        ]
        for name in files:
            candidate = Path(folder, name)
            if name.startswith(".") or candidate.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if candidate.is_file() or (candidate.is_symlink() and not candidate.exists()):
                found.append(candidate)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def in_output_folder(path: Path, root: Path) -> bool:
    """Whether `path` is, or lies in, a folder below `root` that is marked as translation outputs (`OUTPUT_MARKER`):
    what `find_images(root)` would skip, for paths found some other way (a glob)."""
    relative = Path(os.path.relpath(path, root)).parts
    if relative[:1] == ("..",):
        return False
    return any(Path(root, *relative[: depth + 1], OUTPUT_MARKER).exists() for depth in range(len(relative)))
