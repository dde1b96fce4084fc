"""Traps of the command line (issue 20): pictures over outputs, escape codes from names and from NO_COLOR, read-only
outputs, foreign errors, outputs read back as inputs, uneven layouts and paths, wrapped tables, broken pipes.

Each bad input must end in one `error:` line with exit code 1 or 2, before anything is translated.
"""

import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import GOOD, Run, make_capacitor, make_tree, noise_pixels, one_error_line
from PIL import Image

from efm_cli.capacitor import registry
from efm_cli.cli import console
from efm_cli.cli.app import main
from efm_cli.images import OUTPUT_MARKER

FAST = {"OMP_NUM_THREADS": "1"}
ESC = "\x1b"

pytestmark = pytest.mark.usefixtures("one_thread")


def pictures(folder: Path, count: int, suffix: str = ".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(noise_pixels(12, 10, 3, i)).save(folder / f"p{i}{suffix}")
    return folder


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    """Run `efm translate ARGS --json` in-process: exit code, parsed report, stderr."""
    code = main(["translate", *args, "--json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out else {}, captured.err


# --- 5: --grid and --trajectory are checked before anything is translated -------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("-o", "{tmp}/g", "--grid", "{tmp}/g/photo.jpg"), "would overwrite the translation of"),
        (("--trajectory", "{tmp}/horses-to-zebra/a/grey.png"), "would overwrite the translation of"),
        (("--grid", "{tmp}/folder.png"), "is a folder"),
        (("--grid", "{tmp}/s.png", "--trajectory", "{tmp}/s.png"), "--grid and --trajectory name the same file"),
        (("-o", "{tmp}/x.png", "--grid", "{tmp}/x.png"), "is where the outputs go"),
    ],
)
def test_pictures_that_would_clash_are_usage_errors_before_any_integration(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    model: Path,
    flags: tuple[str, ...],
    message: str,
) -> None:
    from efm_cli import translate

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("translated before the pictures were checked")

    monkeypatch.setattr(translate, "translate_files", never)
    horses = make_tree(tmp_path / "horses")
    (tmp_path / "folder.png").mkdir()
    code = main(["translate", str(horses), "--model", str(model), *(flag.format(tmp=tmp_path) for flag in flags)])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err
    assert not (tmp_path / "g").exists() and not (tmp_path / "horses-to-zebra").exists()


# --- 6: names from files, configs and the Hub are escaped ------------------------------------------------------


def test_escape_shows_control_and_format_characters() -> None:
    assert console.escape("plain [bold]name[/] ↔ zèbre") == "plain [bold]name[/] ↔ zèbre"
    assert console.escape("a\x1b[31mb\nc\rd\te\u202ef\x85") == "a\\x1b[31mb\\nc\\rd\\te\\u202ef\\x85"
    assert console.format_error("bad \x1b[2J name", "hint\x07") == "error: bad \\x1b[2J name — hint\\x07"


def test_models_table_escapes_names_and_domains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = make_capacitor().save_pretrained(tmp_path / "w" / "h2z")
    config = json.loads((folder / "config.json").read_text())
    config["domains"] = {"source": "ho\x1b[31mrse", "target": "zeb\nra\r[bold]x"}  # as a config the loader missed
    entry = registry.Entry("ev\x1b]0;title\x07il", folder, "embedded", config)
    monkeypatch.setattr(registry, "known", lambda: [entry])
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert ESC not in out and "\r" not in out and "\x07" not in out
    rows = [line for line in out.splitlines() if "ev\\x1b]0;title\\x07il" in line]
    assert len(rows) == 1
    assert "ho\\x1b[31mrse ↔ zeb\\nra\\r[bold]x" in rows[0]  # one row, markup shown as written


def test_translate_prints_file_and_model_names_escaped_on_one_line_each(run_efm: Run, tmp_path: Path) -> None:
    model = make_capacitor().save_pretrained(tmp_path / "ca\x1b[31mp\nx")
    horses = pictures(tmp_path / "horses", 2)
    (horses / "bad\x1b[2J\nname.png").write_text("not an image")
    result = run_efm("translate", str(horses), "--model", str(model), env=FAST)
    assert result.returncode == 3, result.stderr
    assert ESC not in result.stderr
    lines = result.stderr.splitlines()
    assert f"warning: skipped {horses}/bad\\x1b[2J\\nname.png: not an image" in lines
    assert any(line.startswith("translating 3 image(s)") and "ca\\x1b[31mp\\nx" in line for line in lines), lines


# --- 8: NO_COLOR means no escape code at all, on a terminal too --------------------------------------------------


def on_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes]:
    """Run efm with stdin, stdout and stderr on a pseudo-terminal, where progress bars draw; all it wrote."""
    clean = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "EFM_DEBUG")}
    main_fd, child_fd = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "efm_cli", *args],
        stdin=child_fd,
        stdout=child_fd,
        stderr=child_fd,
        env={**clean, "TERM": "xterm-256color", **FAST, **env},
    )
    os.close(child_fd)
    written = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(main_fd)
    return process.wait(timeout=120), written


