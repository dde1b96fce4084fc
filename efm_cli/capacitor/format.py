"""The capacitor folder format: file names, config.json's structure and ranges, reading and writing it — no torch.

A capacitor is a folder: `config.json` (format name and version, the two domains, the field and its parameters,
image size and value range, network, preprocessing, default sampler, training summary) and `model.safetensors`
(the EMA weights). A latent capacitor's field lives in an autoencoder's latent space: its config has a `latent`
section (the autoencoder's kind, downsampling and latent channels, and the per-channel statistics that make the
codes unit-variance), and the autoencoder itself is the folder's `autoencoder/` subfolder, in diffusers' format.
Everything here works on plain dicts, so that the Hub code and `efm models` can check a capacitor without importing
torch; `efm_cli.capacitor.model` builds the network from what this module validated.

Each fact lives in one place in the config: the image size and channels in `image`, the plate distance in `field`.
Format version 1 also repeated size, channels and L inside `network`; such configs still load when the copies
agree, and are refused when they do not (a network whose height embedding disagrees with its plates).
"""

from __future__ import annotations

import json
import math
import reprlib
from pathlib import Path
from typing import Any, Literal

from efm_cli.errors import EfmError

FORMAT = "efm-capacitor"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
SAMPLE_NAME = "sample.png"
"""The optional files of a capacitor folder: its model card and the picture the card shows."""
AUTOENCODER_DIR = "autoencoder"
AUTOENCODER_WEIGHTS = "diffusion_pytorch_model.safetensors"
AUTOENCODER_FILES = (f"{AUTOENCODER_DIR}/{CONFIG_NAME}", f"{AUTOENCODER_DIR}/{AUTOENCODER_WEIGHTS}")
"""A latent capacitor's autoencoder: always this subfolder (a config never names a path), diffusers' file names."""
AUTOENCODER_KINDS = ("AutoencoderTiny", "AutoencoderKL")

Direction = Literal["forward", "backward"]

MIN_SIZE, MAX_SIZE, SIZE_STEP = 8, 1024, 8
"""Image sizes a capacitor may have: multiples of 8 (the UNet halves them three times), 8 to 1024."""
SIZE_RULE = f"a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE}"

FIELD_KINDS = ("coulomb", "tube")
SOLVER_NAMES = ("dopri5", "heun", "euler")
"""The integrator's solvers (`efm_cli.integrator.SOLVERS`), named here so that checking a config needs no torch."""

MAX_CONFIG_BYTES = 1 << 20
"""No real config comes near 1 MiB."""

SAMPLER_OPTIONS = {"solver": str, "rtol": float, "atol": float, "steps": int, "max_nfe": int}
"""What config.json may set about sampling, with its type: nothing else reaches the integrator."""

SAMPLER_RANGES = {"rtol": (1e-6, 1.0), "atol": (1e-6, 1.0), "steps": (1, 1000), "max_nfe": (1, 2000)}
"""Bounds of the numeric sampler options: a downloaded config must not ask for a run that takes hours. The field
lines are integrated in fp32, where tolerances below 1e-6 cannot be met and only burn evaluations; trained capacitors
land in about 50 evaluations and the official Euler sampler takes 80 steps. A config may lower the integrator's cap
of 2000 evaluations a line, never raise it. A user's own --rtol, --atol and --steps are not bounded by this."""

MAX_DOMAIN_LENGTH = 64
"""Domain names end up in terminal lines, folder names (`photos-to-NAME`) and model cards: short, printable text."""


class CapacitorError(EfmError):
    """A capacitor folder or config that cannot be used; the message says what is wrong with it."""

    default_hint = "check the capacitor folder, or see 'efm models'"


def size_ok(size: Any) -> bool:
    """Whether `size` can be a capacitor's image size (`SIZE_RULE`)."""
    if isinstance(size, bool) or not isinstance(size, int):
        return False
    return MIN_SIZE <= size <= MAX_SIZE and size % SIZE_STEP == 0


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if not isinstance(value, dict):
        raise CapacitorError(f"config.json: '{key}' must be an object, got {_shown(value)}")
    return value


