"""benchmarks/gpu.py, the prepared GPU run, works end to end in its tiny CPU mode: CI has no GPU, so this is where a
broken phase would show before a GPU machine's time is spent on it. benchmarks/bench_distill.py compares what it says
it compares; benchmarks/bench_precision.py times every precision and says what this CPU has."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from conftest import TINY, climbing_capacitor, shapes

from efm_cli import images
from efm_cli.capacitor.format import new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.network import preset

ROOT = Path(__file__).resolve().parents[1]


def numbers(value: Any) -> Iterator[float]:
    """Every number in a JSON value, however deep (booleans are not numbers here)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from numbers(item)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield float(value)


def test_gpu_script_runs_every_phase_in_tiny_mode(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    script = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--out", "tmp"]
    done = subprocess.run(script, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=480)
    assert done.returncode == 0, done.stderr[-4000:]
    out = tmp_path / "tmp"
    summary = json.loads(done.stdout)
    assert summary == json.loads((out / "results.json").read_text())
    assert summary["mode"] == "tiny" and summary["device"] == "cpu"
    for section in ("translate", "train_speed", "capacitor"):
        found = list(numbers(summary[section]))
        assert found and all(math.isfinite(number) for number in found), section
    assert "out of time" not in done.stdout and "error" not in summary["capacitor"]

    for name in ("horse2zebra", "digits-2to3"):
        for precision in ("fp32", "bf16"):
            measured = summary["translate"][name][precision]
            assert set(measured) == {"tensors", "files_16", "files_40"}
            assert all(m["images_per_s"] > 0 and m["nfe_mean"] == 2 for m in measured.values())
    speed = summary["train_speed"]
    assert speed["base-16-fp32"]["parameters"] > 10 * speed["small-16-fp32"]["parameters"]
    assert speed["base-16-fp32"]["steps_per_s"] > 0 and speed["small-16-fp32"]["steps_per_s"] > 0

    capacitor = summary["capacitor"]
    assert capacitor["training"]["step"] == capacitor["recipe"]["steps"] == 4
    evaluated = capacitor["eval"]
    assert 0 <= evaluated["target_rate"] <= 1 and math.isfinite(evaluated["fd"]) and evaluated["nfe_mean"] > 0
    assert json.loads((out / "eval.json").read_text())["target_rate"] == evaluated["target_rate"]
    assert (out / "testA-grid.jpg").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    assert set(summary["files"]) == {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert len(summary["files"]) <= 8  # a few files, two levels deep: easy to fetch back from a remote GPU machine

    loaded = Capacitor.from_pretrained(out / "capacitor")
    assert (loaded.source, loaded.target) == ("horse", "zebra") and loaded.config["image"]["size"] == 16


def test_distill_benchmark_compares_each_capacitor_with_its_own_sampler_on_the_same_images(tmp_path: Path) -> None:
    folder = shapes(tmp_path / "squares", "square", 6, seed=0)
    capacitors = {}
    for name, sampler in (
        ("teacher", {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}),
        ("student", {"solver": "euler", "steps": 1}),
    ):
        config = new_config(
            source="square",
            target="disc",
            network=preset("tiny", size=TINY, L=6.0).to_dict(),
            field={"kind": "tube", "L": 6.0, "S": 1.0},
            size=TINY,
            sampler=sampler,
        )
        capacitors[name] = capacitor = climbing_capacitor(config, seed=1, everything=True)
        with torch.no_grad():  # lines that bend, as in test_distill: one Euler step lands elsewhere
            capacitor.network.conv_out.bias[-1] = 20.0 / capacitor.network.z_scale
            capacitor.network.conv_out.weight[:-1] *= 10.0
            capacitor.network.conv_out.bias[:-1] *= 10.0
        capacitors[name].save_pretrained(tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(ROOT / "benchmarks" / "bench_distill.py"), "--teacher", str(tmp_path / "teacher")]
    script += ["--student", str(tmp_path / "student"), "--images", str(folder), "--batch-size", "4", "--repeat", "1"]
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)

    inputs = torch.stack([images.to_tensor(images.load(path).rgb, TINY) for path in images.find_images(folder)])
    with torch.inference_mode():
        teacher = capacitors["teacher"].translate(inputs)
        student = capacitors["student"].translate(inputs)
    levels = ((student.images.double() - teacher.images.double()) * 127.5).square().flatten(1).mean(1).sqrt()
    assert result["images"] == 6 and result["nfe_student"] == 1
    assert result["nfe_teacher"] == teacher.solution.nfe.double().mean().item() > 1
    assert math.isclose(result["endpoint_rms_mean"], levels.mean().item(), rel_tol=1e-4, abs_tol=1e-4)
    assert levels.mean().item() > 0.02  # the two samplers land apart: the number measures something
    assert result["speedup"] > 0 and result["student_sampler"] == {"solver": "euler", "steps": 1}


def test_precision_benchmark_times_each_precision_against_fp32_and_names_the_cpus_instructions() -> None:
    from efm_cli import devices

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(ROOT / "benchmarks" / "bench_precision.py"), "--model", "digits-2to3"]
    script += ["--batch-size", "1", "--repeat", "1"]
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert (result["model"], result["batch_size"], result["size"], result["threads"]) == ("digits-2to3", 1, 32, 1)
    assert result["seconds_fp32"] > 0 and result["slowdown_bf16"] > 0 and result["slowdown_fp16"] > 0
    assert (result["native_bf16"], result["native_fp16"]) == (devices.cpu_native("bf16"), devices.cpu_native("fp16"))
    assert result["command"].endswith("--model digits-2to3 --batch-size 1 --repeat 1")
