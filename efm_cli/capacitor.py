"""A capacitor: a trained field network, its config, and translation along its field lines in either direction.

On disk (and on the Hub) a capacitor is a folder: `config.json` (format name and version, the two domains, the field
and its parameters, image size and value range, network, preprocessing, default sampler, training summary) and
`model.safetensors` (the EMA weights). Loading reads those two files only, validates the config before building
anything, checks every weight's name and shape, and never unpickles.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from efm_cli.errors import HintedError
from efm_cli.files import atomic_path, write_json
from efm_cli.integrator import SOLVERS, Solution, integrate
from efm_cli.network import build

FORMAT = "efm-capacitor"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
SAMPLE_NAME = "sample.png"
"""The optional files of a capacitor folder: its model card and the picture the card shows."""

Direction = Literal["forward", "backward"]

MAX_CONFIG_BYTES = 1 << 20
"""No real config comes near 1 MiB."""

SAMPLER_OPTIONS = {"solver": str, "rtol": float, "atol": float, "steps": int, "max_nfe": int}
"""What config.json may set about sampling, with its type: nothing else reaches the integrator."""

SAMPLER_RANGES = {"rtol": (1e-12, 1.0), "atol": (1e-12, 1.0), "steps": (1, 100_000), "max_nfe": (1, 1_000_000)}
"""Bounds of the numeric sampler options: a downloaded config must not ask for a run that never ends."""


class CapacitorError(HintedError):
    """A capacitor folder or config that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class Translation:
    """Translated images in the capacitor's value range, and the integrator's per-sample report."""

    images: Tensor
    solution: Solution
    direction: Direction


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise CapacitorError(f"config.json: '{key}' must be an object, got {value!r}")
    return value


def validate(config: Any) -> dict[str, Any]:
    """Check a capacitor config's structure, types and ranges before anything is allocated; return it."""
    if not isinstance(config, dict):
        raise CapacitorError("config.json must hold a JSON object")
    if config.get("format") != FORMAT:
        raise CapacitorError(f"config.json is not an {FORMAT} config (format = {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise CapacitorError(
            f"config.json has format_version {config.get('format_version')!r}; this efm reads {FORMAT_VERSION}"
        )
    domains = _section(config, "domains")
    if not all(isinstance(domains.get(k), str) and domains[k] for k in ("source", "target")):
        raise CapacitorError("config.json: 'domains' needs non-empty 'source' and 'target' names")
    if domains["source"] == domains["target"]:
        raise CapacitorError("config.json: the two domains must have different names")
    field = _section(config, "field")
    L, eps = field.get("L"), field.get("eps", 1e-3)
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (L, eps)) or not 0 < eps < L / 2:
        raise CapacitorError("config.json: 'field' needs a finite plate distance L > 0 and 0 < eps < L/2")
    if field.get("kind") not in ("coulomb", "tube"):
        raise CapacitorError(f"config.json: unknown field kind {field.get('kind')!r}; expected 'coulomb' or 'tube'")
    image = _section(config, "image")
    size, channels = image.get("size"), image.get("channels")
    if not isinstance(size, int) or not 8 <= size <= 2048 or size % 8 or channels not in (1, 3):
        raise CapacitorError("config.json: 'image' needs a size that is a multiple of 8 (8–2048) and 1 or 3 channels")
    sampler = config.get("sampler", {})
    if not isinstance(sampler, dict) or not all(_sampler_option_ok(k, v) for k, v in sampler.items()):
        allowed = ", ".join(f"{k} in [{low:g}, {high:g}]" for k, (low, high) in SAMPLER_RANGES.items())
        raise CapacitorError(
            f"config.json: 'sampler' may only set solver ({'|'.join(SOLVERS)}), {allowed}; got {sampler!r}"
        )
    network = _section(config, "network")
    if network.get("kind") != "unet" or network.get("size") != size or network.get("channels") != channels:
        raise CapacitorError("config.json: 'network' must be a UNet for the capacitor's image size and channels")
    return config


