"""Training sized to a time budget: `efm train --max-minutes M` without `--steps` measures its own speed, fits
warm-up and cosine decay inside M, records the choice, says it, and ends with a one-screen summary."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import shapes

from efm_cli.cli.app import main
from efm_cli.training import run as training
from efm_cli.training.run import RunSettings, Sizing, _Sizer, default_warmup, new_settings, planned_total, read_settings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def plates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plates")
    return shapes(root / "squares", "square", 12, 0), shapes(root / "discs", "disc", 12, 1)


def test_default_warm_up_is_a_tenth_of_the_schedule_up_to_a_thousand_steps(plates: tuple[Path, Path]) -> None:
    assert [default_warmup(n) for n in (1, 8, 2000, 20000)] == [1, 1, 200, 1000]
    source, target = map(str, plates)
    assert new_settings(source, target, steps=2000).schedule.warmup == 200
    assert new_settings(source, target).schedule.total == training.DEFAULT_STEPS
    assert new_settings(source, target).schedule.warmup == 1000
    assert new_settings(source, target, steps=2000, warmup=7).schedule.warmup == 7
    # --steps wins over --max-minutes: the time is then only a cap on the session.
    assert new_settings(source, target, steps=50, minutes=3).sizing is None
    sized = new_settings(source, target, minutes=3)
    assert sized.sizing == Sizing(3, None, True) and sized.schedule.total is None
    assert new_settings(source, target, minutes=3, warmup=40).sizing == Sizing(3, None, False)
    assert planned_total(10, 2.0, 30.0) == 70 and planned_total(10, 2.0, -5.0) == 11


def _settings(plates: tuple[Path, Path], **changes: object) -> RunSettings:
    return new_settings(*map(str, plates), minutes=10, **changes)  # type: ignore[arg-type]


def test_the_sizer_probes_then_fits_the_schedule_to_the_deadline_and_follows_the_speed(
    plates: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training.time, "monotonic", lambda: 0.0)
    sizer = _Sizer(_settings(plates), deadline=600.0, step=0)
    assert sizer.probe == pytest.approx(30.0) and sizer.reserve == pytest.approx(48.0)  # 5 % and 8 % of 600 s
    assert sizer.update(1, 2.0) is None  # the first step: allocation and warm caches, not the speed
    assert sizer.update(10, 20.0) is None  # still probing (18 s of 30)
    first = sizer.update(16, 32.0)  # 15 steps in 30 s: 0.5 steps/s for the 600 − 32 − 48 s left
    assert first is not None and first.total == 16 + 260 and first.warmup == default_warmup(276) == 28
    assert sizer.sizing.rate == pytest.approx(0.5)
    assert sizer.update(17, 34.0) is None  # the plan holds while the speed does
    # Twice as fast from here on: the end moves out and the warm-up, already decided, stays.
    faster = sizer.update(100, 34.0 + 83 / 1.0)
    assert faster is not None and faster.warmup == 28
    rate = 99 / (117.0 - 2.0)
    assert faster.total == 100 + math.floor(rate * (600 - 117 - 48))
    # Past 90 % of the schedule it no longer moves, so the decay ends smoothly.
    assert sizer.update(int(0.9 * faster.total) + 1, 400.0) is None


def test_a_given_warm_up_and_a_resumed_run_keep_their_warm_up(
    plates: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(training.time, "monotonic", lambda: 0.0)
    given = _Sizer(_settings(plates, warmup=40), deadline=100.0, step=0)
    given.update(1, 1.0)
    planned = given.update(12, 12.0)
    assert planned is not None and planned.warmup == 40
    resumed_settings = replace(_settings(plates), schedule=replace(_settings(plates).schedule, warmup=77, total=500))
    resumed = _Sizer(resumed_settings, deadline=100.0, step=500)
    resumed.update(501, 1.0)
    planned = resumed.update(512, 12.0)
    assert planned is not None and planned.warmup == 77 and planned.total > 512


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_max_minutes_alone_ends_the_cosine_inside_the_budget_and_says_so(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", "--source", str(plates[0]), "--target", str(plates[1]), "--size", "16", "--network", "tiny"]
    args += ["--charges", "8", "--batch-size", "4", "--out", str(run)]
    assert main([*args, "--max-minutes", "0.3", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    settings = read_settings(run)
    total = settings.schedule.total
    assert summary["stopped"] == "steps" and summary["step"] == summary["total"] == total
    assert settings.sizing is not None and settings.sizing.minutes == 0.3 and settings.sizing.rate > 0
    assert 0.05 * total <= settings.schedule.warmup <= 0.15 * total  # a tenth of the first plan; the end moves after
    assert "sized the schedule to 0.3 minutes:" in captured.err
    logged = _metrics(run)
    floor = settings.schedule.lr * settings.schedule.final
    assert logged[-1]["step"] == total and logged[-1]["lr"] == pytest.approx(floor)
    assert logged[-1]["elapsed_s"] < 0.3 * 60
    # Resumed with more minutes, the schedule is sized again from where it stands and ends at the floor again.
    assert main(["train", "--resume", str(run), "--max-minutes", "0.1", "--json"]) == 0
    again = read_settings(run)
    assert again.schedule.total > total and again.schedule.warmup == settings.schedule.warmup
    assert _metrics(run)[-1]["lr"] == pytest.approx(floor) and _metrics(run)[-1]["step"] == again.schedule.total


def test_the_end_of_a_run_is_one_screen_with_what_to_run_next(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", "--source", str(plates[0]), "--target", str(plates[1]), "--size", "16", "--network", "tiny"]
    assert main([*args, "--charges", "8", "--batch-size", "4", "--steps", "3", "--out", str(run)]) == 0
    err = capsys.readouterr().err
    assert "sized the schedule" not in err and read_settings(run).sizing is None
    assert "step 3 of 3 (the schedule is done)" in err
    assert f"capacitor    {run / 'model'}" in err and f"samples      {run / 'samples' / 'step-00000003.png'}" in err
    assert f"efm eval -m {run / 'model'} --source HELD_OUT_SQUARES --target HELD_OUT_DISCS" in err
    assert f"--train-source {plates[0]}" in err
