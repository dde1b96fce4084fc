"""Writing files so that a reader, or a run killed half-way, never sees a partial one; reading back the JSON
documents efm writes."""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; once the block succeeds, flush it to disk and rename it over.

    The temporary file lives in the destination folder, on the same file system, so the rename is atomic: `path`
    holds the old file or the complete new one, never a mix. On any failure the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        # mkstemp creates the file 0600; the result gets the permissions of any new file.
        temporary.chmod(0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], document: Any) -> None:
    """Write `document` as indented JSON (UTF-8, final newline) through `atomic_path`."""
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_document(path: Path, format_name: str) -> dict[str, Any]:
    """The JSON object at `path` whose "format" is `format_name` (a run's config.json); FileNotFoundError when it
    is missing, ValueError (or KeyError/TypeError from the caller's parsing) when it is something else."""
    document = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or document.get("format") != format_name:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise ValueError(f"format is {found!r}, not {format_name!r}")
    return document


@functools.cache
def _umask() -> int:
    """The process umask; reading it means setting it, so do that once."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(paths: Iterable[Path]) -> None:
    """Delete what `atomic_path` left beside `paths` when a process was killed between writing and renaming.

    Only the temporaries of the given paths are touched, so a process writing other files in the same folders (another
    shard) is never disturbed; each folder is listed once, however many paths it holds.
    """
    names: dict[Path, set[str]] = {}
    for path in paths:
        names.setdefault(path.parent, set()).add(path.name)
    for folder, wanted in names.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            # mkstemp's random part has no dot: ".NAME.RANDOM.tmp" names NAME.
            if entry.startswith(".") and entry.endswith(".tmp") and entry[1:-4].rpartition(".")[0] in wanted:
                (folder / entry).unlink(missing_ok=True)
