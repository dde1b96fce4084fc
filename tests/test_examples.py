"""The example scripts do what examples/README.md says."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from conftest import bars, make_capacitor, one_error_line
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_shard_script_translates_every_file_once_and_a_rerun_keeps_them(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    make_capacitor().save_pretrained(weights / "horse2zebra")
    photos = tmp_path / "photos"
    for i, example in enumerate(sorted((ROOT / "examples" / "horses").iterdir())):
        target = photos / f"set{i % 2}" / example.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(example, target)
    out = tmp_path / "out"
    env = {**os.environ, "EFM_WEIGHTS_DIR": str(weights), "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "examples" / "translate_shards.sh"), str(photos), str(out), "zebra", "2"]
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    inputs = sorted(p.relative_to(photos) for p in photos.rglob("*.jpg"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == inputs
    for relative in inputs:
        with Image.open(out / relative) as image:
            assert image.size == (256, 256)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob(".shard-*-of-2.json"))]
    written = [r["output"] for report in reports for r in report["inputs"]]
    assert sorted(written) == sorted(str(out / p) for p in inputs)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    again = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == mtimes


def test_horse2zebra_script_trains_resumes_evaluates_and_draws_the_grid(tmp_path: Path) -> None:
    data = tmp_path / "h2z"
    for split, count in (("train", 24), ("test", 14)):
        bars(data / f"{split}A", True, count, 10 + count)
        bars(data / f"{split}B", False, count, 20 + count)
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    run = tmp_path / "run"
    script = [str(ROOT / "examples" / "horse2zebra.sh"), str(data), str(run), "5"]
    settings = {"SIZE": "16", "BATCH": "4", "CHARGES": "8", "NETWORK": "tiny", "DEVICE": "cpu"}
    env = {**os.environ, **settings, "OMP_NUM_THREADS": "1", "EFM_CACHE": str(tmp_path / "cache")}

    first = subprocess.run(script, capture_output=True, text=True, env={**env, "STEPS": "2"}, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "robust target rate" in first.stdout and "FD noise floor" in first.stdout  # efm eval's table
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["training"]["steps"] == 2 and config["image"]["size"] == 16
    assert config["domains"] == {"source": "horse", "target": "zebra"}
    report = json.loads((run / "eval.json").read_text())
    assert report["data"]["images"]["source"] == 14 and report["hue_images"] == 14
    with Image.open(run / "testA-grid.jpg") as grid:
        assert grid.width > grid.height > 0  # twelve photos and their translations, side by side

    again = subprocess.run(script, capture_output=True, text=True, env={**env, "STEPS": "4"}, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / "model" / "config.json").read_text())["training"]["steps"] == 4
    assert "loaded from" in again.stderr  # the classifier trained by the first call is reused
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in run.iterdir() if p.suffix in (".json", ".jpg", ".part")) == [
        "config.json",
        "eval.json",
        "testA-grid.jpg",
    ]

    wrong = subprocess.run([script[0], str(tmp_path / "nowhere"), str(tmp_path / "r2")], capture_output=True, text=True)
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1 and "trainA/, trainB/" in wrong.stderr
    assert not (tmp_path / "r2").exists()


# examples/digits.py: MNIST offline from --mnist, or downloaded once into a cache (the network is never touched here)


def digits_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_mnist() -> dict[str, np.ndarray]:
    """A few random 28×28 digits per split, labels 0–4, as mnist.npz holds them."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in (("train", 10), ("test", 6)):
        arrays[f"x_{split}"] = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        arrays[f"y_{split}"] = (np.arange(count) % 5).astype(np.uint8)
    return arrays


def write_idx(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """The arrays as the uncompressed IDX files torchvision keeps in ROOT/MNIST/raw (what its download leaves)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "test": "t10k"}
    for split, prefix in names.items():
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        header = struct.pack(">iiii", 0x803, *images.shape)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x801, len(labels)) + labels.tobytes())


def built(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.png"))}


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    """The digits script with no shared mnist.npz and torchvision's download failing as it does without a network."""
    from torchvision.datasets import MNIST

    def no_network(self: MNIST) -> None:
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://ossci-datasets.s3.amazonaws.com/mnist/"
        )

    monkeypatch.setattr(MNIST, "download", no_network)
    digits = digits_script()
    monkeypatch.setattr(digits, "DEFAULT_MNIST", tmp_path / "no-shared" / "mnist.npz")
    monkeypatch.setenv("EFM_CACHE", str(tmp_path / "efm-cache"))
    return digits


