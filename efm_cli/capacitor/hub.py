"""Capacitors on the Hugging Face Hub: download into the shared HF cache, list what is cached, push.

Everything goes through `huggingface_hub`, so its cache layout, `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`
behave as in every other Hub library. On top of it this module keeps three promises:

- only capacitor files are fetched (`ALLOWED_FILES`); a repo is checked from its file listing and its config.json
  before the weights are downloaded, and a repo offering only pickle weights is refused;
- offline (`HF_HUB_OFFLINE=1` or `offline=True`) means cache only, without a single request;
- every failure becomes a `HubError`: one line naming the repo, and a hint. Tokens never appear in a message.

A download that turns out to be unusable is removed from the cache again, so the next try downloads afresh
instead of finding the same broken files.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from efm_cli import __version__
from efm_cli.capacitor.card import LIBRARY_NAME, render
from efm_cli.capacitor.format import (
    AUTOENCODER_DIR,
    AUTOENCODER_FILES,
    AUTOENCODER_WEIGHTS,
    CARD_NAME,
    CONFIG_NAME,
    SAMPLE_NAME,
    WEIGHTS_NAME,
    CapacitorError,
    read_config,
    validate,
)
from efm_cli.errors import EfmError

ALLOWED_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, SAMPLE_NAME, *AUTOENCODER_FILES)
"""The files of a capacitor on the Hub; anything else in a repo is never downloaded."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight formats that unpickle on load, which efm never does."""

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
"""`user/name` or `user/name@revision`; a revision may be a branch, a tag or a commit hash."""


class HubError(EfmError):
    """A Hub reference that could not be turned into a usable local capacitor; `hint` says what to do."""


@dataclass(frozen=True)
class CachedCapacitor:
    """One capacitor revision found in the HF cache."""

    repo_id: str
    commit: str
    refs: tuple[str, ...]
    path: Path
    config: dict[str, Any]


@dataclass(frozen=True)
class PushResult:
    """Where a push landed: the repo, the branch, the commit and its URL, and whether that commit is new.

    `changed` is False when the branch already held these exact files: the client then makes no commit (the Hub
    refuses empty ones) and `commit` is the branch's existing head.
    """

    repo_id: str
    revision: str
    commit: str
    url: str
    files: tuple[str, ...]
    changed: bool = True


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when `ref` has the Hub form, else None.

    A repo or revision made of dots (`user/..`, `user/name@../x`) is no Hub name: the cache would resolve it as a
    path outside itself.
    """
    match = HUB_REF.match(ref)
    if match is None:
        return None
    repo, revision = match["repo"], match["revision"]
    parts = repo.split("/") + (revision.split("/") if revision else [])
    if any(part.strip(".") == "" for part in parts):
        return None
    return repo, revision


def split_ref(ref: str) -> tuple[str, str | None]:
    """(repo id, revision) of `user/name` or `user/name@revision`; a HubError for anything else."""
    parsed = parse_hub_ref(ref)
    if parsed is None:
        raise HubError(f"{ref!r} is not a Hub reference", "write it as user/name or user/name@revision")
    return parsed


def _hub() -> Any:
    # Imported on use: huggingface_hub pulls in an HTTP stack that commands which never touch the Hub should not pay.
    return importlib.import_module("huggingface_hub")


def _constants() -> Any:
    return importlib.import_module("huggingface_hub.constants")


def is_offline() -> bool:
    """Whether HF_HUB_OFFLINE (as huggingface_hub read it) forbids requests."""
    return bool(_constants().HF_HUB_OFFLINE)


def cache_dir() -> Path:
    """The shared HF Hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    return Path(_constants().HF_HUB_CACHE)


