"""Faults: a process killed at the worst moment, a full disk, a Hub download that breaks. Nothing is lost or poisoned.

Kills are SIGKILL, which no handler can soften, delivered by the process to itself at a chosen point (inside a
checkpoint write, after a rename, between steps), so each case is exact rather than a race. A full disk is simulated
with RLIMIT_FSIZE and SIGXFSZ ignored, so that a write past the limit fails with EFBIG as a full disk fails with
ENOSPC: mounting a size-limited tmpfs needs privileges a test cannot count on.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Run, capacitor_files, losses, one_error_line, shapes, tree
from hub_server import HubServer
from PIL import Image

from efm_cli.capacitor import hub
from efm_cli.cli.app import main
from efm_cli.training import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_hub")

FAST = {"OMP_NUM_THREADS": "1"}
TRANSLATE = ("--solver", "euler", "--steps", "2", "--batch-size", "1", "-q")
"""One image per batch: batched convolutions round differently from single ones, so byte-identical trees after a
resume need each image integrated on its own (with larger batches outputs may differ in the last bit of a pixel)."""

KILLER = """
import contextlib, os, signal, sys
from efm_cli import images
from efm_cli.cli import app
from efm_cli.training import checkpoint, step

point, at = sys.argv[1], int(sys.argv[2])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(owner, name, before):
    original = getattr(owner, name)

    def patched(*args, **kwargs):
        before(*args)
        result = original(*args, **kwargs)
        if point == "after-step" and args[0].step == at:
            die()
        return result

    setattr(owner, name, patched)


written = []
original_atomic = images.atomic_path


@contextlib.contextmanager
def atomic_then_die(path):
    with original_atomic(path) as temporary:
        yield temporary
        written.append(path)
        if len(written) == at:
            die()  # the temporary is complete and fsynced, the rename not done


if point == "image-write":
    images.atomic_path = atomic_then_die
elif point == "checkpoint-file":
    wrap(checkpoint, "_fsync_file", lambda path: f".step-{at:08d}-" in str(path) and die())
elif point == "checkpoint-rename":
    wrap(checkpoint, "_fsync_dir", lambda path: die())
elif point == "after-step":
    wrap(step.Trainer, "step_on", lambda *args: None)
sys.exit(app.main(sys.argv[3:]))
"""


def noise_images(folder: Path, count: int, size: tuple[int, int] = (20, 20)) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / f"part{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(sub / f"img{i:03d}.png")
    return folder


# --- translate -------------------------------------------------------------------------------------------------


def test_sigkill_mid_translate_then_skip_existing_gives_the_uninterrupted_tree(
    tmp_path: Path, model: Path, run_python: Run
) -> None:
    inputs = noise_images(tmp_path / "in", 12)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(["translate", str(inputs), "--model", str(model), "--out", str(whole), *TRANSLATE]) == 0
    args = ["translate", str(inputs), "--model", str(model), "--out", str(cut), *TRANSLATE]
    killed = run_python(KILLER, "image-write", "5", *args, env=FAST)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = tree(cut)
    finished = {name: data for name, data in left.items() if not Path(name).name.startswith(".")}
    assert 4 <= len(finished) < 12 and all(whole_data == tree(whole)[n] for n, whole_data in finished.items())
    assert any(Path(name).name.startswith(".") for name in left), "the kill was meant to leave a temporary behind"
    rerun = ["translate", str(inputs), "--model", str(model), "--out", str(cut), "--skip-existing", *TRANSLATE]
    assert main(rerun) == 0
    assert tree(cut) == tree(whole)


def _limited(limit: int) -> None:
    """In the child: writes past `limit` bytes fail with EFBIG instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_limited(args: list[str], limit: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "efm_cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **FAST},
        preexec_fn=lambda: _limited(limit),
        timeout=120,
    )


def test_disk_full_during_translate_stops_with_one_clear_error_and_no_partial_file(tmp_path: Path, model: Path) -> None:
    inputs = noise_images(tmp_path / "in", 6)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(
        inputs / "part1" / "big.png"
    )
    out = tmp_path / "out"
    args = ["translate", str(inputs), "--model", str(model), "--out", str(out), *TRANSLATE]
    full = run_limited(args, 100_000)
    line = one_error_line(full.stderr)
    assert full.returncode == 1
    assert line.startswith(f"error: cannot write {out / 'part1' / 'big.png'}: File too large — ")
    assert "--skip-existing" in line
    assert not (out / "part1" / "big.png").exists()
    assert not [p for p in out.rglob(".*")], "a temporary file was left behind"
    for written in out.rglob("*.png"):
        with Image.open(written) as image:
            image.load()  # complete, readable files only
    assert main(["translate", str(inputs), "--model", str(model), "--out", str(out), "--skip-existing", "-q"]) == 0
    assert len(list(out.rglob("*.png"))) == 7


# --- train -----------------------------------------------------------------------------------------------------

TRAIN = ["--size", "16", "--network", "tiny", "--charges", "4", "--batch-size", "2", "--warmup", "1"]
TRAIN += ["--log-every", "1", "--checkpoint-every", "2", "--sample-every", "100", "--steps", "8", "-q"]