def test_no_color_output_holds_no_escape_code_on_a_terminal(tmp_path: Path, model: Path) -> None:
    horses = pictures(tmp_path / "horses", 6)
    run = ["translate", str(horses), "--model", str(model), "-b", "1", "--solver", "euler", "--steps", "40"]
    code, styled = on_terminal([*run, "-o", str(tmp_path / "styled")], {})
    assert code == 0 and b"\x1b[" in styled  # a terminal gets a Rich bar, so the checks below can fail
    for args in (["--help"], ["translate", "--help"], [*run, "-o", str(tmp_path / "plain")]):
        code, written = on_terminal(args, {"NO_COLOR": "1"})
        assert code == 0, written
        assert b"\x1b" not in written, (args, written[:400])
    assert b"\rtranslating 6/6" in written  # progress is still shown, as plain text
    assert len(list((tmp_path / "plain").glob("*.png"))) == 6


def test_no_color_and_pipes_hold_no_escape_code(run_efm: Run, tmp_path: Path, model: Path) -> None:
    horses = pictures(tmp_path / "horses", 2)
    for env in ({"NO_COLOR": "1"}, {}):
        for args in (["--help"], ["translate", "--help"], ["translate", str(horses), "--model", str(model)]):
            result = run_efm(*args, env={**FAST, **env})
            assert result.returncode == 0, result.stderr
            assert ESC not in result.stdout + result.stderr, args


# --- 10: an output folder nobody can write to stops the run before anything is translated -----------------------


def _without_root() -> list[str]:
    """A command prefix under which file permissions apply to this process too; skip the test when there is none."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    # In a new user namespace that maps no user, root's files are owned by nobody the process may override.
    if unshare is None or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root without user namespaces: file permissions do not stop root from writing")
    return [unshare, "--user"]


def test_a_read_only_output_folder_fails_before_anything_is_translated(tmp_path: Path, model: Path) -> None:
    horses = pictures(tmp_path / "horses", 3)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked, locked / "new"):
            args = ["translate", str(horses), "--model", str(model), "--out", str(out)]
            result = subprocess.run(
                [*_without_root(), sys.executable, "-m", "efm_cli", *args],
                capture_output=True,
                text=True,
                env={**os.environ, **FAST},
                timeout=120,
            )
            line = one_error_line(result.stderr)
            assert result.returncode == 1
            assert line == f"error: cannot write to {out}: Permission denied — pass a folder you can write to"
            assert "translating" not in result.stderr and "done:" not in result.stderr  # nothing was integrated
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


# --- 11: errors from outside efm are one clear line with the right exit code ------------------------------------

_FAILING_MODELS = """
import sys
from efm_cli.capacitor import registry
from efm_cli.cli.app import main

def fail():
    IMPORTS
    raise EXCEPTION

