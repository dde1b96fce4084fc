"""What users and scripts rely on from `efm`: streams, exit codes, one-line errors, the env report.

Exit-code and stream tests run real subprocesses (`python -m efm_cli`, the `efm` script) so they test what a
shell sees, not an in-process approximation.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sysconfig

import pytest

import efm_cli
from efm_cli.cli import console

SECRET = "hf_secret123"
ESC = "\x1b["

# Patches env gathering to raise EXCEPTION, then runs the real `main(["env"])`.
_FAILING_ENV = """
import sys
import typer
from efm_cli import env
from efm_cli.cli.app import main
from efm_cli.errors import EfmError, UsageError

def fail():
    raise EXCEPTION

env.gather = fail
sys.exit(main(["env"]))
"""


def _efm_script() -> str:
    search = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    script = shutil.which("efm", path=search)
    if script is None:
        pytest.fail("the `efm` console script is not installed: run python3 -m pip install -e '.[test]'")
    return script


def test_version_from_console_script() -> None:
    result = subprocess.run([_efm_script(), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout == f"efm {efm_cli.__version__}\n"
    assert result.stderr == ""


def test_version_from_python_m_matches_package_metadata(run_efm) -> None:
    result = run_efm("--version")
    assert result.returncode == 0
    assert result.stdout == "efm 0.1.0\n"
    assert importlib.metadata.version("efm-cli") == efm_cli.__version__ == "0.1.0"


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_commands_with_an_example(run_efm, flag: str) -> None:
    result = run_efm(flag)
    assert result.returncode == 0
    assert "env" in result.stdout
    assert "Example" in result.stdout
    assert result.stderr == ""


def test_env_help_documents_flags_and_an_example(run_efm) -> None:
    result = run_efm("env", "-h")
    assert result.returncode == 0
    for text in ("--json", "--quiet", "-q", "Example", "efm env --json"):
        assert text in result.stdout


def test_no_arguments_shows_help_and_exits_2(run_efm) -> None:
    result = run_efm()
    assert result.returncode == 2
    assert "Usage" in result.stdout
    assert "env" in result.stdout
    assert result.stderr == ""


def test_help_and_version_do_not_import_heavy_modules(run_python) -> None:
    code = """
import contextlib, io, json, sys
from efm_cli.cli.app import main
with contextlib.redirect_stdout(io.StringIO()):
    codes = [main(["--help"]), main(["env", "--help"]), main(["--version"])]
