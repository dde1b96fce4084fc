"""Capacitors: the folder format, model cards, the Hub, the local registry, and the loaded model.

`format`, `card`, `hub` and `registry` work on files and plain dicts and never import torch, so that `efm models`
and `efm download` start fast; `model` (the `Capacitor` class) builds the field network. `Capacitor` is also
importable from here, loaded on first use for the same reason.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from efm_cli.capacitor.model import Capacitor, Translation

__all__ = ["Capacitor", "Translation"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from efm_cli.capacitor import model

        return getattr(model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
