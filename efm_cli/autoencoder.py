"""Autoencoders that latent capacitors live in, in the diffusers folder formats (docs/method.md §9).

A folder holds `config.json` (diffusers' `_class_name` and constructor arguments) and
`diffusion_pytorch_model.safetensors`. `AutoencoderTiny` (TAESD-style, the kind `efm autoencoder` trains) and
`AutoencoderKL` (Stable Diffusion's VAEs) are read with diffusers itself, so any such folder from the Hub works.
Loading is ours, not diffusers' `from_pretrained`: the config's keys are checked against an allow-list with bounds
before anything is built, and every weight's name and shape is checked before it is copied in. Nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from efm_cli.capacitor.format import AUTOENCODER_KINDS, AUTOENCODER_WEIGHTS, CONFIG_NAME, config_text
from efm_cli.errors import EfmError
from efm_cli.files import atomic_path, write_json
from efm_cli.tensors import Shapes, check_header, count, header, load_into, meta_shapes

WEIGHTS_NAME = AUTOENCODER_WEIGHTS
MAX_PARAMETERS = 500_000_000
"""Refused above this: the largest image VAEs in use have about 84 M parameters."""

_CHANNEL_LISTS = ("encoder_block_out_channels", "decoder_block_out_channels", "block_out_channels")
_BLOCK_LISTS = ("num_encoder_blocks", "num_decoder_blocks")
_KEYS: dict[str, set[str]] = {
    "AutoencoderTiny": {
        "in_channels",
        "out_channels",
        "encoder_block_out_channels",
        "decoder_block_out_channels",
        "act_fn",
        "upsample_fn",
        "latent_channels",
        "upsampling_scaling_factor",
        "num_encoder_blocks",
        "num_decoder_blocks",
        "latent_magnitude",
        "latent_shift",
        "force_upcast",
        "scaling_factor",
        "shift_factor",
    },
    "AutoencoderKL": {
        "in_channels",
        "out_channels",
        "down_block_types",
        "up_block_types",
        "block_out_channels",
        "layers_per_block",
        "act_fn",
        "latent_channels",
        "norm_num_groups",
        "sample_size",
        "scaling_factor",
        "shift_factor",
        "latents_mean",
        "latents_std",
        "force_upcast",
        "use_quant_conv",
        "use_post_quant_conv",
        "mid_block_add_attention",
    },
}
KINDS = AUTOENCODER_KINDS
_ACTIVATIONS = {"relu", "silu", "swish", "gelu", "mish"}
_BLOCK_TYPES = {"DownEncoderBlock2D", "UpDecoderBlock2D"}


class AutoencoderError(EfmError):
    """An autoencoder folder that cannot be used; the message names the file and the reason."""

    default_hint = "pass a folder holding a diffusers AutoencoderTiny or AutoencoderKL (config.json and safetensors)"


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def validate_config(config: Any) -> dict[str, Any]:
    """The constructor arguments of a diffusers autoencoder config, checked; unknown keys are dropped, bad values
    refused, so that a config from elsewhere cannot make diffusers build something huge or unexpected."""
    if not isinstance(config, dict):
        raise AutoencoderError("autoencoder config.json must hold a JSON object")
    kind = config.get("_class_name")
    if kind not in _KEYS:
        raise AutoencoderError(f"autoencoder config.json: _class_name {kind!r} is not one of {', '.join(KINDS)}")
    arguments = {k: v for k, v in config.items() if k in _KEYS[kind]}
    for key in _CHANNEL_LISTS + _BLOCK_LISTS:
        value = arguments.get(key)
        if value is None:
            continue
        low, high = (1, 2048) if key in _CHANNEL_LISTS else (0, 16)
        if (
            not isinstance(value, list | tuple)
            or not 1 <= len(value) <= 8
            or not all(_int_in(v, low, high) for v in value)
        ):
            raise AutoencoderError(f"autoencoder config.json: {key} must be 1 to 8 integers in [{low}, {high}]")
    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        if key in arguments and not _int_in(arguments[key], 1, 64):
            raise AutoencoderError(f"autoencoder config.json: {key} must be an integer in [1, 64]")
    if arguments.get("in_channels", 3) != 3 or arguments.get("out_channels", 3) != 3:
        raise AutoencoderError("autoencoder config.json: efm reads RGB autoencoders (3 input and output channels)")
    if "act_fn" in arguments and arguments["act_fn"] not in _ACTIVATIONS:
        raise AutoencoderError(f"autoencoder config.json: unknown act_fn {arguments['act_fn']!r}")
    for key in ("down_block_types", "up_block_types"):
        if key in arguments and not (
            isinstance(arguments[key], list | tuple)
            and set(arguments[key]) <= _BLOCK_TYPES
            and len(arguments[key]) <= 8
        ):
            raise AutoencoderError(f"autoencoder config.json: {key} may only name {sorted(_BLOCK_TYPES)}")
    if "upsample_fn" in arguments and arguments["upsample_fn"] not in ("nearest", "bilinear"):
        raise AutoencoderError("autoencoder config.json: upsample_fn must be 'nearest' or 'bilinear'")
    if "upsampling_scaling_factor" in arguments and arguments["upsampling_scaling_factor"] != 2:
        raise AutoencoderError("autoencoder config.json: upsampling_scaling_factor must be 2")
    if kind == "AutoencoderTiny":
        _check_tiny(arguments)
    return {"_class_name": kind, **arguments}


def _check_tiny(arguments: dict[str, Any]) -> None:
    """diffusers' tiny encoder keeps one width per stage; unequal widths would fail deep inside torch."""
    for channels, blocks in (
        ("encoder_block_out_channels", "num_encoder_blocks"),
        ("decoder_block_out_channels", "num_decoder_blocks"),
    ):
        widths = arguments.get(channels, (64, 64, 64, 64))
        counts = arguments.get(blocks, (1, 3, 3, 3))
        if len(widths) != len(counts):
            raise AutoencoderError(f"autoencoder config.json: {channels} and {blocks} differ in length")
        if len(set(widths)) != 1:
            raise AutoencoderError(f"autoencoder config.json: {channels} must repeat one width")