def _public_endpoint(endpoint: str | None) -> str:
    """The endpoint for messages, without any user:password a mirror URL might carry."""
    parts = urlsplit(endpoint or _constants().ENDPOINT)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=host))


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def download(
    ref: str,
    *,
    offline: bool = False,
    token: str | None = None,
    endpoint: str | None = None,
    cache: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    timeout: float | None = None,
) -> Path:
    """The local folder of Hub capacitor `ref` (`user/name[@revision]`), downloading what the cache lacks.

    `token` defaults to HF_TOKEN (or a stored login), `endpoint` to HF_ENDPOINT, `cache` to the shared HF cache.
    Offline (the flag or HF_HUB_OFFLINE) reads the cache only. Network failures and server errors fall back to a
    cached copy of the same revision when there is one, as huggingface_hub itself does.
    """
    repo_id, revision = split_ref(ref)
    endpoint = endpoint or _constants().ENDPOINT
    cache = str(cache) if cache is not None else None
    if offline or is_offline():
        return _from_cache(repo_id, revision, cache)
    hub = _hub()
    api = hub.HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
    if timeout is None:
        timeout = float(_constants().HF_HUB_ETAG_TIMEOUT)
    try:
        info = api.model_info(repo_id, revision=revision, timeout=timeout)
    except Exception as error:
        failure = explain(error, repo_id, revision, endpoint, token=token)
        if _transient(error):
            try:
                return _from_cache(repo_id, revision, cache)
            except HubError:
                raise failure from error
        raise failure from error
    _check_listing(repo_id, revision, [sibling.rfilename for sibling in info.siblings or []])
    common = {"repo_id": repo_id, "cache_dir": cache, "endpoint": endpoint, "token": token}
    common.update(force_download=force_download, etag_timeout=timeout)
    common.update(library_name=LIBRARY_NAME, library_version=__version__)
    try:
        # The config first, pinned to the commit just listed: a repo that is no capacitor costs one small file.
        config_path = Path(hub.hf_hub_download(filename=CONFIG_NAME, revision=info.sha, **common))
        _check_config(config_path, repo_id, revision)
        folder = Path(hub.snapshot_download(revision=revision, allow_patterns=list(ALLOWED_FILES), **common))
    except HubError:
        _forget(repo_id, info.sha, cache)
        raise
    except Exception as error:
        raise explain(error, repo_id, revision, endpoint, token=token) from error
    try:
        check_folder(folder)
    except CapacitorError as error:
        _forget(repo_id, folder.name, cache)
        raise HubError(
            f"{_where(repo_id, revision)} is not a usable capacitor: {error}",
            "the download was removed from the cache; if the next try fails the same way, the repo itself is broken",
        ) from error
    return folder


def download_files(ref: str, names: Sequence[str], *, token: str | None = None, endpoint: str | None = None) -> Path:
    """The cached snapshot of Hub repo `ref` holding exactly the files `names` (an autoencoder's config and
    weights), downloading what the cache lacks; offline (HF_HUB_OFFLINE) it reads the cache only."""
    repo_id, revision = split_ref(ref)
    endpoint = endpoint or _constants().ENDPOINT
    try:
        folder = Path(
            _hub().snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=list(names),
                endpoint=endpoint,
                token=token,
                local_files_only=is_offline(),
                library_name=LIBRARY_NAME,
                library_version=__version__,
            )
        )
    except Exception as error:
        raise explain(error, repo_id, revision, endpoint, token=token) from error
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise HubError(f"{_where(repo_id, revision)} has no {', '.join(missing)}", "check the repo name")
    return folder


def _from_cache(repo_id: str, revision: str | None, cache: str | None) -> Path:
    """The cached snapshot of a revision, without any request; a HubError (worded for offline use) if none."""
    hub = _hub()
    try:
        folder = Path(
            hub.snapshot_download(
                repo_id, revision=revision, cache_dir=cache, local_files_only=True, allow_patterns=list(ALLOWED_FILES)
            )
        )
        check_folder(folder)
    except (OSError, CapacitorError) as error:
        where = _where(repo_id, revision)
        raise HubError(
            f"{where} is not in the cache, and offline mode forbids downloading it",
            f"run 'efm download {where}' once with network access, or unset HF_HUB_OFFLINE / drop --offline",
        ) from error
    return folder


def _check_listing(repo_id: str, revision: str | None, names: list[str]) -> None:
    """Refuse, from the repo's file listing alone, what cannot be a safetensors capacitor."""
    where = _where(repo_id, revision)
    if CONFIG_NAME not in names:
        raise HubError(f"{where} is not an efm capacitor: it has no {CONFIG_NAME}", "check the repo name")
    if WEIGHTS_NAME not in names:
        pickled = sorted(name for name in names if name.lower().endswith(PICKLE_SUFFIXES))
        if pickled:
            raise HubError(
                f"{where} offers only pickle weights ({', '.join(pickled[:3])}), which efm never loads",
                f"ask its author to publish {WEIGHTS_NAME}",
            )
        raise HubError(f"{where} has no {WEIGHTS_NAME}", f"an efm capacitor is {CONFIG_NAME} plus {WEIGHTS_NAME}")


def _check_config(path: Path, repo_id: str, revision: str | None) -> None:
    try:
        validate(read_config(path.parent))
    except CapacitorError as error:
        raise HubError(
            f"{_where(repo_id, revision)} is not an efm capacitor: {error}",
            "check the repo name; efm loads only its own capacitor format",
        ) from error