def test_digits_build_offline_from_an_npz_or_a_torchvision_folder(offline: ModuleType, tmp_path: Path) -> None:
    arrays = fake_mnist()
    np.savez(tmp_path / "mnist.npz", **arrays)
    write_idx(tmp_path / "tv" / "MNIST" / "raw", arrays)
    assert offline.main([str(tmp_path / "from-npz"), "--mnist", str(tmp_path / "mnist.npz")]) == 0
    assert offline.main([str(tmp_path / "from-tv"), "--mnist", str(tmp_path / "tv")]) == 0
    npz = built(tmp_path / "from-npz")
    assert sorted({name.rsplit("/", 1)[0] for name in npz}) == ["test/three", "test/two", "train/three", "train/two"]
    assert len(npz) == 2 + 2 + 1 + 1  # labels 0–4 repeat: train has two 2s and two 3s, test one of each
    assert built(tmp_path / "from-tv") == npz  # the same digits give the same files, whatever the source


def test_thin_bold_splits_the_digits_and_thickens_the_second_half(offline: ModuleType, tmp_path: Path) -> None:
    arrays = fake_mnist()
    arrays["x_train"][:] = 0
    arrays["x_train"][:, 10:18, 13] = 255  # a one-pixel vertical stroke in every digit
    np.savez(tmp_path / "mnist.npz", **arrays)
    assert offline.main([str(tmp_path / "out"), "--mnist", str(tmp_path / "mnist.npz"), "--pair", "thin-bold"]) == 0
    files = built(tmp_path / "out")
    assert sorted({name.rsplit("/", 1)[0] for name in files}) == ["test/bold", "test/thin", "train/bold", "train/thin"]
    assert len(files) == 10 + 6  # every digit once: the first half thin, the second bold

    def lit(domain: str) -> float:
        images = [np.asarray(Image.open(p)) for p in sorted((tmp_path / "out" / "train" / domain).glob("*.png"))]
        return float(np.mean([(image.max(axis=2) > 64).sum() for image in images]))

    assert lit("bold") > 2 * lit("thin")  # a 3×3 dilation makes the stroke three pixels wide, and one longer each end


def test_digits_download_into_the_cache_when_no_mnist_is_given(
    offline: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision.datasets import MNIST

    arrays = fake_mnist()
    downloads: list[str] = []

    def download(self: MNIST) -> None:  # what a successful download leaves behind
        downloads.append(self.raw_folder)
        write_idx(Path(self.raw_folder), arrays)

    monkeypatch.setattr(MNIST, "download", download)
    assert offline.main([str(tmp_path / "one"), "--cache", str(tmp_path / "cache")]) == 0
    assert downloads == [str(tmp_path / "cache" / "MNIST" / "raw")]  # once: the test split found it there
    assert offline.main([str(tmp_path / "two")]) == 0  # default cache: $EFM_CACHE/mnist
    assert downloads[1:] == [str(tmp_path / "efm-cache" / "mnist" / "MNIST" / "raw")]
    np.savez(tmp_path / "mnist.npz", **arrays)
    offline.main([str(tmp_path / "three"), "--mnist", str(tmp_path / "mnist.npz")])
    assert built(tmp_path / "one") == built(tmp_path / "two") == built(tmp_path / "three")


def test_digits_without_mnist_and_without_network_fail_with_one_line(
    offline: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert offline.main([str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err)
    cache = tmp_path / "efm-cache" / "mnist"
    assert line == (
        f"error: MNIST is not in {cache} and cannot be downloaded (Error downloading train-images-idx3-ubyte.gz) — "
        "pass --mnist PATH to a copy of mnist.npz, or connect to the internet once"
    )
    assert offline.main([str(tmp_path / "out"), "--mnist", str(tmp_path / "missing.npz")]) == 1
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {tmp_path / 'missing.npz'} not found — ")
    assert offline.main([str(tmp_path / "out"), "--mnist", str(tmp_path)]) == 1  # a folder without MNIST/raw
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {tmp_path} holds no MNIST/raw files — ")
    assert not (tmp_path / "out").exists()