def read_config(folder: Path) -> Any:
    """The parsed (not yet validated) config.json of a capacitor folder; every reason it cannot be read is a
    `CapacitorError`. Every reader of a capacitor config goes through here."""
    try:
        return json.loads(_config_text(folder / CONFIG_NAME))
    except FileNotFoundError as error:
        raise CapacitorError(f"{folder} has no {CONFIG_NAME}") from error
    except (OSError, ValueError) as error:
        raise CapacitorError(f"{folder / CONFIG_NAME} is not valid JSON ({error})") from error


def _config_text(path: Path) -> str:
    """The text of a config.json, refused (ValueError) unless it is a regular file of at most `MAX_CONFIG_BYTES`.

    A folder from elsewhere may link config.json to /dev/zero or a FIFO: reading those would never end.
    """
    if path.exists() and not path.is_file():
        raise ValueError("config.json is not a regular file")
    with path.open("rb") as handle:
        data = handle.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ValueError(f"config.json is larger than {MAX_CONFIG_BYTES} bytes")
    return data.decode("utf-8")


def _sampler_option_ok(key: str, value: Any) -> bool:
    kind = SAMPLER_OPTIONS.get(key)
    if kind is None or isinstance(value, bool):
        return False
    if key == "solver":
        return value in SOLVERS
    if not (isinstance(value, int | float) if kind is float else isinstance(value, kind)):
        return False
    low, high = SAMPLER_RANGES[key]
    return low <= value <= high


