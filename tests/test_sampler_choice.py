"""Choosing a capacitor's default sampler by measurement: the error measure, the choice, `efm sampler --write`, its
refusals, and the choice `efm train` records at its last export (efm_cli.capacitor.sampler)."""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, Run, make_capacitor, one_error_line, shapes
from PIL import Image

from efm_cli.capacitor import sampler
from efm_cli.capacitor.format import CONFIG_NAME, CapacitorError
from efm_cli.capacitor.model import Capacitor
from efm_cli.capacitor.sampler import Point, Setting
from efm_cli.errors import UsageError
from efm_cli.integrator import integrate

ROOT = Path(__file__).resolve().parents[1]
FEW = (Setting.dopri5(1e-2), Setting.fixed("heun", 2), Setting.fixed("euler", 1), Setting.fixed("euler", 4))
EULER = tuple(Setting.fixed("euler", steps) for steps in (1, 2, 4, 8))
LOOSE = 1e-4
"""A looser reference than the default 1e-6 keeps these tests fast; what they check does not depend on it."""


def images(count: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 3, TINY, TINY, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def image_folder(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(images(count)):
        pixels = ((picture.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def test_endpoint_error_is_the_rms_difference_in_8_bit_levels_as_numpy_computes_it() -> None:
    a = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2.4 - 1.2  # some outside [-1, 1]
    b = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 2.4 - 1.2
    clip = lambda t: np.clip(t.numpy().astype(np.float64), -1.0, 1.0)  # noqa: E731
    expected = np.sqrt((((clip(a) - clip(b)) * 255.0 / 2.0) ** 2).reshape(5, -1).mean(1))
    np.testing.assert_allclose(sampler.endpoint_error(a, b).numpy(), expected, rtol=1e-12)
    shifted = torch.zeros(2, 3, 4, 4) + 2 / 255
    assert sampler.endpoint_error(shifted, torch.zeros_like(shifted)).tolist() == pytest.approx([1.0, 1.0])

    errors = torch.tensor([0.1, 5.0, 0.3, 0.2, 100.0])
    landed = torch.tensor([True, True, True, True, False])
    mean, p95, worst = sampler.summarise(errors, landed)
    kept = np.array([0.1, 5.0, 0.3, 0.2])
    assert (mean, p95, worst) == pytest.approx((kept.mean(), np.percentile(kept, 95), 5.0))


def point(setting: Setting, nfe: float, p95: float, failed: int = 0) -> Point:
    return Point(setting, nfe, int(nfe), p95 / 2, p95, p95 * 1.1, failed, 0.1)


def test_the_choice_is_the_cheapest_candidate_within_the_bound() -> None:
    curve = [
        point(Setting.fixed("euler", 8), 8, 3.0),
        point(Setting.dopri5(1e-3), 12.5, 0.5, failed=1),  # cheap and close, but a line did not land
        point(Setting.fixed("euler", 16), 16, 0.9),
        point(Setting.fixed("heun", 8), 16, 0.6),  # as cheap as euler 16 and closer: the tie goes to it
        point(Setting.dopri5(1e-4), 30.2, 0.1),
        point(Setting.fixed("euler", 64), 64, 0.2),
    ]
    assert sampler.pick(curve, 1.0).setting == Setting.fixed("heun", 8)
    assert sampler.pick(curve, 0.7).setting == Setting.fixed("heun", 8)
    assert sampler.pick(curve, 0.5).setting == Setting.dopri5(1e-4)
    assert sampler.pick(curve, 5.0).setting == Setting.fixed("euler", 8)
    assert sampler.pick(curve, 0.05) is None
    assert sampler.pick([], 1.0) is None


def test_settings_are_what_the_integrator_and_a_config_take() -> None:
    assert Setting.dopri5(1e-3).sampler() == {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}
    assert Setting.fixed("euler", 16).sampler() == {"solver": "euler", "steps": 16}
    assert (Setting.fixed("euler", 16).nfe, Setting.fixed("heun", 16).nfe, Setting.dopri5(1e-3).nfe) == (16, 32, None)
    assert Setting.from_sampler({"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}) == Setting.dopri5(1e-3)
    assert Setting.from_sampler({"solver": "heun"}) == Setting.fixed("heun", 40)  # the integrator's default steps
    with pytest.raises(ValueError):
        Setting("euler", rtol=1e-3)


def test_the_measured_curve_matches_an_independent_float64_computation(one_thread: None) -> None:
    capacitor = make_capacitor()
    batch = images()
    choice = sampler.measure(
        capacitor, batch, candidates=FEW, refine=0, reference_tol=LOOSE, reference_precision=torch.float64
    )
    assert choice.reference["dtype"] == "float64" and choice.images == 4 and choice.dropped == 0
    measured = {p.setting: p for p in choice.curve}
    assert set(measured) == {*FEW, Setting.dopri5(1e-2)}  # the capacitor's own sampler is dopri5 at 1e-2 too
    assert measured[Setting.dopri5(1e-2)].current
    assert measured[Setting.fixed("euler", 4)].nfe_mean == 4 and measured[Setting.fixed("heun", 2)].nfe_mean == 4

    # The same numbers from scratch: a float64 reference, the candidate as `translate` runs it, errors in numpy.
    network = copy.deepcopy(capacitor.network).double()
    with torch.inference_mode():
        truth = integrate(
            network, batch.double(), *capacitor.plates("forward"), solver="dopri5", rtol=LOOSE, atol=LOOSE
        )
        euler = capacitor.translate(batch, solver="euler", steps=1).images
    difference = (np.clip(euler.double().numpy(), -1, 1) - np.clip(truth.x.numpy(), -1, 1)) * 127.5
    errors = np.sqrt((difference**2).reshape(4, -1).mean(1))
    one = measured[Setting.fixed("euler", 1)]
    assert one.error_mean == pytest.approx(errors.mean(), rel=1e-4)
    assert one.error_p95 == pytest.approx(np.percentile(errors, 95), rel=1e-4)
    assert one.error_max == pytest.approx(errors.max(), rel=1e-4)
    assert one.error_mean > measured[Setting.fixed("euler", 4)].error_mean  # more steps, closer to the reference

    chosen = choice.chosen
    assert chosen is not None and chosen == sampler.pick(choice.curve, sampler.DEFAULT_BOUND)
    record = choice.to_json()
    assert record["chosen"] == chosen.setting.sampler() and len(record["curve"]) == len(choice.curve)
    json.dumps(record, allow_nan=False)


def test_refinement_narrows_the_step_gap_and_pruning_skips_what_cannot_be_cheaper(one_thread: None) -> None:
    capacitor = make_capacitor()
    batch = images(3)
    full = sampler.measure(capacitor, batch, candidates=FEW, refine=0, reference_tol=LOOSE)
    euler_1 = next(p for p in full.curve if p.setting == Setting.fixed("euler", 1))
    bound = euler_1.error_p95 * 0.5  # euler 1 fails, and euler 4 (a quarter of its error) passes
    assert next(p for p in full.curve if p.setting == Setting.fixed("euler", 4)).within(bound)
    refined = sampler.measure(capacitor, batch, candidates=FEW, bound=bound, refine=1, reference_tol=LOOSE)
    assert Setting.fixed("euler", 2) in {p.setting for p in refined.curve}  # between 1 (fails) and 4 (passes)
    pruned = sampler.measure(capacitor, batch, candidates=FEW, bound=bound, refine=0, prune=True, reference_tol=LOOSE)
    assert pruned.chosen is not None and pruned.chosen.setting == full_choice(full, bound)
    assert len(pruned.curve) + len(pruned.skipped) == len(full.curve)


def full_choice(choice: sampler.Choice, bound: float) -> Setting:
    best = sampler.pick(choice.curve, bound)
    assert best is not None
    return best.setting


def test_write_stores_the_choice_atomically_and_the_capacitor_then_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    folder = make_capacitor().save_pretrained(tmp_path / "mine")
    capacitor = Capacitor.from_pretrained(folder)
    choice = sampler.measure(capacitor, images(3), candidates=EULER, refine=0, reference_tol=LOOSE)  # + its dopri5
    assert choice.chosen is not None and choice.chosen.setting.solver == "euler"
    steps = choice.chosen.setting.steps
    before = (folder / CONFIG_NAME).read_bytes()

    # A write that dies before the rename leaves the old config and no temporary file.
    def dies(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(OSError):
        sampler.write(folder, choice)
    monkeypatch.undo()
    assert (folder / CONFIG_NAME).read_bytes() == before and sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", "model.safetensors"]
    )

    sampler.write(folder, choice)
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["sampler"] == {"solver": "euler", "steps": steps}
    assert config["sampler_choice"]["chosen"] == config["sampler"] and config["sampler_choice"]["previous"] == {
        "solver": "dopri5",
        "rtol": 1e-2,
        "atol": 1e-2,
    }
    loaded = Capacitor.from_pretrained(folder)
    out = loaded.translate(images(2))
    assert out.solution.nfe.tolist() == [steps, steps]  # the chosen sampler is now the default
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_nothing_within_the_bound_writes_nothing(tmp_path: Path, one_thread: None) -> None:
    folder = make_capacitor().save_pretrained(tmp_path / "mine")
    capacitor = Capacitor.from_pretrained(folder)
    choice = sampler.measure(capacitor, images(2), candidates=FEW[2:3], bound=1e-9, reference_tol=LOOSE)
    assert choice.chosen is None and choice.sampler() is None
    before = (folder / CONFIG_NAME).read_bytes()
    with pytest.raises(CapacitorError, match="no setting stays within"):
        sampler.write(folder, choice)
    assert (folder / CONFIG_NAME).read_bytes() == before


def test_write_refuses_embedded_capacitors_and_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from efm_cli.capacitor import hub

    for ref in ("digits-2to3", str(ROOT / "weights" / "digits-2to3")):
        with pytest.raises(UsageError, match="embedded"):
            sampler.writable_folder(ref)
    with pytest.raises(UsageError, match="Hub"):
        sampler.writable_folder("someone/their-capacitor")
    cache = tmp_path / "hub"
    snapshot = make_capacitor().save_pretrained(cache / "models--someone--cap" / "snapshots" / ("0" * 40))
    monkeypatch.setattr(hub, "cache_dir", lambda: cache)
    with pytest.raises(UsageError, match="Hugging Face cache"):
        sampler.writable_folder(snapshot)
    mine = make_capacitor().save_pretrained(tmp_path / "runs" / "r" / "model")
    assert sampler.writable_folder(tmp_path / "runs" / "r") == mine  # a training run stands for its model/


def test_cli_writes_the_choice_it_reports(run_efm: Run, tmp_path: Path) -> None:
    folder = make_capacitor().save_pretrained(tmp_path / "mine")
    pictures = image_folder(tmp_path / "horses")
    done = run_efm("sampler", str(folder), "--images", str(pictures), "--limit", "2", "--write", "--json", "-q")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    report = json.loads(done.stdout)
    assert report["images"] == 2 and report["chosen"] is not None and report["reference"]["rtol"] == 1e-6
    labels = {(p["solver"], p.get("steps"), p.get("rtol")) for p in report["curve"]}
    assert {("euler", 256, None), ("heun", 64, None), ("dopri5", None, 1e-5)} <= labels
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["sampler"] == report["chosen"] and config["sampler_choice"]["curve"] == report["curve"]


def test_the_table_names_the_chosen_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from efm_cli.cli.sampler import _print_table

    curve = [point(Setting.fixed("euler", 8), 8, 3.0), point(Setting.fixed("euler", 32), 32, 0.8)]
    choice = sampler.Choice(
        1.0,
        curve,
        curve[1],
        {"rtol": 1e-6, "dtype": "float32", "nfe": 700.0},
        2,
        0,
        "forward",
        "cpu",
        {"solver": "euler", "steps": 8},
    )
    _print_table(choice)
    out = capsys.readouterr().out
    assert "chosen: euler 32 steps (32.0 NFE, p95 0.80 ≤ 1)" in out and "euler 8 steps" in out


def test_cli_refuses_to_write_into_an_embedded_capacitor_before_measuring(run_efm: Run, tmp_path: Path) -> None:
    pictures = image_folder(tmp_path / "twos", 1)
    embedded = ROOT / "weights" / "digits-2to3"
    before = (embedded / CONFIG_NAME).read_bytes()
    for ref in ("digits-2to3", str(embedded)):
        done = run_efm("sampler", ref, "--images", str(pictures), "--write", timeout=60)
        assert done.returncode == 2 and "embedded" in one_error_line(done.stderr)
        assert "measuring" not in done.stderr
    assert (embedded / CONFIG_NAME).read_bytes() == before
    bad = run_efm("sampler", str(embedded), "--images", str(pictures), "--bound", "0")
    assert bad.returncode == 2


def test_a_run_that_ends_its_schedule_exports_a_measured_sampler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    from efm_cli.training.data import Preprocessing
    from efm_cli.training.run import Budget, RunSettings, fit, with_steps
    from efm_cli.training.step import FieldSpec, Schedule

    source, target = shapes(tmp_path / "squares", "square", 12, 0), shapes(tmp_path / "discs", "disc", 12, 1)
    settings = RunSettings(
        source=str(source),
        target=str(target),
        source_name="square",
        target_name="disc",
        prep=Preprocessing(size=TINY, hflip=False),
        field=FieldSpec(kind="tube", L=6.0, S=1.0),
        schedule=Schedule(lr=1e-3, warmup=2, total=6),
        network="tiny",
        charges=8,
        points=4,
        checkpoint_every=3,
        sample_every=3,
        samples=4,
        sample_steps=4,
    )
    run, model = tmp_path / "run", tmp_path / "run" / "model" / CONFIG_NAME
    fit(settings, run, budget=Budget(steps=3), device="cpu")  # half-way: no choice
    assert "sampler_choice" not in json.loads(model.read_text())

    fit(settings, run, budget=Budget(), resume=True, device="cpu")  # the end, but a run of seconds: not worth it
    config = json.loads(model.read_text())
    assert config["sampler"] == {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}
    assert config["sampler_choice"]["chosen"] is None and "not measured" in config["sampler_choice"]["skipped"]

    monkeypatch.setattr(sampler, "EXPORT_SHARE", 1e6)  # as if the run had taken hours
    fit(with_steps(settings, 9), run, budget=Budget(), resume=True, device="cpu")
    config = json.loads(model.read_text())
    record = config["sampler_choice"]
    assert record["origin"] == "efm train" and record["images"] == sampler.EXPORT_IMAGES and record["curve"]
    assert config["sampler"] == (record["chosen"] or record["previous"])
    assert record["previous"] == {"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3}
    Capacitor.from_pretrained(run / "model")  # still a valid capacitor
