"""Which torch device a `--device` name means, and which precisions a network may run in: one home for both.

`check` reads a device name without torch (the command line validates `--device` before anything heavy loads);
`choose` turns it into a `torch.device` on this machine.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from efm_cli.errors import EfmError, UsageError

if TYPE_CHECKING:
    import torch

NAMES = ("auto", "cpu", "cuda", "mps")
DEVICE_HELP = "auto (CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps."

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16", "fp16")
CPU_FLAGS: dict[Precision, frozenset[str]] = {
    "bf16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    "fp16": frozenset({"avx512_fp16", "amx_fp16", "asimdhp"}),
}
"""/proc/cpuinfo flags of the instructions that run a precision natively: x86's AVX-512 and AMX extensions, Arm's
BF16 and half-precision SIMD. Without any of them torch emulates it on the CPU."""


class DeviceError(EfmError):
    """An accelerator this machine does not have."""


class DeviceNameError(DeviceError, UsageError):
    """A device name that means nothing: not auto, cpu, cuda, cuda:N or mps."""


def check(name: str) -> str:
    """`name` itself if it spells a device (whether or not this machine has it), else a `DeviceNameError`."""
    kind, colon, index = name.partition(":")
    if kind not in NAMES or (colon and (kind != "cuda" or not index.isdigit())):
        raise DeviceNameError(f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N or mps")
    return name


def choose(name: str = "auto") -> torch.device:
    """`auto` is CUDA, then MPS, then the CPU; asking for an absent accelerator is an error, not a fallback.

    `cuda:N` picks one GPU of several.
    """
    import torch

    kind = check(name).partition(":")[0]
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (kind == "cuda" and not cuda) or (kind == "mps" and not mps):
        raise DeviceError(f"{name} is not available on this machine", "use --device auto or --device cpu")
    if ":" in name and int(name.partition(":")[2]) >= torch.cuda.device_count():
        raise DeviceError(f"{name} does not exist: this machine has {torch.cuda.device_count()} GPUs", "see 'efm env'")
    return torch.device(name)


def autocast(device_type: str, precision: Precision) -> AbstractContextManager[Any]:
    """The context that runs a network in `precision` on `device_type` (cpu, cuda, mps): torch's autocast to bfloat16
    or float16, or nothing for fp32. The one place a precision name becomes a dtype."""
    import torch

    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def cpu_native(precision: Precision, cpuinfo: str | None = None) -> bool | None:
    """Whether this CPU has instructions for `precision` (`cpuinfo`: the text of /proc/cpuinfo, read when None);
    None where that cannot be told (no /proc/cpuinfo, as on macOS or Windows). Emulated bf16 ran a 64×64 field
    network about 60 times slower than fp32 on a 2-core AVX2 machine (README, "Precision on a CPU")."""
    if precision == "fp32":
        return True
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & CPU_FLAGS[precision]) if flags else None
