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
    network_config,
    read_config,
    validate,
)
from efm_cli.errors import EfmError
from efm_cli.tensors import check_header, count, header, meta_shapes

ALLOWED_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, SAMPLE_NAME, *AUTOENCODER_FILES)
"""The files of a capacitor on the Hub; anything else in a repo is never downloaded."""

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight formats that unpickle on load, which efm never does."""

_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REVISION_PART = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}"
HUB_REF = re.compile(
    rf"(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>{_REVISION_PART}(?:/{_REVISION_PART}){{0,4}}))?", re.ASCII
)
"""`user/name` or `user/name@revision`, in the Hub's own rules: names of ASCII letters, digits, '_', '-' and '.', at
most 96 long, neither starting nor ending with '-' or '.'. A revision (a branch, a tag, `refs/pr/1` or a commit hash)
has the same characters in up to five '/'-separated parts, none starting with '.' or '-'."""


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
    """(repo id, revision) when `ref` has the Hub form (`HUB_REF`), else None.

    Dots and dashes in a row (`user/..`, `user/a--b`, `user/name@x/../..`) make no Hub name: huggingface_hub would
    refuse the repo with an error of its own, and the cache would resolve such a revision as a path outside itself.
    """
    match = HUB_REF.fullmatch(ref)
    if match is None:
        return None
    repo, revision = match["repo"], match["revision"]
    if "--" in repo or ".." in repo or repo.endswith(".git") or ".." in (revision or ""):
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
        check_folder(_snapshot(folder, repo_id, cache), shapes=True)
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
    _snapshot(folder, repo_id, None)
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
        check_folder(_snapshot(folder, repo_id, cache))
    except (OSError, CapacitorError) as error:
        where = _where(repo_id, revision)
        raise HubError(
            f"{where} is not in the cache, and offline mode forbids downloading it",
            f"run 'efm download {where}' once with network access, or unset HF_HUB_OFFLINE / drop --offline",
        ) from error
    return folder


def _snapshot(folder: Path, repo_id: str, cache: str | None) -> Path:
    """`folder`, once it is one of `repo_id`'s snapshots in the cache (a HubError if not).

    The cache finds a branch's snapshot through the commit hash written in `refs/BRANCH`, unchecked: an edited refs
    file (`../../../somewhere`, `/tmp/x`) would make it hand out any folder of the machine as the download.
    """
    snapshots = Path(cache or cache_dir()) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if folder.resolve().parent != snapshots.resolve() or not re.fullmatch(r"[0-9a-f]{40}", folder.name):
        raise HubError(
            f"the cache entry of {repo_id} points outside the cache, to {folder}",
            f"remove it (hf cache rm model/{repo_id}) and download {repo_id} again",
        )
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


def check_folder(folder: Path, *, shapes: bool = False) -> dict[str, Any]:
    """Validate a capacitor folder: its config, and the safetensors header of its weights (and of a latent
    capacitor's autoencoder, whose config.json must at least name a kind efm reads), without torch.

    With `shapes` it also compares every weight's name and shape with what the configs describe, sized on the meta
    device (this imports torch, and diffusers for a latent capacitor): a config that asks for more than its weights
    hold is refused before anything is allocated. Downloads and `Capacitor.from_pretrained` check this way.
    """
    config = validate(read_config(folder))
    weights = header(folder / WEIGHTS_NAME, CapacitorError)
    if shapes:
        from efm_cli.network import build

        try:
            expected = meta_shapes(lambda: build(network_config(config)))
        except (TypeError, ValueError) as error:
            raise CapacitorError(f"config.json: invalid network: {error}") from error
        check_header(expected, weights, folder / WEIGHTS_NAME, CapacitorError)
    if "latent" in config:
        _check_autoencoder(folder / AUTOENCODER_DIR, config["latent"]["kind"], shapes)
    return config


def _check_autoencoder(folder: Path, kind: str, shapes: bool) -> None:
    found = read_config(folder)
    if not isinstance(found, dict) or found.get("_class_name") != kind:
        shown = found.get("_class_name") if isinstance(found, dict) else None
        raise CapacitorError(
            f"{AUTOENCODER_DIR}/{CONFIG_NAME} holds a {shown!r:.40}, not the {kind} that config.json names"
        )
    weights = header(folder / AUTOENCODER_WEIGHTS, CapacitorError)
    if shapes:
        from efm_cli.autoencoder import AutoencoderError, validate_config, weight_shapes

        try:
            expected = weight_shapes(validate_config(found))
            check_header(expected, weights, folder / AUTOENCODER_WEIGHTS, AutoencoderError)
        except AutoencoderError as error:
            raise CapacitorError(f"{AUTOENCODER_DIR}/: {error.message}", error.hint) from error


def parameters(path: Path) -> int:
    """How many weights a safetensors file holds, from its header (no torch); a CapacitorError if it is no valid
    safetensors file (`efm_cli.tensors.header`)."""
    return count({name: shape for name, (_, shape) in header(path, CapacitorError).items()})


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
    if isinstance(error, hub_errors.HFValidationError):
        return HubError(f"{where} is not a valid Hub reference", "write it as user/name or user/name@revision")
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
        config = check_folder(model, shapes=True)
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
