"""Training checkpoints: one folder per saved step, made complete before it gets its name.

A checkpoint is written into a hidden temporary folder (each file fsynced), which is then renamed to
`step-XXXXXXXX`; the `latest` file naming it is replaced atomically afterwards. A run killed at any moment
therefore leaves either the new checkpoint or the previous one, never half of one, and `--resume` falls back to
the newest complete folder if `latest` is missing or stale. Tensors are safetensors, the rest JSON: nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from efm_cli.errors import EfmError
from efm_cli.files import atomic_path

LATEST = "latest"
STATE = "trainer.json"
_STEP = re.compile(r"^step-(\d{8})$")


class CheckpointError(EfmError):
    """A checkpoint folder that cannot be read back; the message names it."""

    default_hint = "move that step folder aside to resume from the checkpoint before it"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save(root: Path, step: int, tensors: dict[str, dict[str, Tensor]], meta: dict[str, Any], *, keep: int = 2) -> Path:
    """Write checkpoint `step` under `root` (tensor groups as `<group>.safetensors`, `meta` as trainer.json)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}-", dir=root))
    try:
        for group, values in tensors.items():
            save_file(values, str(staging / f"{group}.safetensors"))
            _fsync_file(staging / f"{group}.safetensors")
        (staging / STATE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _fsync_file(staging / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with atomic_path(root / LATEST) as temporary:
        temporary.write_text(final.name + "\n", encoding="utf-8")
    _prune(root, keep)
    return final


def _steps(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def _prune(root: Path, keep: int) -> None:
    """Drop all but the newest `keep` checkpoints, and temporary folders that a killed run left behind."""
    for old in _steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def latest(root: Path) -> Path | None:
    """The checkpoint to resume from: the one `latest` names, else the newest complete step folder."""
    try:
        named = root / (root / LATEST).read_text(encoding="utf-8").strip()
        if _STEP.match(named.name) and (named / STATE).is_file():
            return named
    except OSError:
        pass
    complete = [p for p in _steps(root) if (p / STATE).is_file()]
    return complete[-1] if complete else None


def resume_point(root: Path, command: str) -> Path:
    """The checkpoint `command --resume` continues from. None is an error, not a fresh start: starting again from
    step 0 would silently throw away the run the user asked to continue, and rewrite its log."""
    found = latest(root)
    if found is None:
        run = root.parent
        raise CheckpointError(
            f"{root} holds no checkpoint: there is nothing to resume",
            f"to start over, run {command} without --resume and with another --out (or delete {run} first)",
        )
    return found


def load(folder: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Tensor groups and trainer state of one checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / STATE).read_text(encoding="utf-8"))
        tensors = {p.stem: load_file(p) for p in sorted(folder.glob("*.safetensors"))}
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"checkpoint {folder} cannot be read ({error})") from error
    return tensors, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat safetensors-ready tensors (`<param index>.<name>`) and its JSON-able groups."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entries in state["state"].items()
        for name, value in entries.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict[str, Any]], device: torch.device
) -> None:
    """Restore what `optimizer_tensors` saved (Adam's step counters stay on the CPU, as torch keeps them)."""
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value.to(device) if name != "step" else value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