class Capacitor:
    """A field network between two named plates; `translate` carries images from one plate to the other.

    `from_pretrained` / `save_pretrained` / `push_to_hub` follow huggingface_hub's ModelHubMixin conventions (same
    names and keywords, Hub references, the shared cache) without subclassing it: the mixin would write config.json
    itself, non-atomically, fetch files outside our allow-list and load weights without our checks. Delegating to
    `efm_cli.hub` keeps loading safetensors-only and validated.
    """

    def __init__(self, config: dict[str, Any], network: nn.Module | None = None) -> None:
        self.config = validate(config)
        try:
            self.network = (network if network is not None else build(config["network"])).eval()
        except (TypeError, ValueError) as error:
            raise CapacitorError(f"config.json: invalid network: {error}") from error

    @property
    def source(self) -> str:
        return self.config["domains"]["source"]

    @property
    def target(self) -> str:
        return self.config["domains"]["target"]

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | None = None,
    ) -> Capacitor:
        """Load a capacitor folder, a Hub repo (`user/name`, `user/name@revision`) through the HF cache, or the
        short name of an embedded or cached capacitor (`horse2zebra`).

        The keywords are huggingface_hub ModelHubMixin's. Either way only config.json and model.safetensors are
        read, both checked; Hub downloads go through `efm_cli.hub` (capacitor files only, no pickle weights).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from efm_cli import hub
        from efm_cli.registry import parse_hub_ref

        ref = os.fspath(folder)
        if not Path(ref).is_dir() and parse_hub_ref(ref) is not None:
            if revision is not None:
                ref = f"{hub.split_ref(ref)[0]}@{revision}"
            folder = hub.download(
                ref, offline=local_files_only, token=token, cache=cache_dir, force_download=force_download
            )
        elif not Path(ref).exists() and os.sep not in ref and "/" not in ref:
            from efm_cli import registry

            folder = registry.resolve(ref)
        folder = Path(folder)
        if not folder.is_dir():
            raise CapacitorError(f"{folder} is not a capacitor folder")
        capacitor = cls(read_config(folder))
        try:
            weights = load_file(folder / WEIGHTS_NAME)
        except FileNotFoundError as error:
            raise CapacitorError(f"{folder} has no {WEIGHTS_NAME}") from error
        except (SafetensorError, OSError) as error:
            raise CapacitorError(f"{folder / WEIGHTS_NAME} is not a valid safetensors file ({error})") from error
        expected = capacitor.network.state_dict()
        missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
        if missing or unexpected:
            raise CapacitorError(
                f"{WEIGHTS_NAME} does not match config.json: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]}"
            )
        for name, tensor in weights.items():
            if tensor.shape != expected[name].shape or not tensor.is_floating_point():
                raise CapacitorError(f"{WEIGHTS_NAME}: '{name}' has shape {list(tensor.shape)} {tensor.dtype}")
        capacitor.network.load_state_dict({k: v.float() for k, v in weights.items()})
        capacitor.network.to(device)
        return capacitor

    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        **push_options: Any,
    ) -> Path:
        """Write config.json and model.safetensors, each atomically (a reader never sees half a file).

        `dtype=torch.float16` stores the weights in half precision, half the bytes; loading casts them back to fp32.
        As with huggingface_hub's ModelHubMixin, `push_to_hub=True` then publishes the folder to `repo_id`
        (`push_options`: private, revision, token, commit_message).
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in self.network.state_dict().items()
        }
        with atomic_path(folder / WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": FORMAT})
        write_json(folder / CONFIG_NAME, self.config)
        if push_to_hub:
            from efm_cli import hub

            if repo_id is None:
                raise CapacitorError("push_to_hub needs repo_id='user/name'")
            hub.push(folder, repo_id, **push_options)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        revision: str | None = None,
        token: str | None = None,
        commit_message: str | None = None,
    ) -> str:
        """Publish this capacitor to `repo_id` on the Hub with a generated model card; return the commit URL.

        The repo (and branch `revision`) is created when missing. Errors are `efm_cli.hub.HubError`s.
        """
        import tempfile

        from efm_cli import hub

        with tempfile.TemporaryDirectory(prefix="efm-push-") as staging:
            folder = self.save_pretrained(staging)
            result = hub.push(
                folder, repo_id, private=private, revision=revision, token=token, commit_message=commit_message
            )
        return result.url

    def direction_to(self, domain: str) -> Direction:
        """'forward' to reach the target plate, 'backward' to reach the source plate."""
        if domain == self.target:
            return "forward"
        if domain == self.source:
            return "backward"
        raise CapacitorError(f"this capacitor translates between {self.source!r} and {self.target!r}, not {domain!r}")

    def plates(self, direction: Direction) -> tuple[float, float]:
        """Start and end heights: just off the plates, where the fields are singular (method.md §3.5)."""
        field = self.config["field"]
        L, eps = float(field["L"]), float(field.get("eps", 1e-3))
        return (eps, L - eps) if direction == "forward" else (L - eps, eps)

    @torch.inference_mode()
    def translate(
        self,
        images: Tensor,
        *,
        to: str | None = None,
        direction: Direction = "forward",
        solver: str | None = None,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
        **options: Any,
    ) -> Translation:
        """Carry images [b, C, H, W] in [−1, 1] (the capacitor's size) along the field lines to the other plate.

        `to` names the destination domain (it picks the direction); `solver` and `options` (rtol, atol, steps, …)
        default to the capacitor's sampler settings. `precision` "bf16" or "fp16" runs the network under autocast,
        while the integrator's state and error control stay in fp32, where the tolerances mean something.
        """
        if precision not in ("fp32", "bf16", "fp16"):
            raise CapacitorError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
        if to is not None:
            direction = self.direction_to(to)
        size, channels = self.config["image"]["size"], self.config["image"]["channels"]
        if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise CapacitorError(f"expected images [b, {channels}, {size}, {size}], got {list(images.shape)}")
        defaults = dict(self.config.get("sampler", {}))
        configured = defaults.pop("solver", "dopri5")
        z0, z1 = self.plates(direction)
        param = next(self.network.parameters())
        x = images.to(param.device, param.dtype)
        low = torch.float16 if precision == "fp16" else torch.bfloat16
        with torch.autocast(param.device.type, dtype=low, enabled=precision != "fp32"):
            solution = integrate(
                self.network,
                x,
                z0,
                z1,
                solver=solver or configured,
                **{**defaults, **options},
            )
        return Translation(images=solution.x.clamp(-1.0, 1.0), solution=solution, direction=direction)


def new_config(
    *,
    source: str,
    target: str,
    network: dict[str, Any],
    field: dict[str, Any],
    size: int,
    channels: int = 3,
    preprocessing: dict[str, Any] | None = None,
    sampler: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete, validated capacitor config (what `efm train` will write)."""
    return validate(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "domains": {"source": source, "target": target},
            "field": {"eps": 1e-3, **field},
            "image": {"size": size, "channels": channels, "range": [-1.0, 1.0]},
            "network": network,
            "preprocessing": preprocessing or {"resize": "resize", "hflip": False},
            "sampler": sampler or {"solver": "dopri5", "rtol": 1e-4, "atol": 1e-4},
            "training": training or {},
        }
    )
