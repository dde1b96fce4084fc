"""Which torch device a `--device` name means, the same way for every command."""

from __future__ import annotations

import torch

from efm_cli.errors import HintedError

NAMES = ("auto", "cpu", "cuda", "mps")


class DeviceError(HintedError):
    """An unknown device name, or an accelerator this machine does not have."""


def choose(name: str = "auto") -> torch.device:
    """`auto` is CUDA, then MPS, then the CPU; asking for an absent accelerator is an error, not a fallback.

    `cuda:N` picks one GPU of several.
    """
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    kind, _, index = name.partition(":")
    if kind not in NAMES[1:] or (index and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N or mps")
    if (kind == "cuda" and not cuda) or (kind == "mps" and not mps):
        raise DeviceError(f"{name} is not available on this machine", "use --device auto or --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise DeviceError(f"{name} does not exist: this machine has {torch.cuda.device_count()} GPUs", "see 'efm env'")
    return torch.device(name)