def assert_resumable(run: Path, step: int) -> None:
    """`--resume` would start from a complete checkpoint of `step`; every checkpoint folder is complete."""
    found = checkpoint.latest(run / "checkpoints")
    assert found is not None and found.name == f"step-{step:08d}"
    tensors, meta = checkpoint.load(found)
    assert meta["step"] == step and tensors
    for folder in (run / "checkpoints").glob("step-*"):
        assert {p.name for p in folder.iterdir()} == {p.name for p in found.iterdir()}, folder


def test_sigkill_during_and_between_checkpoint_writes_always_leaves_a_checkpoint_to_resume(
    tmp_path: Path, run_python: Run
) -> None:
    source, target = shapes(tmp_path / "squares", "square", 6, 0), shapes(tmp_path / "discs", "disc", 6, 1)
    data = ["--source", str(source), "--target", str(target)]
    whole, run = tmp_path / "whole", tmp_path / "run"
    assert main(["train", *data, *TRAIN, "--out", str(whole)]) == 0
    chain = [
        (("checkpoint-file", "4"), [*data, *TRAIN, "--out", str(run)], 2),  # inside the write of step 4
        (("after-step", "5"), ["--resume", str(run), "-q"], 4),  # between two checkpoints
        (("checkpoint-rename", "0"), ["--resume", str(run), "-q"], 4),  # step 6 renamed, `latest` not yet
    ]
    for (point, at), args, step in chain:
        killed = run_python(KILLER, point, at, "train", *args, env=FAST)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert_resumable(run, step)
    done = run_python(KILLER, "none", "0", "train", "--resume", str(run), "-q", env=FAST)
    assert done.returncode == 0, done.stderr
    assert_resumable(run, 8)
    assert losses(run) == losses(whole)
    assert not list((run / "checkpoints").glob(".step-*"))


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    source, target = shapes(tmp_path / "squares", "square", 6, 0), shapes(tmp_path / "discs", "disc", 6, 1)
    run = tmp_path / "run"
    steps = [a if a != "8" else "2" for a in TRAIN]
    assert main(["train", "--source", str(source), "--target", str(target), *steps, "--out", str(run)]) == 0
    before = tree(run / "checkpoints")
    full = run_limited(["train", "--resume", str(run), "--steps", "4", "-q"], 50_000)
    line = one_error_line(full.stderr)
    assert full.returncode == 1
    assert line.startswith(f"error: cannot save step 4 in {run} (") and f"efm train --resume {run}" in line
    assert tree(run / "checkpoints") == before
    assert_resumable(run, 2)


# --- Hub -------------------------------------------------------------------------------------------------------


def test_a_download_cut_off_mid_file_is_resumed_or_refused_and_never_cached_broken(hub_server: HubServer) -> None:
    good = capacitor_files()
    hub_server.add("alice/h2z", good)
    hub_server.cut(r"/model\.safetensors$")
    folder = hub.download("alice/h2z", endpoint=hub_server.url)  # one cut: the client resumes where it stopped
    assert (folder / "model.safetensors").read_bytes() == good["model.safetensors"]
    hub_server.add("alice/cut", good)
    hub_server.cut(r"alice/cut/.*model\.safetensors$", times=100)
    with pytest.raises(hub.HubError) as caught:
        hub.download("alice/cut", endpoint=hub_server.url)
    assert "alice/cut" in str(caught.value) and caught.value.hint
    hub_server.faults.clear()
    folder = hub.download("alice/cut", endpoint=hub_server.url)
    assert (folder / "model.safetensors").read_bytes() == good["model.safetensors"]


def _mismatched_weights(data: bytes) -> bytes:
    """The same header (every offset and the file length add up) but one tensor claims twice its elements."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(
        k for k, v in header.items() if k != "__metadata__" and len(str(2 * v["shape"][0])) == len(str(v["shape"][0]))
    )
    header[name]["shape"][0] *= 2
    encoded = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(encoded) == length
    return data[:8] + encoded + data[8 + length :]


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"config.json": b"{ not json"}, "is not an efm capacitor"),
        ({"config.json": "network-transformer"}, "is not an efm capacitor: config.json: 'network' must be a UNet"),
        ({"model.safetensors": "mismatch"}, "is not a usable capacitor: model.safetensors is not a valid safetensors"),
    ],
    ids=["config-not-json", "unknown-architecture", "bytes-do-not-match-header"],
)
def test_a_broken_repo_is_refused_and_the_fixed_one_downloads(
    hub_server: HubServer, broken: dict[str, bytes | str], message: str
) -> None:
    good = capacitor_files()
    files = dict(good)
    for name, change in broken.items():
        if change == "network-transformer":
            config = json.loads(good["config.json"])
            config["network"]["kind"] = "transformer"
            files[name] = json.dumps(config).encode()
        elif change == "mismatch":
            files[name] = _mismatched_weights(good[name])
        else:
            files[name] = change
    sha = hub_server.add("alice/h2z", files)
    with pytest.raises(hub.HubError) as caught:
        hub.download("alice/h2z", endpoint=hub_server.url)
    assert str(caught.value).startswith(f"alice/h2z {message}"), caught.value
    assert caught.value.hint
    hub_server.repos["alice/h2z"].commits[sha].update(good)  # the author fixes the repo
    folder = hub.download("alice/h2z", endpoint=hub_server.url)
    assert {name: (folder / name).read_bytes() for name in good} == good
