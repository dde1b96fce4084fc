"""Model references: which capacitors are known locally, and what a REF or a `--to DOMAIN` means.

`resolve(ref)` tries, in this order:

1. an existing local folder (`./runs/h2z/model`, `~/caps/h2z`): used as it is, or its `model/` for a training run;
2. a Hub reference, `user/name` or `user/name@revision` (branch, tag or full commit hash): downloaded into the
   shared HF cache by `efm_cli.capacitor.hub` (a cache hit needs no file request; offline, the cache alone answers);
3. a short name: the folder name of an embedded capacitor (`weights/NAME`), or the repo name of a cached Hub
   capacitor (`name` for `user/name`, its `main` revision); embedded ones win on a clash.

`--to DOMAIN` picks the one known capacitor (embedded or cached) with a plate of that name, and the direction
from it; a distilled capacitor stands aside for its trained teacher unless `--fast` asks for it.
Reading a config here never builds a network, so listing models stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from efm_cli import env
from efm_cli.capacitor import hub
from efm_cli.capacitor.format import CapacitorError, Direction, read_config, validate
from efm_cli.errors import EfmError

Origin = Literal["embedded", "cache", "path"]


class UnknownReference(EfmError):
    """A reference or domain that resolves to no capacitor, or to several; `hint` says what is available."""


@dataclass(frozen=True)
class Entry:
    """One locally available capacitor."""

    name: str
    path: Path
    origin: Origin
    config: dict[str, Any]

    @property
    def domains(self) -> tuple[str, str]:
        return self.config["domains"]["source"], self.config["domains"]["target"]


def _usable_config(folder: Path) -> dict[str, Any] | None:
    """The validated config of a capacitor folder, or None when the folder holds no usable capacitor."""
    try:
        return validate(read_config(folder))
    except CapacitorError:
        return None


def _scan(root: Path, origin: Origin) -> list[Entry]:
    if not root.is_dir():
        return []
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = _usable_config(folder)
        if config is not None:
            entries.append(Entry(folder.name, folder, origin, config))
    return entries


def embedded() -> list[Entry]:
    """Capacitors shipped with efm, one folder each under `weights/`."""
    return _scan(env.embedded_weights_dir(), "embedded")


def cached() -> list[Entry]:
    """Capacitors in the shared HF cache: `user/name` for a repo's main revision, `user/name@REF` for others."""
    entries, names = [], set()
    for item in hub.cached():
        refs = [ref for ref in item.refs if ref != "main"]
        name = item.repo_id if "main" in item.refs else f"{item.repo_id}@{refs[0] if refs else item.commit}"
        if name not in names:
            names.add(name)
            entries.append(Entry(name, item.path, "cache", item.config))
    return entries


def known() -> list[Entry]:
    """Every capacitor this machine has without a download; embedded ones come first and win on name clashes."""
    return embedded() + cached()


def short_name(entry: Entry) -> str:
    """What a user may type for an entry: an embedded folder name, or the repo name of a cached capacitor."""
    return entry.name.split("/")[-1] if entry.origin == "cache" else entry.name


def resolve(ref: str) -> Path:
    """The local folder of a reference, in the order of the module docstring; Hub errors are `hub.HubError`s."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return hub.locate_capacitor(path)[0]  # a training run folder stands for its model/
    if hub.parse_hub_ref(ref) is not None:
        return hub.download(ref)
    entries = known()
    matches = [entry for entry in entries if ref in (entry.name, short_name(entry))]
    if len(matches) > 1 and matches[0].origin == "cache":
        names = ", ".join(entry.name for entry in matches)
        raise UnknownReference(f"{ref!r} could be any of {names}", "pass the full user/name instead")
    if matches:
        return matches[0].path
    raise UnknownReference(f"no capacitor called {ref!r}", _available_hint(entries))


def distilled_from(config: dict[str, Any]) -> str | None:
    """The teacher a distilled (few-step, `efm distill`) capacitor's config names, or None for a trained one."""
    record = config.get("distilled")
    return record.get("teacher") if isinstance(record, dict) else None


def for_domain(domain: str, *, fast: bool = False) -> tuple[Entry, Direction]:
    """The one known capacitor with a plate named `domain`, and the direction that ends on it.

    A distilled capacitor is a faster, slightly less faithful copy of its teacher, so the two may share domains:
    `fast` picks among the distilled ones, otherwise the trained ones are picked (the distilled ones only when no
    trained one has that plate). Shipping a teacher with its student thus never makes `--to` ambiguous.
    """
    entries = known()
    plates = [entry for entry in entries if domain in entry.domains]
    if not plates:
        raise UnknownReference(f"no known capacitor translates to {domain!r}", _available_hint(entries))
    matches = [entry for entry in plates if (distilled_from(entry.config) is not None) == fast]
    if fast and not matches:
        raise UnknownReference(
            f"no distilled capacitor translates to {domain!r}",
            f"make one with 'efm distill {plates[0].name} --source DIR --target DIR', or drop --fast",
        )
    matches = matches or plates
    if len(matches) > 1:
        names = ", ".join(entry.name for entry in matches)
        raise UnknownReference(
            f"several capacitors translate to {domain!r}: {names}", "pick one with --model NAME instead of --to"
        )
    entry = matches[0]
    return entry, "forward" if entry.domains[1] == domain else "backward"


def _available_hint(entries: list[Entry]) -> str:
    if not entries:
        return "no capacitor is installed; pass --model with a folder or a Hub repo (user/name)"
    listed = ", ".join(f"{e.name} ({e.domains[0]}↔{e.domains[1]})" for e in entries)
    return f"available: {listed}; see 'efm models'"
