"""The example scripts do what examples/README.md says."""

import json
import os
import shutil
import subprocess
from pathlib import Path

from conftest import bars, make_capacitor
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
