"""`efm train` traps: settings and data that waste a run are said out loud, a resume that cannot continue as asked
is refused before any work, and a run shorter than its logging interval still leaves its metrics."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line
from PIL import Image

from efm_cli.cli.app import main
from efm_cli.training.data import median_shorter_side

SIZE = 16
TINY = ["--size", str(SIZE), "--network", "tiny", "--batch-size", "4", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def pictures(folder: Path, count: int, side: int, seed: int) -> Path:
    """`count` random RGB pictures of side × side pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def plates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two plates of 100 pictures at the training size: nothing about them deserves a warning."""
    root = tmp_path_factory.mktemp("plates")
    return pictures(root / "a", 100, SIZE, 0), pictures(root / "b", 100, SIZE, 1)


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def trained(plates: tuple[Path, Path], run: Path, *extra: str) -> None:
    source, target = (str(p) for p in plates)
    args = ["train", "--source", source, "--target", target, *TINY, "--charges", "8", "--out", str(run), *extra]
    assert main([*args, "-q"]) == 0


# --- item 7: --resume that cannot continue -----------------------------------------------------------------------


def test_resume_without_a_checkpoint_is_refused_and_says_how_to_start_over(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    trained(plates, run, "--steps", "2", "--log-every", "1")
    shutil.rmtree(run / "checkpoints")
    before = {name: (run / name).read_bytes() for name in ("config.json", "metrics.jsonl")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {run / 'checkpoints'} holds no checkpoint: there is nothing to resume — ")
    assert "to start over" in line and "--out" in line
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing restarted, nothing rewritten
    assert not (run / "checkpoints").exists()


def test_resume_to_a_step_already_passed_is_refused_before_any_image_is_read(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "source"
    shutil.copytree(plates[0], source)
    run = tmp_path / "run"
    trained((source, plates[1]), run, "--steps", "4", "--warmup", "1")
    config = (run / "config.json").read_bytes()
    shutil.rmtree(source)  # a run that read its images would now fail on the missing folder instead
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "2"]) == 2
    stderr = capsys.readouterr().err
    assert one_error_line(stderr).startswith(f"error: {run} is already at step 4, past the 2 steps asked for — ")
    assert not warnings_in(stderr) and (run / "config.json").read_bytes() == config


def test_resume_at_the_end_of_the_schedule_says_there_is_nothing_to_train(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    trained(plates, run, "--steps", "3", "--warmup", "1")
    for extra in ([], ["--steps", "3"]):
        capsys.readouterr()
        assert main(["train", "--resume", str(run), *extra]) == 0
        assert warnings_in(capsys.readouterr().err) == [
            f"warning: {run} is already at step 3: nothing to train (resume with --steps above it)"
        ]


# --- item 14: settings and data that waste the run ---------------------------------------------------------------


def test_settings_and_data_that_waste_a_run_are_warned_about_once_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = pictures(tmp_path / "small", 12, 6, 2)  # a few pictures, far below --size 16
    fine = pictures(tmp_path / "fine", 20, SIZE, 3)
    args = ["train", "--source", str(small), "--target", str(fine), *TINY, "--charges", "16", "--warmup", "3"]
    assert main([*args, "--steps", "3", "--out", str(tmp_path / "run")]) == 0
    assert warnings_in(capsys.readouterr().err) == [
        "warning: --warmup 3 is not below --steps 3: the whole run is spent warming up the learning rate "
        "(lower --warmup)",
        "warning: plate 'small' has only 12 images: with fewer than 100 the field learns these pictures rather "
        "than their domain",
        "warning: --charges 16 exceeds the 12 images of plate 'small': every step holds some of them twice",
        "warning: the images of plate 'small' are small for --size 16 (median shorter side 6 px): they are "
        "enlarged more than 2×, so the capacitor learns blurred pictures",
        "warning: plate 'fine' has only 20 images: with fewer than 100 the field learns these pictures rather "
        "than their domain",
    ]


def test_a_sound_run_gets_no_warning(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, target = (str(p) for p in plates)
    args = ["train", "--source", source, "--target", target, *TINY, "--charges", "8", "--warmup", "1"]
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "run")]) == 0
    assert warnings_in(capsys.readouterr().err) == []


def test_median_shorter_side_reads_headers_and_skips_what_is_not_an_image(tmp_path: Path) -> None:
    for i, (width, height) in enumerate([(40, 10), (12, 30), (50, 60)]):
        Image.new("RGB", (width, height)).save(tmp_path / f"{i}.png")
    (tmp_path / "junk.png").write_text("not an image")
    assert median_shorter_side(sorted(tmp_path.iterdir())) == 12
    assert median_shorter_side([tmp_path / "junk.png"]) is None


# --- item 16: the last step is always logged ---------------------------------------------------------------------


def test_a_run_shorter_than_the_logging_interval_logs_its_last_step(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    source, target = (str(p) for p in plates)
    args = ["train", "--source", source, "--target", target, *TINY, "--charges", "8", "--warmup", "1"]
    assert main([*args, "--steps", "6", "--out", str(run), "--json"]) == 0  # --log-every is 10
    summary = json.loads(capsys.readouterr().out)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6] and summary["loss"] == records[0]["smoothed"] is not None
    # A session that stops between logging steps logs where it stopped; the next one logs from there on.
    assert main(["train", "--resume", str(run), "--steps", "13", "-q"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 10, 13]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--source-name", "a\x1b[31mb"], "error: the plate name 'a\\x1b[31mb' cannot name a capacitor's plate"),
        (["--target-name", "x" * 65], "cannot name a capacitor's plate (1–64 printable characters"),
        (["--target-name", "../up"], "error: the plate name '../up' cannot name a capacitor's plate"),
        (["--size", "512"], "error: the UNet's attention would cover 128×128 = 16,384 positions"),
    ],
    ids=["escape", "long", "path", "attention"],
)
def test_settings_a_capacitor_could_not_hold_are_refused_before_any_image_is_read(
    plates: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    args = ["train", "--source", str(plates[0]), "--target", str(plates[1]), *TINY, "--out", str(tmp_path / "run")]
    if "--size" in flags:
        args[args.index("--network") + 1] = "small"
    assert main([*args, *flags]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()