def check_folder(folder: Path) -> dict[str, Any]:
    """Validate a capacitor folder without torch: its config, and the safetensors header of its weights (and of a
    latent capacitor's autoencoder, whose config.json must at least name a kind efm reads)."""
    config = validate(read_config(folder))
    parameters(folder / WEIGHTS_NAME)
    if "latent" in config:
        autoencoder = folder / AUTOENCODER_DIR
        found = read_config(autoencoder)
        kind = found.get("_class_name") if isinstance(found, dict) else None
        if kind != config["latent"]["kind"]:
            raise CapacitorError(
                f"{AUTOENCODER_DIR}/{CONFIG_NAME} holds a {kind!r}, "
                f"not the {config['latent']['kind']} that config.json names"
            )
        parameters(autoencoder / AUTOENCODER_WEIGHTS)
    return config


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""Bytes per element of the safetensors dtypes a capacitor may hold."""


def _offsets(entry: dict[str, Any]) -> tuple[int, int]:
    begin, stop = entry["data_offsets"]
    return int(begin), int(stop)


def parameters(path: Path) -> int:
    """How many weights a safetensors file holds, from its header (no torch).

    A truncated file, or one whose tensors' bytes do not tile its data exactly as their shapes and dtypes say,
    fails: the header is checked against the bytes before anything trusts it.
    """
    try:
        if path.exists() and not path.is_file():
            raise ValueError("not a regular file")  # a FIFO or a device would block or never end
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(size - 8, 100_000_000):
                raise ValueError("bad header length")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
        tensors = sorted((entry for key, entry in header.items() if key != "__metadata__"), key=_offsets)
        end = 0
        for entry in tensors:
            begin, stop = _offsets(entry)
            if begin != end or stop - begin != math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]]:
                raise ValueError("tensor bytes do not match the shapes and dtypes of the header")
            end = stop
        if not tensors or end != size - 8 - length:
            raise ValueError("tensor data does not fill the file")
        return sum(math.prod(entry["shape"]) for entry in tensors)
    except FileNotFoundError as error:
        raise CapacitorError(f"{path.parent} has no {path.name}") from error
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        raise CapacitorError(f"{path.name} is not a valid safetensors file ({error})") from error


def _forget(repo_id: str, commit: str, cache: str | None) -> None:
    """Drop a revision from the cache, so that a broken download is fetched again next time."""
    from huggingface_hub.utils import CacheNotFound

    hub = _hub()
    try:
        info = hub.scan_cache_dir(cache or cache_dir())
    except (CacheNotFound, OSError):
        return
    for repo in info.repos:
        if repo.repo_id != repo_id or repo.repo_type != "model":
            continue
        if any(revision.commit_hash == commit for revision in repo.revisions):
            info.delete_revisions(commit).execute()


def cached() -> list[CachedCapacitor]:
    """Every capacitor revision in the shared HF cache; found without any request and without torch."""
    from huggingface_hub.utils import CacheNotFound

    hub = _hub()
    try:
        info = hub.scan_cache_dir(cache_dir())
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: -r.last_modified):
            try:
                config = check_folder(Path(revision.snapshot_path))
            except CapacitorError:
                continue
            refs = tuple(sorted(revision.refs))
            path = Path(revision.snapshot_path)
            found.append(CachedCapacitor(repo.repo_id, revision.commit_hash, refs, path, config))
    return found


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning the Hub could not be reached, for whichever HTTP stack huggingface_hub uses."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "RequestException")):
        try:
            kinds.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(kinds)


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _transient(error: BaseException) -> bool:
    """A failure that says nothing about the repo: network trouble or a server error."""
    status = _status(error)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(error, _network_errors())


def explain(
    error: BaseException, repo_id: str, revision: str | None, endpoint: str | None, *, token: str | None = None
) -> HubError:
    """Turn a huggingface_hub or network failure into one line naming the repo, with a hint."""
    hub_errors = importlib.import_module("huggingface_hub.errors")
    where, host = _where(repo_id, revision), _public_endpoint(endpoint)
    if isinstance(error, HubError):
        return error
    if isinstance(error, hub_errors.RevisionNotFoundError):
        return HubError(
            f"revision {revision!r} not found in {repo_id}", "check the branch, tag or commit hash on the repo's page"
        )
    if isinstance(error, hub_errors.GatedRepoError):
        return HubError(f"{repo_id} is gated", "accept its conditions on the Hub, then set HF_TOKEN")
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        has_token = bool(token or os.environ.get("HF_TOKEN"))
        hint = (
            "check the name; if the repo is private, your token (HF_TOKEN) has no access to it"
            if has_token
            else "check the name; if the repo is private, set HF_TOKEN to a token that can read it"
        )
        return HubError(f"repo {repo_id} not found on {host}", hint)
    if isinstance(error, hub_errors.OfflineModeIsEnabled):
        return HubError(f"{where} needs the network, but offline mode is on", "unset HF_HUB_OFFLINE")
    status = _status(error)
    if status in (401, 403):
        return HubError(
            f"access to {where} refused by {host} (HTTP {status})",
            "set HF_TOKEN to a token with access to this repo (write access to push)",
        )
    if status is not None and status >= 500:
        return HubError(f"{host} answered HTTP {status} for {where}", "the Hub has a problem; try again later")
    if status is not None:
        return HubError(f"{host} refused the request for {where} (HTTP {status})", "check the repo name and your token")
    if isinstance(error, _network_errors()):
        if any("Timeout" in kind.__name__ for kind in type(error).__mro__) or isinstance(error, TimeoutError):
            return HubError(
                f"{host} did not answer in time for {where}",
                "check your network, or set HF_HUB_OFFLINE=1 to use cached capacitors only",
            )
        return HubError(
            f"cannot reach {host} for {where}",
            "check your network connection and HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use cached capacitors only",
        )
    if error.__cause__ is not None:
        # huggingface_hub wraps the real failure (a missing cache entry, a failed LFS upload) in its own error.
        return explain(error.__cause__, repo_id, revision, endpoint, token=token)
    return HubError(f"Hub request for {where} failed ({type(error).__name__})", "rerun with EFM_DEBUG=1 for details")


def locate_capacitor(folder: Path) -> tuple[Path, Path | None]:
    """The capacitor folder and sample grid of a training run folder (`model/` inside) or of a capacitor folder."""
    folder = Path(folder)
    model = folder / "model" if (folder / "model" / CONFIG_NAME).is_file() else folder
    candidates = [model / SAMPLE_NAME, folder / SAMPLE_NAME]
    samples = folder / "samples"
    if model != folder and samples.is_dir():
        candidates += sorted(samples.glob("step-*.png"), reverse=True)
    sample = next((path for path in candidates if path.is_file() and not path.is_symlink()), None)
    return model, sample


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Publish a capacitor folder (or a run folder's `model/`) to `repo_id`, with a model card and sample grid.

    Creates the repo (private if asked) and the branch `revision` when they do not exist yet. Only the capacitor
    files travel; an existing README.md in the folder is kept, otherwise a model card is generated.
    """
    if parse_hub_ref(repo_id) is None or "@" in repo_id:
        raise HubError(f"{repo_id!r} is not a repo name", "write it as user/name")
    model, sample = locate_capacitor(Path(folder))
    try:
        config = check_folder(model)
    except CapacitorError as error:
        hint = "pass a training run folder (with model/) or a capacitor folder"
        raise HubError(f"{folder} holds no capacitor to push: {error}", hint) from error
    hub = _hub()
    endpoint = endpoint or _constants().ENDPOINT
    source, target = config["domains"]["source"], config["domains"]["target"]
    card = model / CARD_NAME
    if card.is_file() and not card.is_symlink():  # a link could point at any file of the machine: never upload it
        readme = card.read_bytes()
    else:
        readme = render(config, repo_id, sample=SAMPLE_NAME if sample else None).encode()
    operations = [
        hub.CommitOperationAdd(path_in_repo=CONFIG_NAME, path_or_fileobj=str(model / CONFIG_NAME)),
        hub.CommitOperationAdd(path_in_repo=WEIGHTS_NAME, path_or_fileobj=str(model / WEIGHTS_NAME)),
        hub.CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=readme),
    ]
    if sample is not None:
        operations.append(hub.CommitOperationAdd(path_in_repo=SAMPLE_NAME, path_or_fileobj=str(sample)))
    if "latent" in config:
        operations += [
            hub.CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model / name)) for name in AUTOENCODER_FILES
        ]
    api = hub.HfApi(endpoint=endpoint, token=token, library_name=LIBRARY_NAME, library_version=__version__)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        head = api.repo_info(repo_id, revision=revision, repo_type="model").sha
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload efm capacitor {source}↔{target}",
            revision=revision,
            repo_type="model",
        )
    except Exception as error:
        raise explain(error, repo_id, revision, endpoint, token=token) from error
    return PushResult(
        repo_id=repo_id,
        revision=revision or "main",
        commit=commit.oid,
        url=commit.commit_url,
        files=tuple(operation.path_in_repo for operation in operations),
        changed=commit.oid != head,
    )
