"""Reading weights that came from elsewhere: safetensors only, and every name, shape and dtype checked against the
module they are meant for before anything is allocated or copied in.

A config from elsewhere describes a module; the weights file beside it says what it really holds. Both sides are
known without allocating: the module is built on the meta device (`meta_shapes`) and the file's header is read
without its tensors (`header`). Comparing the two first means a config cannot ask for gigabytes that its few
megabytes of weights could never fill. Importing this module costs no torch: the Hub side reads headers too.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from efm_cli.errors import EfmError

if TYPE_CHECKING:
    from torch import nn

Shapes = dict[str, tuple[int, ...]]
"""Tensor name → shape: a module's state dict, or a safetensors file's header."""

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of the safetensors dtypes a weights file may hold."""
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""The dtypes weights may have: loading casts them to fp32."""
MAX_HEADER_BYTES = 1 << 22
"""A header of 4 MiB lists some 40,000 tensors, where ours list hundreds: a bigger one could only exhaust memory."""


def header(path: Path, error: type[EfmError]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name → (dtype, shape) of every tensor in the safetensors file `path`, from its header alone (no torch).

    The file must be a regular one: a FIFO or a device as weights would block or never end, so it is opened
    non-blocking and checked before a byte is read. Its tensors' bytes must tile its data exactly as their shapes and
    dtypes say, so that the header can be trusted before any tensor is read. Any failure raises `error` naming it.
    """
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as missing:
        raise error(f"{path.parent} has no {path.name}") from missing
    except OSError as unreadable:
        raise error(f"{path} cannot be read ({unreadable.strerror})") from unreadable
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        raise error(f"{path} is not a regular file")
    with os.fdopen(handle, "rb") as file:
        try:
            return _parse(file, info.st_size)
        except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError) as broken:
            raise error(f"{path.name} is not a valid safetensors file ({broken})") from broken


def _parse(file: BinaryIO, size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    length = int.from_bytes(file.read(8), "little")
    if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
        raise ValueError("bad header length")
    found = json.loads(file.read(length))
    if not isinstance(found, dict):
        raise ValueError("header is not an object")
    entries = sorted(
        ((name, entry) for name, entry in found.items() if name != "__metadata__"),
        key=lambda item: [int(offset) for offset in item[1]["data_offsets"]],
    )
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, entry in entries:
        dims, dtype = entry["shape"], entry["dtype"]
        if not isinstance(dims, list) or not all(type(d) is int and d >= 0 for d in dims):
            raise ValueError(f"'{name}' has no valid shape")
        begin, stop = (int(offset) for offset in entry["data_offsets"])
        if begin != end or stop - begin != math.prod(dims) * DTYPE_BYTES[dtype]:
            raise ValueError("tensor bytes do not match the shapes and dtypes of the header")
        tensors[name], end = (dtype, tuple(dims)), stop
    if not tensors or end != size - 8 - length:
        raise ValueError("tensor data does not fill the file")
    return tensors


def count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """How many numbers tensors of these shapes hold."""
    return sum(math.prod(shape) for shape in shapes.values())


def meta_shapes(make: Callable[[], nn.Module]) -> Shapes:
    """Name → shape of every tensor in the state dict of `make()`, built on the meta device: a module of any size
    costs no memory, so what a config describes can be sized and compared with its weights before allocation."""
    import torch

    with torch.device("meta"):
        return {name: tuple(tensor.shape) for name, tensor in make().state_dict().items()}


def check_header(
    expected: Shapes, found: Mapping[str, tuple[str, tuple[int, ...]]], path: Path, error: type[EfmError]
) -> None:
    """Refuse (`error`) the weights `found` in `path` (its `header`) unless they are exactly the `expected` tensors
    in a float dtype; a mismatch in names also says how many weights each side has, so a config that asks for far
    more than its file holds is told so in those terms."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing or unexpected:
        held = count({name: shape for name, (_, shape) in found.items()})
        raise error(
            f"{path.name} does not match config.json ({held:,} weights; the config describes {count(expected):,}): "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}",
            "the config and the weights do not belong together; re-export or re-download the folder",
        )
    for name, (dtype, shape) in found.items():
        if shape != expected[name] or dtype not in FLOAT_DTYPES:
            raise error(f"{path.name}: '{name}' has shape {list(shape)} {dtype}, expected {list(expected[name])}")


def load_into(module: nn.Module, path: Path, error: type[EfmError]) -> None:
    """Load the safetensors file `path` into `module` (cast to fp32) once its header matches the module exactly and
    every value is finite; anything else raises `error` naming the file, once, instead of failing image by image."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_header({k: tuple(v.shape) for k, v in module.state_dict().items()}, header(path, error), path, error)
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as broken:
        raise error(f"{path} is not a valid safetensors file ({broken})") from broken
    broken = sorted(name for name, tensor in weights.items() if not torch.isfinite(tensor).all())
    if broken:
        raise error(
            f"{path.name} holds NaN or infinite values: {len(broken)} of its {len(weights)} tensors, "
            f"first '{broken[0]}'",
            "the weights are damaged or come from a diverged training run; re-download or retrain them",
        )
    module.load_state_dict({k: v.float() for k, v in weights.items()})