registry.known = fail
sys.exit(main(["models"]))
"""


@pytest.mark.parametrize(
    ("imports", "exception", "code", "line"),
    [
        ("", "RecursionError('maximum recursion depth exceeded')", 1, "error: a file is nested too deeply to be read"),
        (
            "from huggingface_hub.errors import HFValidationError",
            "HFValidationError(\"Cannot have -- or .. in repo_id: 'user/a..b'.\")",
            2,
            "error: not a valid Hub name: Cannot have -- or .. in repo_id: 'user/a..b'. — write a Hub repo as",
        ),
        (
            "from efm_cli.training.checkpoint import CheckpointError",
            "CheckpointError('checkpoint run/checkpoints/step-00000004 cannot be read')",
            1,
            "error: checkpoint run/checkpoints/step-00000004 cannot be read — move that step folder aside",
        ),
        ("", "IsADirectoryError(21, 'Is a directory', 'run/config.json')", 1, "error: run/config.json: is a folder"),
        ("", "IsADirectoryError(21, 'Is a directory')", 1, "error: a path efm had to use: is a folder, not a file"),
        ("", "NotADirectoryError(20, 'Not a directory', 'a/b')", 1, "error: a/b: part of the path is a file"),
        ("", "PermissionError(13, 'Permission denied', 'w/x')", 1, "error: w/x: permission denied — check the path"),
    ],
)
@pytest.mark.parametrize("debug", [False, True])
def test_known_foreign_errors_are_one_line_with_their_exit_code(
    run_python: Run, imports: str, exception: str, code: int, line: str, debug: bool
) -> None:
    script = _FAILING_MODELS.replace("IMPORTS", imports or "pass").replace("EXCEPTION", exception)
    result = run_python(script, env={"EFM_DEBUG": "1"} if debug else None)
    assert result.returncode == code
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(line), result.stderr
    assert "EFM_DEBUG" not in lines[-1]
    if debug:
        assert lines[0] == "Traceback (most recent call last):"
    else:
        assert lines == lines[-1:]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("translate", "IN", "--model", "user/.."), "'user/..' is neither a folder nor a valid Hub repo name"),
        (("translate", "IN", "--model", "user/a--b"), "Cannot have -- or .. in repo_id"),
        (("translate", "IN", "--model", "runs/missing/model"), "Repo id must be in the form"),
        (("translate", "IN", "--model", "user/x@.."), "is neither a folder nor a Hub repo USER/NAME"),
        (("download", "user/.."), "'user/..' is neither a folder nor a valid Hub repo name"),
        (("download", "user/a..b"), "Cannot have -- or .. in repo_id"),
    ],
)
def test_bad_hub_names_are_usage_errors_before_any_request(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    horses = pictures(tmp_path / "horses", 1)
    code = main([str(horses) if arg == "IN" else arg for arg in args])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and message in captured.err


# --- 12: outputs of earlier runs are never taken for inputs -----------------------------------------------------


def test_a_single_file_lands_beside_its_folder_and_is_not_read_back(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    horses = pictures(Path("horses"), 4, ".jpg")
    code, first, err = report(capsys, "horses/p0.jpg", "--model", str(model))
    assert code == 0, err
    assert first["out"] == str(tmp_path / "horses-to-zebra")
    assert [entry["output"] for entry in first["inputs"]] == [str(tmp_path / "horses-to-zebra" / "p0.jpg")]
    assert sorted(path.name for path in horses.iterdir()) == [f"p{i}.jpg" for i in range(4)]  # nothing added
    code, again, err = report(capsys, "horses", "--model", str(model), "--skip-existing")
    assert code == 0, err
    assert len(again["inputs"]) == 4
    assert [entry["status"] for entry in again["inputs"]] == ["existing"] + ["translated"] * 3


def test_marked_output_folders_inside_a_scanned_folder_are_skipped(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path
) -> None:
    photos = tmp_path / "photos"
    pictures(photos / "horses", 3)
    code, _, err = report(capsys, str(photos / "horses"), "--model", str(model))
    assert code == 0, err
    out = photos / "horses-to-zebra"
    assert (out / OUTPUT_MARKER).is_file() and len(list(out.glob("*.png"))) == 3
    for inputs in ([str(photos)], [f"{photos}/**/*.png"], [f"{photos}/*"]):
        code, later, err = report(capsys, *inputs, "--model", str(model), "-o", str(tmp_path / "later"))
        assert code == 0, err
        assert sorted(Path(entry["path"]).name for entry in later["inputs"]) == ["p0.png", "p1.png", "p2.png"], inputs
        assert not any("horses-to-zebra" in entry["path"] for entry in later["inputs"])
    code, back, err = report(capsys, str(out), "--to", "horse", "--model", str(model))  # named: used as given
    assert code == 0 and len(back["inputs"]) == 3, err


def test_a_folder_given_with_out_is_the_users_and_stays_unmarked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path
) -> None:
    horses = pictures(tmp_path / "horses", 1)
    code, _, err = report(capsys, str(horses), "--model", str(model), "-o", str(tmp_path / "mine"))
    assert code == 0, err
    assert sorted(path.name for path in (tmp_path / "mine").iterdir()) == ["p0.png"]


# --- 16: even layouts, absolute paths, unwrapped tables, honest summaries, quiet broken pipes --------------------


def test_a_glob_and_a_file_of_one_folder_land_side_by_side(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    make_tree(Path("horses"))
    code, mixed, err = report(capsys, "horses/*.jpg", "horses/a/grey.png", "--model", str(model))
    assert code == 0, err
    out = tmp_path / "horses-to-zebra"
    assert mixed["out"] == str(out)  # as for `efm translate horses`, absolute like every path of the report
    outputs = {Path(entry["path"]).as_posix(): entry["output"] for entry in mixed["inputs"]}
    assert outputs == {
        str(tmp_path / "horses" / name): str(out / Path(name).name)
        for name in ("photo.jpg", "rotated.jpg", "a/grey.png")
    }
    code, globs, err = report(capsys, "horses/*.jpg", "horses/a/*.png", "--model", str(model), "-o", "two")
    assert code == 0, err  # two globs of one folder do not clash: each match is named relative to its glob
    assert {Path(entry["output"]).relative_to(tmp_path / "two").as_posix() for entry in globs["inputs"]} == {
        "photo.jpg",
        "rotated.jpg",
        "alpha.png",
        "grey.png",
    }


def test_report_paths_are_absolute_however_the_inputs_were_given(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    pictures(Path("horses"), 1)
    grid = "sheet.png"
    code, first, err = report(capsys, "horses", "--model", str(model), "--grid", grid)
    assert code == 0, err
    assert first["out"] == str(tmp_path / "horses-to-zebra")
    assert first["pictures"] == {"grid": str(tmp_path / grid)}
    assert first["inputs"][0]["path"] == str(tmp_path / "horses" / "p0.png")
    assert first["inputs"][0]["output"] == str(tmp_path / "horses-to-zebra" / "p0.png")
    code, dot, err = report(capsys, ".", "--model", str(model), "-o", "o")
    assert code == 0, err
    assert dot["out"] == str(tmp_path / "o")
    assert all(os.path.isabs(entry["path"]) and os.path.isabs(entry["output"]) for entry in dot["inputs"])


def test_tables_are_not_wrapped_when_stdout_is_not_a_terminal(run_efm: Run, tmp_path: Path) -> None:
    name = "a-capacitor-with-a-name-long-enough-to-need-more-than-eighty-columns-in-the-models-table"
    make_capacitor().save_pretrained(tmp_path / "weights" / name)
    result = run_efm("models", env={"EFM_WEIGHTS_DIR": str(tmp_path / "weights"), "HF_HUB_CACHE": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if name in line]
    assert "horse ↔ zebra" in row and "embedded" in row


def test_the_summary_has_no_made_up_rate_when_nothing_was_translated(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path
) -> None:
    horses = pictures(tmp_path / "horses", 2)
    assert main(["translate", str(horses), "--model", str(model)]) == 0
    assert "img/s" in capsys.readouterr().err
    assert main(["translate", str(horses), "--model", str(model), "--skip-existing"]) == 0
    err = capsys.readouterr().err
    assert "done: 0 translated, 2 kept, 0 skipped, 0 failed" in err
    assert "img/s" not in err and "NFE" not in err


@pytest.mark.parametrize("args", [["--help"], ["translate", "--help"], ["models"], ["env", "--json"]])
def test_a_closed_stdout_ends_quietly_with_success(args: list[str]) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "efm_cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **FAST},
    )
    process.stdout.close()  # the reader is gone before efm writes: `efm --help | true`
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 0
    assert stderr == b""


def test_good_inputs_still_translate(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path) -> None:
    """The traps above change no ordinary run: a mixed tree gives every good file, in the same tree."""
    horses = make_tree(tmp_path / "horses")
    code, done, err = report(capsys, str(horses), "--model", str(model))
    assert code == 3, err
    out = tmp_path / "horses-to-zebra"
    assert {entry["output"] for entry in done["inputs"] if entry["status"] == "translated"} == {
        str(out / name) for name in GOOD
    }
