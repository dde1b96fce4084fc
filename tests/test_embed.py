"""examples/embed.py: a trained capacitor becomes an embedded one that `--to` and short names find, in fp16."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_capacitor
from PIL import Image
from safetensors.torch import load_file

from efm_cli.capacitor import registry
from efm_cli.capacitor.model import Capacitor

ROOT = Path(__file__).resolve().parents[1]

REPORT = {
    "target_rate": 0.93,
    "robust_target_rate": 0.9,
    "classifier": {"accuracy": 0.99},
    "fd": {"translated": 3.5, "translated_se": 0.125, "no_op": 100.0, "noise_floor": 0.25},
    "structure_ssim": 0.7,
    "hue_difference_deg": 3.25,
    "mean_abs_change": 12.0,
    "speed": {"nfe_mean": 44.0},
}


def embed(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    model = make_capacitor().save_pretrained(tmp_path / "run" / "model")
    Image.new("RGB", (40, 20), "red").save(model / "sample.png")
    (tmp_path / "eval.json").write_text(json.dumps(REPORT))
    command = [sys.executable, str(ROOT / "examples" / "embed.py"), str(model), "h2z", "--weights", str(tmp_path / "w")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *extra], capture_output=True, text=True, env=env, timeout=120)


def test_embedded_capacitor_is_fp16_with_metrics_card_and_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = embed(tmp_path, "--eval", str(tmp_path / "eval.json"), "--dataset", "horse2zebra")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "w" / "h2z"
    assert json.loads(done.stdout)["folder"] == str(folder)
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "sample.png"]
    assert sorted(os.listdir(tmp_path / "w")) == ["h2z"]  # no staging folder left behind
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float16}
    full = (tmp_path / "run" / "model" / "model.safetensors").stat().st_size
    assert (folder / "model.safetensors").stat().st_size < 0.55 * full
    training = json.loads((folder / "config.json").read_text())["training"]
    assert training["metrics"]["target_rate"] == 0.93 and training["metrics"]["fd_noise_floor"] == 0.25
    assert training["metrics"]["fd_se"] == 0.125 and "target_rate_se" not in training["metrics"]  # not in this report
    assert training["datasets"] == ["horse2zebra"]
    card = (folder / "README.md").read_text()
    assert "efm translate ./horse-images --to zebra" in card and "efm download" not in card
    assert "| hue_difference_deg | 3.25 |" in card and "![Sample grid" in card
    with Image.open(folder / "sample.png") as picture:
        assert picture.size == (40, 20)

    monkeypatch.setenv("EFM_WEIGHTS_DIR", str(tmp_path / "w"))
    monkeypatch.setattr(registry, "known", registry.embedded)  # the HF cache of this machine stays out of it
    original, embedded = Capacitor.from_pretrained(tmp_path / "run" / "model"), Capacitor.from_pretrained("h2z")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5
    tight = {"rtol": 1e-6, "atol": 1e-6}  # integration error far below what fp16 storage changes
    ours, theirs = (c.translate(x, to="zebra", **tight).images for c in (original, embedded))
    assert (ours - x).abs().max() > 0.05  # the capacitor moves the images ...
    torch.testing.assert_close(theirs, ours, atol=5e-3, rtol=0)  # ... and fp16 storage barely changes where to


def test_fp32_keeps_the_bytes_and_a_rerun_replaces_the_folder(tmp_path: Path) -> None:
    assert embed(tmp_path).returncode == 0
    (tmp_path / "w" / "h2z" / "stale.txt").write_text("old")
    done = embed(tmp_path, "--fp32")
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "w" / "h2z"
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors", "sample.png"]
    original = (tmp_path / "run" / "model" / "model.safetensors").read_bytes()
    assert (folder / "model.safetensors").read_bytes() == original
    assert "metrics" not in json.loads((folder / "config.json").read_text())["training"]


def test_a_distilled_capacitors_card_names_its_teacher_its_steps_and_fast() -> None:
    from efm_cli.capacitor import card

    errors = {"1": {"student": 4.1, "teacher": 30.4}, "4": {"student": 3.0, "teacher": 9.7}}
    record = {"teacher": "h2z", "pairs": 2161, "held_out": 240, "steps": 3000, "nfe": 4, "errors": errors}
    config = {**make_capacitor().config, "sampler": {"solver": "euler", "steps": 4}, "distilled": record}
    text = card.render(config, "h2z-fast", embedded=True)
    assert "translation takes 4 network passes" in text
    assert "| teacher | h2z |" in text and "| Euler steps (network passes per image) | 4 |" in text
    assert "at 4 step(s): student / teacher's field | 3.0 / 9.7 |" in text
    assert "efm translate ./horse-images --to zebra --fast" in text
    assert "## Distilled" not in card.render(make_capacitor().config, "h2z", embedded=True)
