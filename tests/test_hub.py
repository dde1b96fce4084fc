"""Hub support against a real HTTP server on 127.0.0.1 (tests/hub_server.py) and the real huggingface_hub client.

In-process tests pass the server's URL as the endpoint and point the HF cache at tmp_path; subprocess tests set
HF_ENDPOINT and HF_HOME. No request ever leaves 127.0.0.1. Both turn Xet off: the server takes weights through Git
LFS, while a client with hf_xet installed would upload them through Xet storage, which the server does not speak.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import CAPACITOR_FILES, capacitor_files, subprocess_env
from hub_server import TOKEN, HubServer, Request

from efm_cli.capacitor import hub, registry
from efm_cli.capacitor.model import Capacitor

SIZE = 16
pytestmark = pytest.mark.usefixtures("isolated_hub")
LFS_PUT = r"\.git/info/lfs/objects/[0-9a-f]{64}$"
"""Path pattern of the LFS upload (PUT) of any object, for `HubServer.fail`."""


def get(server: HubServer, ref: str, **options) -> Path:
    return hub.download(ref, endpoint=server.url, **options)


def names(folder: Path) -> set[str]:
    return {path.name for path in folder.iterdir()}


def test_first_download_then_cache_hit_makes_no_file_request(hub_server: HubServer) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    folder = get(hub_server, "alice/h2z")
    assert names(folder) == CAPACITOR_FILES
    assert (folder / "model.safetensors").read_bytes() == capacitor_files()["model.safetensors"]
    assert {r.path.rsplit("/", 1)[-1] for r in hub_server.file_requests()} == CAPACITOR_FILES
    before = len(hub_server.file_requests())
    assert get(hub_server, "alice/h2z") == folder
    assert len(hub_server.file_requests()) == before


def test_revision_pinning_by_branch_tag_and_commit(hub_server: HubServer) -> None:
    first = hub_server.add("alice/h2z", capacitor_files(1))
    hub_server.repos["alice/h2z"].refs["v1"] = first
    second = hub_server.add("alice/h2z", capacitor_files(2))
    weights = {
        sha: files["model.safetensors"] for sha, files in ((first, capacitor_files(1)), (second, capacitor_files(2)))
    }
    assert weights[first] != weights[second]
    for ref, sha in (
        ("alice/h2z", second),
        ("alice/h2z@main", second),
        ("alice/h2z@v1", first),
        (f"alice/h2z@{first}", first),
    ):
        folder = get(hub_server, ref)
        assert folder.name == sha
        assert (folder / "model.safetensors").read_bytes() == weights[sha]
    assert get(hub_server, "alice/h2z@v1", offline=True).name == first


def test_offline_reads_the_cache_only_and_sends_nothing(hub_server: HubServer) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    with pytest.raises(hub.HubError, match="alice/h2z is not in the cache, and offline mode") as caught:
        get(hub_server, "alice/h2z", offline=True)
    assert "efm download alice/h2z" in caught.value.hint
    assert hub_server.log == []
    folder = get(hub_server, "alice/h2z")
    count = len(hub_server.log)
    assert get(hub_server, "alice/h2z", offline=True) == folder
    assert len(hub_server.log) == count


def test_missing_repo_and_revision_are_named_with_a_hint(hub_server: HubServer) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    with pytest.raises(hub.HubError, match=r"^repo alice/nope not found on http://127\.0\.0\.1:\d+$") as caught:
        get(hub_server, "alice/nope")
    assert "HF_TOKEN" in caught.value.hint
    with pytest.raises(hub.HubError, match="revision 'v9' not found in alice/h2z") as caught:
        get(hub_server, "alice/h2z@v9")
    assert "branch, tag or commit" in caught.value.hint
    assert hub_server.file_requests() == []


def test_server_error_then_success_on_retry(hub_server: HubServer) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    hub_server.fail("GET", r"^/api/models/alice/h2z", 503)
    with pytest.raises(hub.HubError, match=r"answered HTTP 503 for alice/h2z") as caught:
        get(hub_server, "alice/h2z")
    assert "try again later" in caught.value.hint
    hub_server.fail("HEAD", r"/resolve/.*/model\.safetensors$", 500)
    folder = get(hub_server, "alice/h2z")
    assert (folder / "model.safetensors").read_bytes() == capacitor_files()["model.safetensors"]
    heads = [r.status for r in hub_server.requests("model.safetensors", "HEAD")]
    assert heads == [500, 200]


def test_connection_refused_and_falling_back_to_the_cache(hub_server: HubServer) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    folder = get(hub_server, "alice/h2z")
    hub_server.stop()
    with pytest.raises(hub.HubError, match=r"cannot reach http://127\.0\.0\.1:\d+ for alice/other") as caught:
        get(hub_server, "alice/other")
    assert "HF_HUB_OFFLINE=1" in caught.value.hint
    assert get(hub_server, "alice/h2z") == folder


def test_a_hub_that_does_not_answer_in_time(hub_server: HubServer) -> None:
    hub_server.fail("GET", r"^/api/models/alice/h2z$", 500, delay=1.0)
    with pytest.raises(hub.HubError, match=r"did not answer in time for alice/h2z") as caught:
        get(hub_server, "alice/h2z", timeout=0.2)
    assert "HF_HUB_OFFLINE=1" in caught.value.hint


def test_only_capacitor_files_are_fetched_from_a_busy_repo(hub_server: HubServer) -> None:
    extra = {
        "README.md": b"---\nlibrary_name: efm-cli\n---\n# h2z\n",
        "sample.png": b"\x89PNG not really",
        "pytorch_model.bin": b"pickle would go here",
        "notes.txt": b"hello",
        "images/a.png": b"...",
        "../escape.json": b"{}",
    }
    hub_server.add("alice/h2z", {**capacitor_files(), **extra})
    folder = get(hub_server, "alice/h2z")
    assert names(folder) == CAPACITOR_FILES | {"README.md", "sample.png"}
    fetched = {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub_server.file_requests()}
    assert fetched == CAPACITOR_FILES | {"README.md", "sample.png"}


def test_repos_that_are_no_safetensors_capacitor_are_refused(hub_server: HubServer) -> None:
    config = capacitor_files()["config.json"]
    hub_server.add("alice/pickled", {"config.json": config, "pytorch_model.bin": b"x", "model.ckpt": b"y"})
    with pytest.raises(hub.HubError, match=r"only pickle weights \(model\.ckpt, pytorch_model\.bin\)"):
        get(hub_server, "alice/pickled")
    hub_server.add("alice/llm", {"config.json": b'{"model_type": "bert"}', "model.safetensors": b"zz"})
    with pytest.raises(hub.HubError, match="alice/llm is not an efm capacitor"):
        get(hub_server, "alice/llm")
    hub_server.add("alice/empty", {"README.md": b"hi"})
    with pytest.raises(hub.HubError, match=r"has no config\.json"):
        get(hub_server, "alice/empty")
    fetched = [r.path for r in hub_server.file_requests()]
    assert fetched and all(path.endswith("/config.json") and "alice/llm" in path for path in fetched)


def test_a_broken_download_does_not_poison_the_cache(hub_server: HubServer) -> None:
    good = capacitor_files()
    sha = hub_server.add("alice/h2z", {**good, "model.safetensors": good["model.safetensors"][:-100]})
    with pytest.raises(hub.HubError, match=r"not a usable capacitor: model\.safetensors is not a valid safetensors"):
        get(hub_server, "alice/h2z")
    hub_server.repos["alice/h2z"].commits[sha]["model.safetensors"] = good["model.safetensors"]
    folder = get(hub_server, "alice/h2z")
    assert (folder / "model.safetensors").read_bytes() == good["model.safetensors"]


def make_run(tmp_path: Path, seed: int = 0) -> Path:
    """A training run folder as `efm train` leaves it: model/ plus a sample grid."""
    run = tmp_path / f"run{seed}"
    (run / "model").mkdir(parents=True)
    for name, data in capacitor_files(seed).items():
        (run / "model" / name).write_bytes(data)
    (run / "sample.png").write_bytes(b"\x89PNG sample grid")
    return run


def test_push_then_download_round_trip(hub_server: HubServer, tmp_path: Path) -> None:
    run = make_run(tmp_path)
    result = hub.push(run, "bob/h2z", token=TOKEN, endpoint=hub_server.url)
    assert result.files == ("config.json", "model.safetensors", "README.md", "sample.png")
    assert result.url == f"{hub_server.url}/bob/h2z/commit/{result.commit}"
    folder = get(hub_server, "bob/h2z")
    assert names(folder) == CAPACITOR_FILES | {"README.md", "sample.png"}
    for name in CAPACITOR_FILES:
        assert (folder / name).read_bytes() == (run / "model" / name).read_bytes()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: efm-cli\npipeline_tag: image-to-image\ntags:\n")
    assert '\ndatasets:\n- "local/horses"\nmetrics:\n- "fid"\n---\n' in card
    assert "](sample.png)" in card and "efm translate" in card and 'Capacitor.from_pretrained("bob/h2z")' in card
    assert TOKEN not in card

    branch = hub.push(make_run(tmp_path, 1), "bob/h2z", revision="exp", token=TOKEN, endpoint=hub_server.url)
    assert branch.revision == "exp"
    assert (get(hub_server, "bob/h2z@exp") / "model.safetensors").read_bytes() == capacitor_files(1)[
        "model.safetensors"
    ]
    assert get(hub_server, "bob/h2z").name == result.commit


def test_push_needs_a_token(hub_server: HubServer, tmp_path: Path) -> None:
    with pytest.raises(hub.HubError, match=r"access to bob/h2z refused by .* \(HTTP 401\)") as caught:
        hub.push(make_run(tmp_path), "bob/h2z", endpoint=hub_server.url)
    assert "HF_TOKEN" in caught.value.hint
    with pytest.raises(hub.HubError, match="holds no capacitor to push"):
        hub.push(tmp_path, "bob/h2z", token=TOKEN, endpoint=hub_server.url)


def test_private_repo_needs_a_token(hub_server: HubServer) -> None:
    hub_server.add("carol/secret", capacitor_files(), private=True)
    with pytest.raises(hub.HubError, match="repo carol/secret not found") as caught:
        get(hub_server, "carol/secret")
    assert "set HF_TOKEN" in caught.value.hint
    with pytest.raises(hub.HubError, match="repo carol/secret not found") as caught:
        get(hub_server, "carol/secret", token="hf_wrong")
    assert "has no access" in caught.value.hint
    assert names(get(hub_server, "carol/secret", token=TOKEN)) == CAPACITOR_FILES
    assert all(r.authorized for r in hub_server.file_requests())


def test_registry_lists_and_resolves_cached_capacitors(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    first = hub_server.add("alice/h2z", capacitor_files(1))
    hub_server.repos["alice/h2z"].refs["v1"] = first
    hub_server.add("alice/h2z", capacitor_files(2))
    hub_server.add("dan/summer2winter", capacitor_files(3, "summer", "winter"))
    for ref in ("alice/h2z@v1", "alice/h2z", "dan/summer2winter"):
        get(hub_server, ref)
    monkeypatch.setattr(registry, "embedded", list)
    cached = {entry.name: entry for entry in registry.known()}
    assert set(cached) == {"alice/h2z", "alice/h2z@v1", "dan/summer2winter"}
    assert {entry.origin for entry in cached.values()} == {"cache"}
    assert registry.resolve("summer2winter") == cached["dan/summer2winter"].path
    entry, direction = registry.for_domain("summer")
    assert (entry.name, direction) == ("dan/summer2winter", "backward")
    with pytest.raises(registry.UnknownReference, match="several capacitors translate to 'zebra'"):
        registry.for_domain("zebra")
    with pytest.raises(registry.UnknownReference, match="no capacitor called 'nothing'") as caught:
        registry.resolve("nothing")
    assert "dan/summer2winter (summer↔winter)" in caught.value.hint


def test_to_prefers_a_trained_capacitor_and_fast_its_distilled_student(monkeypatch: pytest.MonkeyPatch) -> None:
    def entry(name: str, source: str, target: str, teacher: str | None = None) -> registry.Entry:
        config = {"domains": {"source": source, "target": target}}
        if teacher is not None:
            config["distilled"] = {"teacher": teacher}
        return registry.Entry(name, Path(name), "embedded", config)

    known = [entry("h2z", "horse", "zebra"), entry("h2z-fast", "horse", "zebra", "h2z")]
    known.append(entry("s2w-fast", "s", "w", "x"))
    monkeypatch.setattr(registry, "known", lambda: known)
    assert [(e.name, d) for e, d in [registry.for_domain("zebra"), registry.for_domain("horse", fast=True)]] == [
        ("h2z", "forward"),
        ("h2z-fast", "backward"),
    ]
    assert registry.for_domain("w")[0].name == "s2w-fast"  # only a student has that plate: --to still finds it
    known.append(entry("h2z-other", "zebra", "horse"))
    with pytest.raises(registry.UnknownReference, match="several capacitors translate to 'zebra': h2z, h2z-other"):
        registry.for_domain("zebra")
    known[:] = [entry("h2z", "horse", "zebra")]
    with pytest.raises(registry.UnknownReference, match="no distilled capacitor translates to 'zebra'") as caught:
        registry.for_domain("zebra", fast=True)
    assert caught.value.hint.startswith("make one with 'efm distill h2z")


CLI_FROM_PRETRAINED = """
import sys
from efm_cli.capacitor.model import Capacitor
capacitor = Capacitor.from_pretrained(sys.argv[1])
print(capacitor.source, capacitor.target, sum(p.numel() for p in capacitor.network.parameters()))
print(capacitor.push_to_hub("erin/copy", private=True))
"""


def test_python_api_from_pretrained_and_push_to_hub(hub_server: HubServer, tmp_path: Path, run_python) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    result = run_python(CLI_FROM_PRETRAINED, "alice/h2z", env=subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("horse zebra ")
    assert lines[1].startswith(f"{hub_server.url}/erin/copy/commit/")
    copy = hub_server.repos["erin/copy"]
    assert copy.private
    pushed = copy.commits[copy.refs["main"]]
    assert pushed["model.safetensors"] == capacitor_files()["model.safetensors"]
    assert TOKEN not in result.stdout + result.stderr


def test_cli_download_models_and_offline(hub_server: HubServer, tmp_path: Path, run_efm) -> None:
    hub_server.add("alice/h2z", capacitor_files())
    env = subprocess_env(hub_server, tmp_path)
    offline = run_efm("download", "alice/h2z", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and offline.stdout == ""
    assert offline.stderr.startswith("error: alice/h2z is not in the cache, and offline mode forbids downloading it — ")
    assert len(offline.stderr.splitlines()) == 1
    assert hub_server.log == []

    downloaded = run_efm("download", "alice/h2z", "--json", env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    report = json.loads(downloaded.stdout)
    assert report["files"] == sorted(CAPACITOR_FILES) and report["domains"] == ["horse", "zebra"]
    count = len(hub_server.log)
    plain = run_efm("download", "alice/h2z", "--offline", env=env)
    assert plain.returncode == 0 and plain.stdout == report["path"] + "\n"
    assert len(hub_server.log) == count

    table = run_efm("models", report["path"], env={**env, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if "horse ↔ zebra" in line]
    assert len(rows) == 2 and "│ alice/h2z " in rows[0] and f"│ {report['path'][:40]}" in rows[1]
    for text in ("│ 16×16 ", "│ tube ", " MB / 0.16 M params │", "│ cache "):
        assert text in rows[0]
    assert "│ path " in rows[1]


def test_cli_push_and_token_never_printed(hub_server: HubServer, tmp_path: Path, run_efm) -> None:
    run = make_run(tmp_path)
    env = subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN)
    bad = run_efm("push", str(run), "--repo", "not-a-repo", env=env)
    assert bad.returncode == 2 and "not USER/NAME" in bad.stderr
    pushed = run_efm("push", str(run), "--repo", "bob/h2z", "--private", "--revision", "dev", "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    report = json.loads(pushed.stdout)
    assert report["revision"] == "dev" and report["files"][-1] == "sample.png"
    assert hub_server.repos["bob/h2z"].private
    wrong = "hf_WrongTokenAlsoNeverPrinted"
    denied = run_efm("download", "bob/h2z@dev", env={**env, "HF_TOKEN": wrong, "EFM_DEBUG": "1"})
    assert denied.returncode == 1 and "Traceback" in denied.stderr
    assert denied.stderr.splitlines()[-1].startswith("error: repo bob/h2z not found")
    assert "your token (HF_TOKEN) has no access" in denied.stderr
    for output in (pushed, denied):
        assert TOKEN not in output.stdout + output.stderr and wrong not in output.stdout + output.stderr
    pushed_files = hub_server.repos["bob/h2z"].commits[report["commit"]]
    assert all(TOKEN.encode() not in data for data in pushed_files.values())


def test_translate_with_a_hub_capacitor_at_a_revision(hub_server: HubServer, tmp_path: Path, run_efm) -> None:
    from PIL import Image

    first = hub_server.add("alice/h2z", capacitor_files(1))
    hub_server.repos["alice/h2z"].refs["v1"] = first
    hub_server.add("alice/h2z", capacitor_files(2))
    (tmp_path / "horses").mkdir()
    pixels = torch.randint(0, 256, (20, 24, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    Image.fromarray(pixels.numpy()).save(tmp_path / "horses" / "a.png")
    out = tmp_path / "zebras"
    args = ("translate", str(tmp_path / "horses"), "--model", "alice/h2z@v1", "--out", str(out))
    result = run_efm(*args, "--solver", "euler", "--steps", "2", env=subprocess_env(hub_server, tmp_path))
    assert result.returncode == 0, result.stderr
    with Image.open(out / "a.png") as translated:
        assert translated.size == (24, 20)
    assert [r.status for r in hub_server.requests("/api/models/alice/h2z/revision/v1")] == [200, 200]
    downloaded = {r.path.split("/")[-2] for r in hub_server.requests("/model.safetensors", "GET")}
    assert downloaded == {first}


def lfs_requests(server: HubServer, repo_id: str) -> tuple[list[Request], list[Request]]:
    """The LFS batch requests, and the object uploads (PUTs), the client sent for `repo_id`."""
    objects = f"/{repo_id}.git/info/lfs/objects/"
    return server.requests(objects + "batch", "POST"), server.requests(objects, "PUT")


def test_cli_push_sends_the_weights_through_lfs_and_they_come_back_identical(
    hub_server: HubServer, tmp_path: Path, run_efm, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    from huggingface_hub import constants

    run = make_run(tmp_path)
    weights = (run / "model" / "model.safetensors").read_bytes()
    oid = hashlib.sha256(weights).hexdigest()
    env = subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN)
    pushed = run_efm("push", str(run), "--repo", "bob/h2z", "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    commit = json.loads(pushed.stdout)["commit"]
    batches, puts = lfs_requests(hub_server, "bob/h2z")
    assert [r.status for r in batches] == [200]
    # Only the weights go through LFS, and the upload URL (a storage host, on the Hub) is never sent the token.
    assert [(r.path.rsplit("/", 1)[-1], r.status, r.authorized) for r in puts] == [(oid, 200, False)]
    assert [r.status for r in hub_server.requests("/bob/h2z.git/info/lfs/objects/verify")] == [200]
    repo = hub_server.repos["bob/h2z"]
    assert repo.lfs == {oid: weights}
    assert repo.commits[commit]["model.safetensors"] == weights

    folder = get(hub_server, "bob/h2z")
    assert folder.name == commit
    assert (folder / "model.safetensors").read_bytes() == weights
    # Cached under the sha256 the server announced for the LFS file (X-Linked-Etag), not under its pointer's ETag.
    assert (folder / "model.safetensors").resolve().name == oid
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    remote, local = Capacitor.from_pretrained("bob/h2z"), Capacitor.from_pretrained(run / "model")
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    translated = remote.translate(images, solver="euler", steps=2).images
    assert not torch.equal(translated, images)
    assert torch.equal(translated, local.translate(images, solver="euler", steps=2).images)


def test_pushing_the_same_capacitor_again_uploads_and_commits_nothing(hub_server: HubServer, tmp_path: Path) -> None:
    run = make_run(tmp_path)
    first = hub.push(run, "bob/h2z", token=TOKEN, endpoint=hub_server.url)
    repo = hub_server.repos["bob/h2z"]
    commits = len(repo.commits)
    again = hub.push(run, "bob/h2z", token=TOKEN, endpoint=hub_server.url)
    assert first.changed and not again.changed
    assert again.commit == first.commit == repo.refs["main"] and len(repo.commits) == commits
    assert len(hub_server.requests("/commit/", "POST")) == 1
    # The client still asks the LFS batch endpoint about the weights, which answers "already stored": no upload.
    assert [len(r) for r in lfs_requests(hub_server, "bob/h2z")] == [2, 1]
    changed = hub.push(make_run(tmp_path, 1), "bob/h2z", token=TOKEN, endpoint=hub_server.url)
    assert changed.changed and changed.commit == repo.refs["main"] != first.commit
    assert len(lfs_requests(hub_server, "bob/h2z")[1]) == 2 and len(repo.lfs) == 2
    assert repo.commits[changed.commit]["model.safetensors"] == capacitor_files(1)["model.safetensors"]
    assert repo.commits[changed.commit]["config.json"] == capacitor_files(1)["config.json"]


def test_cli_push_of_unchanged_files_says_so_and_prints_the_existing_commit(
    hub_server: HubServer, tmp_path: Path, run_efm
) -> None:
    run = make_run(tmp_path)
    env = subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN)
    first = run_efm("push", str(run), "--repo", "bob/h2z", "--revision", "dev", "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["changed"] is True
    again = run_efm("push", str(run), "--repo", "bob/h2z", "--revision", "dev", env=env)
    assert again.returncode == 0, again.stderr
    head = hub_server.repos["bob/h2z"].refs["dev"]
    assert again.stdout.strip().endswith(f"/bob/h2z/commit/{head}") and head == json.loads(first.stdout)["commit"]
    assert "bob/h2z (dev) already holds these files: nothing to commit" in again.stderr
    assert "No files have been modified" not in again.stderr  # efm's line, not huggingface_hub's beside it


def test_a_quiet_push_whose_lfs_upload_fails_once_is_retried_in_silence(
    hub_server: HubServer, tmp_path: Path, run_efm
) -> None:
    hub_server.fail("PUT", LFS_PUT, 500)
    env = subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN)
    pushed = run_efm("push", str(make_run(tmp_path)), "--repo", "bob/h2z", "--quiet", env=env)
    assert pushed.returncode == 0 and pushed.stderr == ""
    assert [r.status for r in lfs_requests(hub_server, "bob/h2z")[1]] == [500, 200]
    repo = hub_server.repos["bob/h2z"]
    assert repo.commits[repo.refs["main"]]["model.safetensors"] == capacitor_files()["model.safetensors"]


def test_cli_push_whose_lfs_upload_is_refused_fails_in_one_line_and_commits_nothing(
    hub_server: HubServer, tmp_path: Path, run_efm
) -> None:
    run = make_run(tmp_path)
    # A refusal from storage (an expired signed URL, say): the client gives up at once. A 500 or a cut connection
    # would be retried five times with backoff, about 25 s, before ending the same way.
    hub_server.fail("PUT", LFS_PUT, 403)
    failed = run_efm("push", str(run), "--repo", "bob/h2z", env=subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN))
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith("error: ") and "bob/h2z" in failed.stderr
    assert len(failed.stderr.splitlines()) == 1 and TOKEN not in failed.stderr
    repo = hub_server.repos["bob/h2z"]
    assert hub_server.requests("/commit/") == [] and repo.lfs == {}
    assert set(repo.commits[repo.refs["main"]]) == {".gitattributes"}
    retried = hub.push(run, "bob/h2z", token=TOKEN, endpoint=hub_server.url)
    assert repo.commits[retried.commit]["model.safetensors"] == (run / "model" / "model.safetensors").read_bytes()


def test_a_refused_lfs_upload_is_explained_like_any_refusal(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.fail("PUT", LFS_PUT, 403)
    with pytest.raises(hub.HubError, match=r"^access to bob/h2z refused by http://127\.0\.0\.1:\d+ \(HTTP 403\)$"):
        hub.push(make_run(tmp_path), "bob/h2z", token=TOKEN, endpoint=hub_server.url)


@pytest.mark.parametrize("ref", ["user/..", "../name", "./name", "user/name@..", "user/name@../x", "user/...@v1"])
def test_dot_names_are_no_hub_reference_and_never_reach_the_cache(
    ref: str, hub_server: HubServer, isolated_hub: Path
) -> None:
    """The cache stores `user/name` under a folder built from its parts: a `..` part would point outside it."""
    assert hub.parse_hub_ref(ref) is None
    with pytest.raises(hub.HubError, match="is not a Hub reference"):
        get(hub_server, ref)
    assert not isolated_hub.exists() or not any(isolated_hub.rglob("*"))
    assert hub_server.requests() == []
