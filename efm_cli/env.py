"""Facts for `efm env`: what a bug report needs, gathered without leaking secrets.

`gather()` returns a plain, JSON-ready dict with these keys:

- `versions`: efm, python, platform, torch (with `torch_cuda` / `torch_hip`, the toolkit torch was built
  with), torchvision, typer, click, rich, pillow, safetensors, huggingface_hub, numpy, scipy (null when not
  installed);
- `devices`: cuda_available, cuda_device_count, cuda_devices (index, name, capability, memory_gib),
  mps_available, torch_threads (all null when torch cannot be imported), GOMP_SPINCOUNT and OMP_WAIT_POLICY
  as efm runs with them (efm_cli.threads);
- `paths`: efm_package, embedded_weights (+ embedded_weights_exists), efm_cache, hf_hub_cache;
- `hub`: endpoint and offline as huggingface_hub resolves them, the raw HF_ENDPOINT and HF_HUB_OFFLINE
  variables, and HF_TOKEN as "set" or "not set", never its value;
- `problems`: what could not be inspected (a broken torch install, warnings raised while probing).

torch and huggingface_hub are imported inside `gather()`, never at module import, so `efm --help` stays fast.
"""

import importlib.metadata
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import efm_cli
from efm_cli.threads import openmp_waiting

# Distribution names, keyed by how the report names them.
_DISTRIBUTIONS = {
    "torchvision": "torchvision",
    "typer": "typer",
    "click": "click",
    "rich": "rich",
    "pillow": "pillow",
    "safetensors": "safetensors",
    "huggingface_hub": "huggingface-hub",
    "numpy": "numpy",
    "scipy": "scipy",
}


def efm_cache_dir() -> Path:
    """Where efm keeps its own downloads and caches: `$EFM_CACHE`, else `~/.cache/efm`."""
    configured = os.environ.get("EFM_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "efm"


def embedded_weights_dir() -> Path:
    """Where embedded capacitors live: `$EFM_WEIGHTS_DIR` (tests, packagers), else `weights/` beside the package."""
    configured = os.environ.get("EFM_WEIGHTS_DIR")
    if configured:
        return Path(configured).expanduser()
    # A wheel installs weights/ as efm_cli/weights (pyproject maps it); a checkout, editable or not, has it beside
    # the package.
    package = Path(efm_cli.__file__).resolve().parent
    installed = package / "weights"
    return installed if installed.is_dir() else package.parent / "weights"


def _distribution_version(name: str) -> str | None:
    # Read from installed metadata rather than importing each package: cheap, and no import side effects.
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_facts(problems: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Torch's versions and devices; a broken torch install is what a bug report must show, not crash on."""
    versions: dict[str, Any] = {"torch": None, "torch_cuda": None, "torch_hip": None}
    devices: dict[str, Any] = {
        "cuda_available": None,
        "cuda_device_count": None,
        "cuda_devices": None,
        "mps_available": None,
        "torch_threads": None,
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import torch
        except Exception as exc:
            problems.append(f"torch cannot be imported: {type(exc).__name__}: {exc}")
            return versions, devices
        versions.update(torch=torch.__version__, torch_cuda=torch.version.cuda, torch_hip=torch.version.hip)
        cuda_available = torch.cuda.is_available()
        count = torch.cuda.device_count() if cuda_available else 0
        cuda_devices = []
        for index in range(count):
            props = torch.cuda.get_device_properties(index)
            cuda_devices.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
        devices.update(
            cuda_available=cuda_available,
            cuda_device_count=count,
            cuda_devices=cuda_devices,
            mps_available=torch.backends.mps.is_available(),
            torch_threads=torch.get_num_threads(),
        )
    devices.update(openmp_waiting())
    problems.extend(f"while probing torch: {warning.message}" for warning in caught)
    return versions, devices


def _hub_facts(problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    """The Hub cache path and the Hub settings in effect; HF_TOKEN is only ever reported as set or not."""
    hub: dict[str, Any] = {
        "endpoint": None,
        "offline": None,
        "HF_ENDPOINT": os.environ.get("HF_ENDPOINT"),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
        "HF_TOKEN": "set" if os.environ.get("HF_TOKEN") else "not set",
    }
    try:
        from huggingface_hub import constants
    except Exception as exc:
        problems.append(f"huggingface_hub cannot be imported: {type(exc).__name__}: {exc}")
        return None, hub
    hub.update(endpoint=constants.ENDPOINT, offline=constants.HF_HUB_OFFLINE)
    return str(constants.HF_HUB_CACHE), hub


def gather() -> dict[str, Any]:
    """Everything `efm env` reports, as a JSON-ready dict (keys documented in the module docstring)."""
    problems: list[str] = []
    torch_versions, devices = _torch_facts(problems)
    hf_hub_cache, hub = _hub_facts(problems)
    weights = embedded_weights_dir()
    versions: dict[str, Any] = {
        "efm": efm_cli.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **torch_versions,
    }
    versions.update({key: _distribution_version(dist) for key, dist in _DISTRIBUTIONS.items()})
    return {
        "versions": versions,
        "devices": devices,
        "paths": {
            "efm_package": str(Path(efm_cli.__file__).resolve().parent),
            "embedded_weights": str(weights),
            "embedded_weights_exists": weights.is_dir(),
            "efm_cache": str(efm_cache_dir()),
            "hf_hub_cache": hf_hub_cache,
        },
        "hub": hub,
        "problems": problems,
    }