def downsampling(config: dict[str, Any]) -> int:
    """How many pixels along each side one latent position stands for (8 for TAESD and SD VAEs)."""
    if config["_class_name"] == "AutoencoderTiny":
        stages = len(config.get("encoder_block_out_channels", (64,) * 4))
    else:
        stages = len(config.get("block_out_channels", (128, 256, 512, 512)))
    return 2 ** (stages - 1)


def _construct(config: dict[str, Any]) -> nn.Module:
    """The diffusers model a checked config describes, on the current default device."""
    import diffusers

    arguments = {k: v for k, v in config.items() if k != "_class_name"}
    return getattr(diffusers, config["_class_name"])(**arguments)


def weight_shapes(config: dict[str, Any]) -> Shapes:
    """Name → shape of the weights a checked config describes, sized on the meta device (nothing is allocated);
    refused above `MAX_PARAMETERS`, or when diffusers cannot build it (widths its group norms do not divide)."""
    try:
        shapes = meta_shapes(lambda: _construct(config))
    except (TypeError, ValueError) as error:
        raise AutoencoderError(f"autoencoder config.json describes no {config['_class_name']} ({error})") from error
    if count(shapes) > MAX_PARAMETERS:
        raise AutoencoderError(
            f"autoencoder config.json describes {count(shapes):,} parameters; at most {MAX_PARAMETERS:,}"
        )
    return shapes


def _read_config(folder: Path) -> Any:
    path = folder / CONFIG_NAME
    try:
        return json.loads(config_text(path))
    except FileNotFoundError as error:
        raise AutoencoderError(f"{folder} has no {CONFIG_NAME}") from error
    except (OSError, ValueError, RecursionError) as error:
        raise AutoencoderError(f"{path} cannot be read ({error})") from error


