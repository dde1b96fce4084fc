"""Untrusted capacitors: nothing pickled is ever deserialised, configs are bounded before allocation, file names and
links cannot reach outside their folder, and tokens never show up anywhere.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import time
from pathlib import Path

import pytest
from conftest import Run, capacitor_files, subprocess_env
from hub_server import TOKEN, HubServer

from efm_cli.capacitor import hub, registry
from efm_cli.capacitor.format import CapacitorError
from efm_cli.capacitor.model import Capacitor

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_hub")


class _Marker:
    """Unpickling this creates a file: proof that something was deserialised."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (os.mkdir, (str(self.path),))


def pickles(folder: Path, marker: Path) -> dict[str, bytes]:
    payload = pickle.dumps(_Marker(marker))
    return {name: payload for name in ("pytorch_model.bin", "model.pt", "weights.pkl")}


def write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_pickle_files_are_never_loaded_locally_or_from_the_hub(
    tmp_path: Path, hub_server: HubServer, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "unpickled"
    good = capacitor_files()
    only_pickles = write(tmp_path / "only", {"config.json": good["config.json"], **pickles(tmp_path, marker)})
    with pytest.raises(CapacitorError, match=r"has no model\.safetensors"):
        Capacitor.from_pretrained(only_pickles)
    disguised = write(tmp_path / "disguised", {**good, "model.safetensors": pickle.dumps(_Marker(marker))})
    with pytest.raises(CapacitorError, match=r"model\.safetensors is not a valid safetensors file"):
        Capacitor.from_pretrained(disguised)
    beside = write(tmp_path / "beside", {**good, **pickles(tmp_path, marker)})
    assert Capacitor.from_pretrained(beside).target == "zebra"  # the safetensors weights, the pickles ignored
    hub_server.add("eve/pickled", {"config.json": good["config.json"], **pickles(tmp_path, marker)})
    with pytest.raises(hub.HubError, match="offers only pickle weights"):
        hub.download("eve/pickled", endpoint=hub_server.url)
    hub_server.add("eve/mixed", {**good, **pickles(tmp_path, marker)})
    folder = hub.download("eve/mixed", endpoint=hub_server.url)
    assert {p.name for p in folder.iterdir()} == set(good)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["network"].update(base=1024, mult=[16] * 8, blocks=8, size=256) or c["image"].update(size=256),
            "the network would have",
        ),
        (lambda c: c["image"].update(size=1_000_000) or c["network"].update(size=1_000_000), "'image' needs a size"),
        (lambda c: c["sampler"].update(steps="many"), "'sampler' may only set"),
        (lambda c: c["network"].update(kind="transformer"), "'network' must be a UNet"),
    ],
    ids=["1e12-parameters", "image-size-1e6", "sampler-type", "unknown-architecture"],
)
def test_oversized_or_malformed_configs_are_refused_before_allocation(tmp_path: Path, change, message: str) -> None:
    config = json.loads(capacitor_files()["config.json"])
    change(config)
    folder = write(tmp_path / "cap", {**capacitor_files(), "config.json": json.dumps(config).encode()})
    start, peak = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CapacitorError, match=message):
        Capacitor.from_pretrained(folder)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # KiB: nothing big was allocated


def test_links_in_a_capacitor_folder_cannot_read_or_publish_other_files(
    tmp_path: Path, hub_server: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write(tmp_path / "cap", capacitor_files())
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")  # reading it would never end
    start = time.perf_counter()
    with pytest.raises(CapacitorError, match="not a regular file"):
        Capacitor.from_pretrained(folder)
    with pytest.raises(CapacitorError, match="not a regular file"):
        hub.check_folder(folder)
    monkeypatch.setenv("EFM_WEIGHTS_DIR", str(tmp_path))
    assert registry.embedded() == []  # listing models skips it instead of hanging
    assert time.perf_counter() - start < 5
    secret = tmp_path / "secret.txt"
    secret.write_text("hf_SecretFromElsewhere\n")
    run = write(tmp_path / "run" / "model", capacitor_files()).parent
    (run / "model" / "README.md").symlink_to(secret)
    (run / "sample.png").symlink_to(secret)
    result = hub.push(run, "bob/h2z", token=TOKEN, endpoint=hub_server.url)
    pushed = hub_server.repos["bob/h2z"].commits[result.commit]
    assert "sample.png" not in pushed and pushed["README.md"].startswith(b"---\nlibrary_name: efm-cli")
    assert all(b"SecretFromElsewhere" not in data for data in pushed.values())


def test_hub_file_names_cannot_escape_the_cache(tmp_path: Path, hub_server: HubServer) -> None:
    escape = {"../../../escaped.json": b"{}", "/tmp/absolute.json": b"{}", "a/../../up.json": b"{}"}
    hub_server.add("eve/escape", {**capacitor_files(), **escape})
    folder = hub.download("eve/escape", endpoint=hub_server.url)
    assert {p.name for p in folder.iterdir()} == set(capacitor_files())
    cache = tmp_path / "hf"
    written = {p.name for p in tmp_path.rglob("*.json") if not p.is_relative_to(cache)}
    assert written == set() and not Path("/tmp/absolute.json").exists()


def test_tokens_never_appear_in_output_errors_or_cards(tmp_path: Path, hub_server: HubServer, run_efm: Run) -> None:
    run = write(tmp_path / "run" / "model", capacitor_files()).parent
    env = subprocess_env(hub_server, tmp_path, HF_TOKEN=TOKEN)
    outputs = [
        run_efm("push", str(run), "--repo", "bob/h2z", "--json", env=env),
        run_efm("download", "bob/missing", env=env),
        run_efm(
            "download", "bob/h2z", "--json", env={**env, "HF_ENDPOINT": hub_server.url.replace("//", f"//u:{TOKEN}@")}
        ),
        run_efm("env", "--json", env=env),
    ]
    assert [result.returncode for result in outputs] == [0, 1, 0, 0], [r.stderr for r in outputs]
    assert outputs[1].stderr.startswith("error: repo bob/missing not found")
    for result in outputs:
        assert TOKEN not in result.stdout + result.stderr
    card = hub_server.repos["bob/h2z"].commits[json.loads(outputs[0].stdout)["commit"]]["README.md"]
    assert TOKEN.encode() not in card
    logs = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".txt", ".log")]
    assert all(TOKEN.encode() not in p.read_bytes() for p in logs if "token" not in p.name)