heavy = ("torch", "torchvision", "numpy", "scipy", "PIL", "huggingface_hub", "safetensors")
print(json.dumps({"codes": codes, "imported": [name for name in heavy if name in sys.modules]}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome == {"codes": [0, 0, 0], "imported": []}


def test_env_json_reports_documented_keys_and_hides_the_token(run_efm, tmp_path) -> None:
    import torch

    # FORCE_COLOR makes stdout look like a terminal: the JSON must stay plain and parseable anyway.
    env = {"HF_TOKEN": SECRET, "EFM_CACHE": str(tmp_path), "FORCE_COLOR": "1"}
    result = run_efm("env", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"versions", "devices", "paths", "hub", "problems"}
    versions = report["versions"]
    assert versions["efm"] == efm_cli.__version__
    assert versions["torch"] == torch.__version__
    assert versions["torch_cuda"] == torch.version.cuda
    for name in ("python", "platform", "torchvision", "typer", "click", "rich", "pillow", "safetensors"):
        assert versions[name], name
    for name in ("huggingface_hub", "numpy", "scipy", "torch_hip"):
        assert name in versions
    devices = report["devices"]
    assert devices["cuda_device_count"] == len(devices["cuda_devices"])
    assert isinstance(devices["cuda_available"], bool)
    assert isinstance(devices["mps_available"], bool)
    assert devices["torch_threads"] >= 1
    paths = report["paths"]
    assert set(paths) == {
        "efm_package",
        "embedded_weights",
        "embedded_weights_exists",
        "efm_cache",
        "hf_hub_cache",
    }
    assert paths["embedded_weights"].endswith("weights")
    assert paths["efm_cache"] == str(tmp_path)
    assert set(report["hub"]) == {"endpoint", "offline", "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN"}
    assert report["hub"]["HF_TOKEN"] == "set"


def test_env_table_is_quiet_plain_and_hides_the_token(run_efm) -> None:
    import torch

    result = run_efm("env", "-q", env={"HF_TOKEN": SECRET, "NO_COLOR": "1", "FORCE_COLOR": "1"})
    assert result.returncode == 0
    assert result.stderr == ""
    assert torch.__version__ in result.stdout
    assert SECRET not in result.stdout
    assert ESC not in result.stdout


@pytest.mark.parametrize(
    ("args", "help_command"),
    [(("env", "--bogus"), "efm env"), (("nope",), "efm"), (("env", "extra"), "efm env")],
)
def test_usage_error_is_one_line_and_exits_2(run_efm, args: tuple[str, ...], help_command: str) -> None:
    result = run_efm(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert lines[0].endswith(f" — see '{help_command} --help'")


def test_misspelt_command_gets_one_suggestion(run_efm) -> None:
    result = run_efm("en")
    assert result.returncode == 2
    assert result.stderr.count("Did you mean 'env'?") == 1


# Runs `efm ARGS...` with torch made unimportable, as in a broken install; also keeps tests fast.
_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from efm_cli.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("quiet", [False, True])
def test_env_reports_a_broken_torch_instead_of_crashing(run_python, quiet: bool) -> None:
    result = run_python(_WITHOUT_TORCH, "env", "--json", *(["-q"] if quiet else []))
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["versions"]["torch"] is None
    assert report["devices"]["cuda_available"] is None
    assert report["problems"][0].startswith("torch cannot be imported")
    assert report["hub"]["HF_TOKEN"] == "not set"
    if quiet:
        assert result.stderr == ""
    else:
        assert result.stderr.startswith("warning: torch cannot be imported")


def test_no_color_output_has_no_escape_codes(run_python, run_efm) -> None:
    styled = run_python(_WITHOUT_TORCH, "env", env={"FORCE_COLOR": "1"})
    assert ESC in styled.stdout  # a terminal gets styles, so the checks below can fail
    plain = run_python(_WITHOUT_TORCH, "env", env={"FORCE_COLOR": "1", "NO_COLOR": "1"})
    assert plain.returncode == 0
    assert plain.stderr.startswith("warning:")
    assert ESC not in plain.stdout + plain.stderr
    help_text = run_efm("--help", env={"NO_COLOR": "1"})
    assert ESC not in help_text.stdout + help_text.stderr


@pytest.mark.parametrize(
    ("exception", "exit_code", "stderr_lines"),
    [
        (
            'RuntimeError("boom\\nsecond line")',
            1,
            ["error: RuntimeError: boom second line — rerun with EFM_DEBUG=1 for the traceback"],
        ),
        (
            'UsageError("no such device", hint="pass --device cpu")',
            2,
            ["error: no such device — pass --device cpu"],
        ),
        ('EfmError("nothing to do")', 1, ["error: nothing to do"]),
        ("KeyboardInterrupt()", 130, ["error: interrupted"]),
        ("typer.Exit(3)", 3, []),
        ("SystemExit(4)", 4, []),
    ],
)
def test_failures_map_to_one_line_and_exit_code(
    run_python, exception: str, exit_code: int, stderr_lines: list[str]
) -> None:
    result = run_python(_FAILING_ENV.replace("EXCEPTION", exception))
    assert result.returncode == exit_code
    assert result.stderr.splitlines() == stderr_lines
    assert result.stdout == ""


def test_efm_debug_shows_a_plain_traceback_and_still_the_error_line(run_python) -> None:
    result = run_python(_FAILING_ENV.replace("EXCEPTION", 'RuntimeError("boom")'), env={"EFM_DEBUG": "1"})
    assert result.returncode == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "\nRuntimeError: boom\n" in result.stderr
    assert result.stderr.splitlines()[-1] == "error: RuntimeError: boom"
    assert "╭" not in result.stderr  # no Rich panel, hence no local variables


def test_error_line_format() -> None:
    assert console.format_error("model not found") == "error: model not found"
    assert console.format_error("model not found", "run efm models") == "error: model not found — run efm models"
    assert console.format_error("two\nlines", "hint\n") == "error: two lines — hint"


def test_quiet_silences_messages_not_errors(monkeypatch, capsys) -> None:
    monkeypatch.setattr(console, "_quiet", False)
    console.info("[cyan]loading[/] a[1].png")
    console.warn("skipped b.png")
    console.set_quiet(True)
    console.info("hidden")
    console.warn("hidden")
    console.print_error("still shown")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "[cyan]loading[/] a[1].png",
        "warning: skipped b.png",
        "error: still shown",
    ]


def test_long_messages_stay_on_one_line_in_logs(monkeypatch, capsys) -> None:
    """A skipped file's path must survive `grep` in a log: messages are never wrapped at the console width."""
    monkeypatch.setattr(console, "_quiet", False)
    path = "/data/" + "very-long-folder-name/" * 10 + "image with spaces.png"
    console.warn(f"skipped {path}: truncated or corrupt")
    console.info(f"wrote {path}")
    assert capsys.readouterr().err.splitlines() == [f"warning: skipped {path}: truncated or corrupt", f"wrote {path}"]