class Autoencoder(nn.Module):
    """A diffusers autoencoder behind two calls: `encode` images in [−1, 1] to latents, `decode` them back.

    AutoencoderKL encodes to the mean of its posterior (deterministic); AutoencoderTiny's encoder is deterministic.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = validate_config(config)
        weight_shapes(self.config)
        self.model = _construct(self.config)
        self.factor = downsampling(self.config)
        self.latent_channels = int(self.model.config.latent_channels)

    @property
    def kind(self) -> str:
        return self.config["_class_name"]

    def latent_shape(self, size: int) -> tuple[int, int, int]:
        """[c, h, w] of the latent of a size×size image."""
        if size % self.factor:
            raise AutoencoderError(f"image size {size} is not a multiple of the autoencoder's {self.factor}")
        return self.latent_channels, size // self.factor, size // self.factor

    def encode(self, images: Tensor) -> Tensor:
        if self.kind == "AutoencoderTiny":
            return self.model.encode(images).latents
        return self.model.encode(images).latent_dist.mode()

    def decode(self, latents: Tensor) -> Tensor:
        return self.model.decode(latents).sample.clamp(-1.0, 1.0)

    def forward(self, images: Tensor) -> Tensor:
        """The reconstruction of `images`, not clamped: training needs gradients where the decoder overshoots, or on
        mostly black images (digits) it settles below −1 everywhere and stops learning."""
        return self.model.decode(self.encode(images)).sample

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Autoencoder:
        """Load a diffusers autoencoder folder: the config is checked, and the weights' header compared with what it
        describes, before anything is built; every value is checked before use."""
        folder = Path(folder)
        if not folder.is_dir():
            raise AutoencoderError(f"{folder} is not an autoencoder folder")
        config = validate_config(_read_config(folder))
        weights = folder / WEIGHTS_NAME
        check_header(weight_shapes(config), header(weights, AutoencoderError), weights, AutoencoderError)
        autoencoder = cls(config)
        load_into(autoencoder.model, weights, AutoencoderError)
        return autoencoder.to(device).eval()

    def save(self, folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> Path:
        """Write the folder diffusers' `from_pretrained` also reads; each file atomically."""
        from safetensors.torch import save_file

        folder = Path(folder)
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
            for k, v in self.model.state_dict().items()
        }
        with atomic_path(folder / WEIGHTS_NAME) as temporary:
            save_file(state, str(temporary), metadata={"format": "pt"})
        write_json(folder / CONFIG_NAME, self.config)
        return folder


class LatentScale(nn.Module):
    """Per-channel mean and standard deviation of the training latents: the field works on unit-variance codes."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not all(math.isfinite(v) for v in [*mean, *std]) or min(std) <= 0:
            raise AutoencoderError("latent statistics must be finite, one mean and one positive std per channel")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[None, :, None, None])
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[None, :, None, None])

    @classmethod
    def measure(cls, latents: Tensor) -> LatentScale:
        """Statistics of latents [n, c, h, w], in float64 for a stable variance."""
        flat = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)
        return cls(flat.mean(1).tolist(), flat.std(1).clamp_min(1e-6).tolist())

    def to_config(self) -> dict[str, list[float]]:
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def normalise(self, latents: Tensor) -> Tensor:
        return (latents - self.mean) / self.std

    def restore(self, codes: Tensor) -> Tensor:
        return codes * self.std + self.mean


def locate(ref: str) -> Path:
    """The autoencoder folder `ref` names: a folder, an `efm autoencoder` run (its model/), or a Hub repo holding a
    diffusers autoencoder at its root (downloaded into the HF cache: config.json and safetensors weights only)."""
    path = Path(ref)
    for folder in (path, path / "model"):  # a run folder has a config.json of its own: look for the weights
        if (folder / WEIGHTS_NAME).is_file():
            return folder
    if (path / CONFIG_NAME).is_file():
        return path
    from efm_cli.capacitor import hub

    if not path.exists() and hub.parse_hub_ref(ref) is not None:
        return hub.download_files(ref, (CONFIG_NAME, WEIGHTS_NAME))
    raise AutoencoderError(f"{ref} is neither an autoencoder folder nor a Hub repo (user/name[@revision])")


def shape_of(folder: Path) -> tuple[int, int]:
    """(downsampling factor, latent channels) of an autoencoder folder, from its config alone."""
    config = validate_config(_read_config(folder))
    return downsampling(config), int(config.get("latent_channels", 4))
