"""A capacitor: a trained field network, its config, and translation along its field lines in either direction.

The folder format is `efm_cli.capacitor.format`. Loading reads config.json and model.safetensors only, validates
the config and compares every weight's name and shape with it before building anything, and never unpickles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from efm_cli.capacitor import hub, registry
from efm_cli.capacitor.format import (
    AUTOENCODER_DIR,
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    CapacitorError,
    Direction,
    network_config,
    validate,
)
from efm_cli.devices import PRECISIONS, Precision, autocast
from efm_cli.files import atomic_path, write_json
from efm_cli.integrator import Solution, integrate
from efm_cli.network import build
from efm_cli.tensors import load_into

if TYPE_CHECKING:
    from efm_cli.autoencoder import Autoencoder, LatentScale


@dataclass(frozen=True)
class Translation:
    """Translated images in the capacitor's value range, and the integrator's per-sample report (its `x` are what
    the field moved: the images, or a latent capacitor's codes)."""

    images: Tensor
    solution: Solution
    direction: Direction
    reconstruction: Tensor | None = None
    """A latent capacitor's decoded input (with `reconstruct=True`): the autoencoder's version of the input."""


class Capacitor:
    """A field network between two named plates; `translate` carries images from one plate to the other.

    `from_pretrained` / `save_pretrained` / `push_to_hub` follow huggingface_hub's ModelHubMixin conventions (same
    names and keywords, Hub references, the shared cache) without subclassing it: the mixin would write config.json
    itself, non-atomically, fetch files outside our allow-list and load weights without our checks. Delegating to
    `efm_cli.capacitor.hub` keeps loading safetensors-only and validated.
    """

    def __init__(
        self, config: dict[str, Any], network: nn.Module | None = None, *, autoencoder: Autoencoder | None = None
    ) -> None:
        self.config = validate(config)
        try:
            self.network = (network if network is not None else build(network_config(self.config))).eval()
        except (TypeError, ValueError) as error:
            raise CapacitorError(f"config.json: invalid network: {error}") from error
        self.autoencoder: Autoencoder | None = None
        self.scale: LatentScale | None = None
        latent = self.config.get("latent")
        if latent is None:
            if autoencoder is not None:
                raise CapacitorError("config.json has no 'latent' section, so this capacitor takes no autoencoder")
            return
        from efm_cli.autoencoder import LatentScale

        if autoencoder is None:
            raise CapacitorError(f"a latent capacitor needs its autoencoder (the folder's {AUTOENCODER_DIR}/)")
        found = (autoencoder.kind, autoencoder.factor, autoencoder.latent_channels)
        if found != (latent["kind"], latent["factor"], latent["channels"]):
            raise CapacitorError(
                f"the autoencoder ({found[0]}, {found[1]}× smaller, {found[2]} channels) does not match config.json's "
                f"latent section ({latent['kind']}, {latent['factor']}×, {latent['channels']} channels)"
            )
        self.autoencoder = autoencoder.eval()
        self.scale = LatentScale(latent["mean"], latent["std"])

    @property
    def latent(self) -> bool:
        """Whether the field lives in an autoencoder's latent space."""
        return self.autoencoder is not None

    def to(self, device: str | torch.device) -> Capacitor:
        """Move the network (and a latent capacitor's autoencoder) to `device`."""
        for module in (self.network, self.autoencoder, self.scale):
            if module is not None:
                module.to(device)
        return self

    @torch.inference_mode()
    def encode(self, images: Tensor) -> Tensor:
        """What the field moves for images [b, C, S, S] in [−1, 1]: the images, or their normalised latent codes."""
        if self.autoencoder is None or self.scale is None:
            return images
        with torch.autocast(images.device.type, enabled=False):
            return self.scale.normalise(self.autoencoder.encode(images.float()))

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Images in [−1, 1] from what the field moves (`encode`'s inverse up to the autoencoder's loss)."""
        if self.autoencoder is None or self.scale is None:
            return codes.clamp(-1.0, 1.0)
        with torch.autocast(codes.device.type, enabled=False):
            return self.autoencoder.decode(self.scale.restore(codes.float()))

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
        read, both checked; Hub downloads go through `efm_cli.capacitor.hub` (capacitor files only, no pickle weights).
        Nothing is allocated before the weights' header matches what config.json describes, and weights holding NaN
        or infinite values are refused here, once, rather than failing image by image.
        """
        ref = os.fspath(folder)
        if not Path(ref).is_dir() and hub.parse_hub_ref(ref) is not None:
            if revision is not None:
                ref = f"{hub.split_ref(ref)[0]}@{revision}"
            folder = hub.download(
                ref, offline=local_files_only, token=token, cache=cache_dir, force_download=force_download
            )
        elif not Path(ref).exists() and os.sep not in ref and "/" not in ref:
            folder = registry.resolve(ref)
        folder = Path(folder)
        if not folder.is_dir():
            raise CapacitorError(f"{folder} is not a capacitor folder")
        config = hub.check_folder(folder, shapes=True)  # the weights' headers against the configs, on the meta device
        autoencoder = None
        if "latent" in config:
            from efm_cli.autoencoder import Autoencoder

            autoencoder = Autoencoder.from_folder(folder / AUTOENCODER_DIR)
        capacitor = cls(config, autoencoder=autoencoder)
        load_into(capacitor.network, folder / WEIGHTS_NAME, CapacitorError)
        capacitor.to(device)
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
        if self.autoencoder is not None:
            self.autoencoder.save(folder / AUTOENCODER_DIR, dtype=dtype)
        write_json(folder / CONFIG_NAME, self.config)
        if push_to_hub:
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

        The repo (and branch `revision`) is created when missing. Errors are `efm_cli.capacitor.hub.HubError`s.
        """
        import tempfile

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
        """Start and end heights: just off the plates, where the fields are singular (docs/method.md §1)."""
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
        precision: Precision = "fp32",
        reconstruct: bool = False,
        **options: Any,
    ) -> Translation:
        """Carry images [b, C, H, W] in [−1, 1] (the capacitor's size) along the field lines to the other plate.

        `to` names the destination domain (it picks the direction); `solver` and `options` (rtol, atol, steps, …)
        default to the capacitor's sampler settings. `precision` "bf16" or "fp16" runs the network under autocast,
        while the integrator's state and error control stay in fp32, where the tolerances mean something; a CPU
        without those instructions (`devices.cpu_native`) emulates them, tens of times slower than fp32. A latent
        capacitor encodes the images, integrates their codes and decodes the end points (the autoencoder in fp32);
        with `reconstruct` it also returns the decoded input, what the translation should be compared with.
        """
        if precision not in PRECISIONS:
            raise CapacitorError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
        if to is not None:
            direction = self.direction_to(to)
        size, channels = self.config["image"]["size"], self.config["image"]["channels"]
        if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
            raise CapacitorError(f"expected images [b, {channels}, {size}, {size}], got {list(images.shape)}")
        defaults = dict(self.config.get("sampler", {}))
        configured = defaults.pop("solver", "dopri5")
        if solver is not None and solver != configured:
            defaults = {}  # the capacitor's settings belong to its own solver (steps for heun, tolerances for dopri5)
        z0, z1 = self.plates(direction)
        param = next(self.network.parameters())
        x = self.encode(images.to(param.device, param.dtype))
        with autocast(param.device.type, precision):
            solution = integrate(
                self.network,
                x,
                z0,
                z1,
                solver=solver or configured,
                **{**defaults, **options},
            )
        reconstruction = self.decode(x) if reconstruct and self.latent else None
        return Translation(self.decode(solution.x), solution, direction, reconstruction)
