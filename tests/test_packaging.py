"""The wheel carries everything `efm translate --to DOMAIN` needs on a fresh install: the embedded capacitors."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_every_embedded_capacitor_file_under_the_package(tmp_path: Path) -> None:
    offline = ["--no-deps", "--no-build-isolation", "-q"]
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), *offline, "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("efm_cli-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    embedded = {
        "efm_cli/weights/" + p.relative_to(ROOT / "weights").as_posix()
        for p in (ROOT / "weights").rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT / "weights").parts)
    }
    assert "efm_cli/weights/README.md" in embedded
    assert embedded <= names, sorted(embedded - names)
    code = {"efm_cli/cli/app.py", "efm_cli/cli/translate.py", "efm_cli/capacitor/model.py", "efm_cli/training/step.py"}
    assert code <= names