def validate(config: Any) -> dict[str, Any]:
    """Check a capacitor config's structure, types and ranges before anything is allocated; return it in the
    current format (a version-1 config with consistent copies comes back without them)."""
    if not isinstance(config, dict):
        raise CapacitorError("config.json must hold a JSON object")
    if config.get("format") != FORMAT:
        raise CapacitorError(f"config.json is not an {FORMAT} config (format = {_shown(config.get('format'))})")
    version = config.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        readable = " and ".join(str(v) for v in READABLE_VERSIONS)
        raise CapacitorError(
            f"config.json has format_version {_shown(version)}; this efm reads {readable}",
            "upgrade efm (pip install -U efm-cli) if the capacitor is newer than this efm",
        )
    domains = _section(config, "domains")
    for key in ("source", "target"):
        if not domain_name_ok(domains.get(key)):
            raise CapacitorError(
                f"config.json: domains.{key} must be a printable name of 1 to {MAX_DOMAIN_LENGTH} characters "
                f"without '/' or '\\', got {_shown(domains.get(key))}"
            )
    if domains["source"] == domains["target"]:
        raise CapacitorError("config.json: the two domains must have different names")
    field = _section(config, "field")
    L, eps = field.get("L"), field.get("eps", 1e-3)
    finite = all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in (L, eps))
    if not finite or not 0 < eps < L / 2:
        raise CapacitorError("config.json: 'field' needs a finite plate distance L > 0 and 0 < eps < L/2")
    if field.get("kind") not in FIELD_KINDS:
        raise CapacitorError(
            f"config.json: unknown field kind {_shown(field.get('kind'))}; expected 'coulomb' or 'tube'"
        )
    image = _section(config, "image")
    if not size_ok(image.get("size")):
        raise CapacitorError(f"config.json: 'image' needs a size that is {SIZE_RULE}, got {_shown(image.get('size'))}")
    if not _one_of(image.get("channels"), (1, 3)):
        raise CapacitorError(f"config.json: 'image' needs 1 or 3 channels, got {_shown(image.get('channels'))}")
    sampler = config.get("sampler", {})
    if not isinstance(sampler, dict) or not all(_sampler_option_ok(k, v) for k, v in sampler.items()):
        allowed = ", ".join(f"{k} in [{low:g}, {high:g}]" for k, (low, high) in SAMPLER_RANGES.items())
        raise CapacitorError(
            f"config.json: 'sampler' may only set solver ({'|'.join(SOLVER_NAMES)}), {allowed}; got {_shown(sampler)}",
            "these bounds keep a downloaded capacitor from making translation run for hours; "
            "ask for more with --rtol, --atol or --steps",
        )
    _check_optional_sections(config)
    network = _section(config, "network")
    if network.get("kind") != "unet":
        raise CapacitorError(f"config.json: 'network' must be a UNet, got kind {_shown(network.get('kind'))}")
    if "latent" in config:
        _check_latent(config)
    if "distilled" in config:
        _check_distilled(config["distilled"])
    return {**config, "format_version": FORMAT_VERSION, "network": _without_copies(config, network)}


def domain_name_ok(name: Any) -> bool:
    """Whether `name` can name a capacitor's plate: 1 to `MAX_DOMAIN_LENGTH` printable characters (no escape
    sequences or line breaks for a terminal) and no path separator (it becomes part of a folder name)."""
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_DOMAIN_LENGTH
        and name.isprintable()
        and not {"/", "\\"} & set(name)
    )


def _shown(value: Any) -> str:
    """`value` for an error line: its repr (escape sequences and line breaks escaped), abbreviated when long."""
    return reprlib.repr(value)


def _one_of(value: Any, allowed: tuple[int, ...]) -> bool:
    """`value in allowed` without Python's `True == 1`: JSON's `true` is no count."""
    return type(value) is int and value in allowed


def _check_optional_sections(config: dict[str, Any]) -> None:
    """The sections that only describe the capacitor still have the shape their readers (cards, eval) expect."""
    for key in ("preprocessing", "training"):
        if not isinstance(config.get(key, {}), dict):
            raise CapacitorError(f"config.json: '{key}' must be an object, got {_shown(config[key])}")
    preprocessing = config.get("preprocessing", {})
    if (
        preprocessing.get("resize", "resize") not in ("resize", "crop")
        or type(preprocessing.get("hflip", False)) is not bool
    ):
        raise CapacitorError(
            "config.json: 'preprocessing' may set resize ('resize' or 'crop') and hflip (true or false), "
            f"got {_shown(preprocessing)}"
        )


def _finite_numbers(values: Any, count: int) -> bool:
    return (
        isinstance(values, list)
        and len(values) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    )


