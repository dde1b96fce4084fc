"""The capacitors embedded in weights/: complete, small, documented, and the README's quick start works with them."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Run
from PIL import Image
from safetensors.torch import load_file

from efm_cli.capacitor.model import Capacitor

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = sorted(p for p in (ROOT / "weights").iterdir() if p.is_dir())
NAMES = [p.name for p in EMBEDDED]


def test_the_quick_start_capacitors_are_embedded() -> None:
    domains = {tuple(json.loads((p / "config.json").read_text())["domains"].values()) for p in EMBEDDED}
    assert {("horse", "zebra"), ("two", "three")} <= domains


@pytest.mark.parametrize("folder", EMBEDDED, ids=NAMES)
def test_embedded_capacitor_is_fp16_small_and_has_card_picture_and_metrics(folder: Path) -> None:
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "sample.png"]
    assert (folder / "model.safetensors").stat().st_size < 25 * 2**20
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float16}
    capacitor = Capacitor.from_pretrained(folder)  # every weight's name and shape checked
    metrics = capacitor.config["training"]["metrics"]
    assert {"target_rate", "fd", "fd_noise_floor", "structure_ssim", "classifier_accuracy"} <= metrics.keys()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: efm-cli\n")
    assert f"efm translate ./{capacitor.source}-images --to {capacitor.target}" in card
    with Image.open(folder / "sample.png") as picture:
        picture.verify()


def test_quick_start_translates_the_example_horses_with_the_embedded_capacitor(run_efm: Run, tmp_path: Path) -> None:
    out = tmp_path / "zebras"
    env = {"EFM_WEIGHTS_DIR": str(ROOT / "weights"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = run_efm("translate", str(ROOT / "examples" / "horses"), "--to", "zebra", "--out", str(out), env=env)
    assert done.returncode == 0, done.stderr
    inputs = sorted(p.name for p in (ROOT / "examples" / "horses").iterdir())
    assert sorted(p.name for p in out.iterdir()) == inputs
    for name in inputs:
        with Image.open(ROOT / "examples" / "horses" / name) as before, Image.open(out / name) as after:
            assert after.size == before.size
            change = np.asarray(after.convert("RGB"), dtype=np.float32) - np.asarray(before.convert("RGB"))
            assert np.abs(change).mean() > 2.0  # levels of 255: the photo changed beyond JPEG re-encoding


def test_each_embedded_student_answers_fast_and_its_teacher_plain_to(run_efm: Run, tmp_path: Path) -> None:
    env = {"EFM_WEIGHTS_DIR": str(ROOT / "weights"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    students = [p for p in EMBEDDED if "distilled" in json.loads((p / "config.json").read_text())]
    assert {p.name for p in students} >= {"horse2zebra-fast", "digits-2to3-fast"}
    for student in students:
        config = json.loads((student / "config.json").read_text())
        teacher, target = config["distilled"]["teacher"], config["domains"]["target"]
        assert (ROOT / "weights" / teacher).is_dir()
        for extra, picked in (((), teacher), (("--fast",), student.name)):
            out = tmp_path / f"{student.name}-{len(extra)}"
            args = ("translate", str(ROOT / "examples" / "horses"), "--to", target, *extra, "-o", str(out), "--json")
            done = run_efm(*args, env=env)
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["model"] == picked
