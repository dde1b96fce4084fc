"""Reading weights that came from elsewhere: safetensors only, and every name, shape and dtype checked against the
module they are meant for before any of them is copied in."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from efm_cli.errors import EfmError


def load_into(module: nn.Module, path: Path, error: type[EfmError]) -> None:
    """Load the safetensors file `path` into `module` (cast to fp32); anything else raises `error` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.exists() and not path.is_file():
        raise error(f"{path} is not a regular file")
    try:
        weights: dict[str, Tensor] = load_file(path)
    except FileNotFoundError as missing:
        raise error(f"{path.parent} has no {path.name}") from missing
    except (SafetensorError, OSError) as broken:
        raise error(f"{path} is not a valid safetensors file ({broken})") from broken
    expected = module.state_dict()
    missing, unexpected = expected.keys() - weights.keys(), weights.keys() - expected.keys()
    if missing or unexpected:
        raise error(
            f"{path.name} does not match config.json: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape or not tensor.is_floating_point():
            raise error(f"{path.name}: '{name}' has shape {list(tensor.shape)} {tensor.dtype}")
    module.load_state_dict({k: v.float() for k, v in weights.items()})