def _check_latent(config: dict[str, Any]) -> None:
    latent, size = _section(config, "latent"), config["image"]["size"]
    if latent.get("kind") not in AUTOENCODER_KINDS:
        raise CapacitorError(f"config.json: 'latent' needs an autoencoder kind in {AUTOENCODER_KINDS}")
    factor, channels = latent.get("factor"), latent.get("channels")
    if not _one_of(factor, (1, 2, 4, 8, 16, 32)) or not _one_of(channels, tuple(range(1, 65))):
        raise CapacitorError("config.json: 'latent' needs a factor in 1, 2, 4 … 32 and 1 to 64 channels")
    if size % factor or not size_ok(size // factor):
        raise CapacitorError(
            f"config.json: image.size {size} over the autoencoder's factor {factor} must be {SIZE_RULE}"
        )
    if not (_finite_numbers(latent.get("mean"), channels) and _finite_numbers(latent.get("std"), channels)):
        raise CapacitorError(f"config.json: 'latent' needs {channels} finite means and standard deviations")
    if min(latent["std"]) <= 0:
        raise CapacitorError("config.json: the latent standard deviations must be positive")
    origin = latent.get("origin", "")
    if not isinstance(origin, str) or len(origin) > 300 or not origin.isprintable():
        raise CapacitorError("config.json: latent.origin must be a short printable text")


DISTILLED_NFE = (1, 2, 4)
"""Euler step counts a distilled capacitor (`efm distill`) is measured at and may be exported with."""


def _count(value: Any, low: int) -> bool:
    return type(value) is int and value >= low


def _error_ok(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _check_distilled(distilled: Any) -> None:
    """`efm distill`'s record (what the student was distilled from and how close it lands): only descriptive, but a
    card or `efm models` prints it, so its numbers must be finite and its step counts the ones it can be."""
    shape = (
        "config.json: 'distilled' needs teacher (a short printable text), pairs and held_out (counts ≥ 1), steps "
        f"(≥ 0), nfe in {DISTILLED_NFE} and errors: an object from k in {DISTILLED_NFE} to finite, "
        "non-negative student and teacher errors"
    )
    if not isinstance(distilled, dict):
        raise CapacitorError(f"{shape}; got {_shown(distilled)}")
    teacher, errors = distilled.get("teacher"), distilled.get("errors")
    fine = (
        isinstance(teacher, str)
        and 0 < len(teacher) <= 300
        and teacher.isprintable()
        and _count(distilled.get("pairs"), 1)
        and _count(distilled.get("held_out"), 1)
        and _count(distilled.get("steps"), 0)
        and _one_of(distilled.get("nfe"), DISTILLED_NFE)
        and isinstance(errors, dict)
        and all(key in {str(k) for k in DISTILLED_NFE} for key in errors)
        and all(
            isinstance(row, dict) and _error_ok(row.get("student")) and _error_ok(row.get("teacher"))
            for row in errors.values()
        )
    )
    if not fine:
        raise CapacitorError(f"{shape}; got {_shown(distilled)}")


def field_space(config: dict[str, Any]) -> tuple[int, int]:
    """(size, channels) of what the field moves: the image, or a latent capacitor's latent."""
    image, latent = config["image"], config.get("latent")
    if latent is None:
        return image["size"], image["channels"]
    return image["size"] // latent["factor"], latent["channels"]


def _without_copies(config: dict[str, Any], network: dict[str, Any]) -> dict[str, Any]:
    """The network section without the values it repeats from `image` (or `latent`) and `field`; copies that
    disagree with the values they repeat make the config unusable."""
    size, channels = field_space(config)
    truth = {
        "size": ("image.size", size),
        "channels": ("image.channels", channels),
        "L": ("field.L", config["field"]["L"]),
    }
    if "latent" in config:
        truth |= {"size": ("image.size / latent.factor", size), "channels": ("latent.channels", channels)}
    for key, (name, value) in truth.items():
        if key in network and network[key] != value:
            raise CapacitorError(
                f"config.json: network.{key} = {network[key]!r} disagrees with {name} = {value!r}",
                "the config was edited by hand or is damaged; re-export the capacitor",
            )
    return {k: v for k, v in network.items() if k not in truth}


def network_config(config: dict[str, Any]) -> dict[str, Any]:
    """The complete network config of a validated capacitor config: its own section plus size, channels and L."""
    size, channels = field_space(config)
    return {**config["network"], "size": size, "channels": channels, "L": config["field"]["L"]}


def read_config(folder: Path) -> Any:
    """The parsed (not yet validated) config.json of a capacitor folder; every reason it cannot be read is a
    `CapacitorError`. Every reader of a capacitor config goes through here."""
    try:
        return json.loads(config_text(folder / CONFIG_NAME))
    except FileNotFoundError as error:
        raise CapacitorError(f"{folder} has no {CONFIG_NAME}") from error
    except RecursionError as error:
        raise CapacitorError(f"{folder / CONFIG_NAME} is nested too deeply to be a capacitor config") from error
    except (OSError, ValueError) as error:
        raise CapacitorError(f"{folder / CONFIG_NAME} is not valid JSON ({error})") from error


def config_text(path: Path) -> str:
    """The text of a config.json (a capacitor's or an autoencoder's), refused (ValueError) unless it is a regular
    file of at most `MAX_CONFIG_BYTES`.

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
        return value in SOLVER_NAMES
    if not (isinstance(value, int | float) if kind is float else isinstance(value, kind)):
        return False
    low, high = SAMPLER_RANGES[key]
    return low <= value <= high


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
    latent: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A complete, validated capacitor config (what `efm train` writes). `network` may be a full network config:
    the size, channels and L it repeats must match the capacitor's and are stored once."""
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
            **({"latent": latent} if latent is not None else {}),
        }
    )
