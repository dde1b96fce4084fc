"""`efm translate` as a user runs it: Typer's runner in-process, and the real entry point in a subprocess."""

import json
from pathlib import Path

import pytest
import torch
from conftest import BAD, GOOD, digests, make_capacitor, make_tree, stamps
from PIL import Image
from typer.testing import CliRunner

from efm_cli.capacitor.model import Capacitor
from efm_cli.cli.app import app, main

FAST = {"OMP_NUM_THREADS": "1"}
"""Tiny networks on a shared machine: one OpenMP thread is much faster than two fighting for a core."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A weights folder holding one horse↔zebra capacitor, `h2z`."""
    make_capacitor().save_pretrained(tmp_path / "weights" / "h2z")
    from efm_cli.capacitor import registry

    monkeypatch.setenv("EFM_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(registry, "known", registry.embedded)  # this machine's HF cache stays out of it
    return tmp_path / "weights"


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["translate", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_help_does_not_import_heavy_modules(run_python) -> None:
    code = """
import contextlib, io, json, sys
from efm_cli.cli.app import main
with contextlib.redirect_stdout(io.StringIO()) as shown:
    code = main(["translate", "--help"])
heavy = ("torch", "torchvision", "numpy", "scipy", "PIL", "huggingface_hub", "safetensors")
print(json.dumps({"code": code, "example": "efm translate" in shown.getvalue(),
                  "imported": [name for name in heavy if name in sys.modules]}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"code": 0, "example": True, "imported": []}


def test_a_mixed_tree_translates_every_good_file_and_lists_the_bad_ones(tmp_path: Path, weights: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    before = digests(horses)
    grid, strip = tmp_path / "sheet.jpg", tmp_path / "lines.png"
    code, stdout, stderr = invoke(
        str(horses), "--model", str(weights / "h2z"), "--grid", str(grid), "--trajectory", str(strip)
    )
    assert code == 3, stderr
    assert stdout == ""
    out = tmp_path / "horses-to-zebra"
    for name, size in GOOD.items():
        with Image.open(out / name) as written:
            assert written.size == size, name
    said = "".join(stderr.split())  # Rich wraps long messages at the console width, even inside a path
    for name, reason in BAD.items():
        assert "".join(f"warning: skipped {horses / name}: {reason}".split()) in said
        assert not (out / name).exists()
    assert "done:6translated,0kept,3skipped,0failed" in said
    assert digests(horses) == before
    with Image.open(grid) as sheet, Image.open(strip) as film:
        assert sheet.format == "JPEG" and film.format == "PNG"
        assert sheet.width > sheet.height and film.height >= 4 * 16


def test_rerun_with_skip_existing_writes_nothing_new(run_efm, tmp_path: Path, weights: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    out = horses / "translated"  # inside the input tree: never read back as input
    args = ("translate", str(horses), "--model", str(weights / "h2z"), "--out", str(out), "--json")
    first = run_efm(*args, env=FAST)
    assert first.returncode == 3, first.stderr
    report = json.loads(first.stdout)
    assert report["summary"] | {"seconds": 0, "images_per_second": 0} == {
        "inputs": 9,
        "translated": 6,
        "existing": 0,
        "skipped": 3,
        "failed": 0,
        "retried_fp32": 0,
        "nfe_mean": report["summary"]["nfe_mean"],
        "seconds": 0,
        "images_per_second": 0,
    }
    entries = {Path(entry["path"]).relative_to(horses).as_posix(): entry for entry in report["inputs"]}
    assert {name: entries[name]["reason"] for name in BAD} == BAD
    assert all(entries[name]["status"] == "translated" and entries[name]["nfe"] > 0 for name in GOOD)
    assert all(entry["output"] == str(out / name) for name, entry in entries.items())
    written = stamps(out)
    again = run_efm(*args, "--skip-existing", env=FAST)
    assert again.returncode == 3, again.stderr
    assert stamps(out) == written
    statuses = {Path(e["path"]).relative_to(horses).as_posix(): e["status"] for e in json.loads(again.stdout)["inputs"]}
    assert statuses == {name: "existing" for name in GOOD} | {name: "skipped" for name in BAD}


def test_shards_cover_every_file_exactly_once(tmp_path: Path, weights: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    seen = []
    for index in (1, 2, 3):
        code, stdout, _ = invoke(str(horses), "--model", str(weights / "h2z"), "--shard", f"{index}/3", "--json", "-q")
        assert code in (0, 3)
        seen += [entry["path"] for entry in json.loads(stdout)["inputs"]]
    assert sorted(seen) == sorted(str(horses / name) for name in [*GOOD, *BAD])
    assert all((tmp_path / "horses-to-zebra" / name).is_file() for name in GOOD)


def test_to_picks_the_capacitor_and_the_direction(tmp_path: Path, weights: Path) -> None:
    horses = tmp_path / "horses"
    horses.mkdir()
    Image.new("RGB", (20, 14), (120, 80, 40)).save(horses / "h.png")
    code, stdout, stderr = invoke(str(horses), "--to", "zebra", "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert (report["model"], report["direction"], report["to"]) == ("h2z", "forward", "zebra")
    assert report["out"] == str(tmp_path / "horses-to-zebra")
    code, stdout, stderr = invoke(report["out"], "--to", "horse", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["direction"] == "backward"
    with Image.open(tmp_path / "horses-to-zebra-to-horse" / "h.png") as back:
        assert back.size == (20, 14)


def test_reduced_precision_on_a_cpu_without_its_instructions_is_warned_about(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emulated bf16 is many times slower than fp32 on a CPU: say so, once, and translate anyway."""
    from efm_cli import devices

    horses = tmp_path / "horses"
    horses.mkdir()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(horses / "h.png")
    for native, warned in ((False, True), (True, False), (None, False)):
        monkeypatch.setattr(devices, "cpu_native", lambda precision, cpuinfo=None, answer=native: answer)
        out = tmp_path / f"out-{native}"
        code, _, stderr = invoke(str(horses), "--to", "zebra", "--precision", "bf16", "--device", "cpu", "-o", str(out))
        assert code == 0, stderr
        assert ("no bf16 instructions" in stderr) is warned and stderr.count("instructions") <= 1
        assert (out / "h.png").is_file()


def test_ambiguous_or_unknown_domains_list_what_is_available(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path
) -> None:
    make_capacitor("zebra", "okapi").save_pretrained(weights / "z2o")
    assert main(["translate", str(tmp_path), "--to", "zebra"]) == 1
    assert capsys.readouterr().err == (
        "error: several capacitors translate to 'zebra': h2z, z2o — pick one with --model NAME instead of --to\n"
    )
    assert main(["translate", str(tmp_path), "--to", "cat"]) == 1
    assert capsys.readouterr().err == (
        "error: no known capacitor translates to 'cat' — available: h2z (horse↔zebra), z2o (zebra↔okapi); "
        "see 'efm models'\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((), "pass --to DOMAIN or --model REF"),
        (("--model", "M", "--shard", "0/2"), "I must be between 1 and N"),
        (("--model", "M", "--shard", "2"), "is not I/N"),
        (("--model", "M", "--steps", "5"), "--steps needs --solver heun or euler"),
        (("--model", "M", "--solver", "euler", "--rtol", "1e-3"), "--rtol and --atol do not apply"),
        (("--model", "M", "--atol", "0"), "must be greater than 0"),
        (("--model", "M", "--out", "IN"), "is the input folder"),
        (("--model", "M", "--grid", "sheet.txt"), "unknown image format"),
        (("--model", "M", "--to", "cat"), "pass --to horse or --to zebra"),
    ],
)
def test_bad_flags_are_one_line_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path, flags: tuple[str, ...], message: str
) -> None:
    horses = make_tree(tmp_path / "horses")
    swap = {"M": str(weights / "h2z"), "IN": str(horses)}
    code = main(["translate", str(horses), *(swap.get(flag, flag) for flag in flags)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: ")
    assert message in captured.err
    assert not (tmp_path / "horses-to-zebra").exists()


def test_nothing_usable_exits_1_and_no_images_at_all_is_an_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.png").write_bytes(b"")
    assert main(["translate", str(bad), "--model", str(weights / "h2z")]) == 1
    assert "error: nothing was translated" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    assert main(["translate", str(tmp_path / "none"), "--model", str(weights / "h2z")]) == 1
    assert capsys.readouterr().err.startswith("error: no images found in")


def test_solver_flags_are_checked_against_the_capacitors_own_solver(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, weights: Path
) -> None:
    # A capacitor whose measured default is Heun takes --steps alone; its steps never reach another solver.
    heun = tmp_path / "heun"
    capacitor = make_capacitor()
    capacitor.config["sampler"] = {"solver": "heun", "steps": 3}
    capacitor.save_pretrained(heun)
    horses = make_tree(tmp_path / "horses")
    assert main(["translate", str(horses), "--model", str(heun), "--steps", "2", "--json", "-q"]) == 3  # BAD files
    records = json.loads(capsys.readouterr().out)["inputs"]
    assert {r["nfe"] for r in records if r["status"] == "translated"} == {4}
    assert main(["translate", str(horses), "--model", str(heun), "--rtol", "1e-3", "-o", str(tmp_path / "x")]) == 2
    assert "--rtol and --atol do not apply to --solver heun" in capsys.readouterr().err
    assert main(["translate", str(horses), "--model", str(heun), "--solver", "dopri5", "-o", str(tmp_path / "y")]) == 3
    translated = Capacitor.from_pretrained(heun).translate(torch.zeros(1, 3, 16, 16), solver="euler")
    assert int(translated.solution.nfe[0]) == 40  # euler's own default, not the capacitor's 3 Heun steps
