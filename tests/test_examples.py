"""The example scripts do what examples/README.md says."""

import json
import os
import shutil
import subprocess
from pathlib import Path

from PIL import Image
from test_translate import make_capacitor

ROOT = Path(__file__).resolve().parents[1]


def test_shard_script_translates_every_file_once_and_a_rerun_keeps_them(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    make_capacitor().save_pretrained(weights / "horse2zebra")
    photos = tmp_path / "photos"
    for i, example in enumerate(sorted((ROOT / "examples" / "horses").iterdir())):
        target = photos / f"set{i % 2}" / example.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(example, target)
    out = tmp_path / "out"
    env = {**os.environ, "EFM_WEIGHTS_DIR": str(weights), "OMP_NUM_THREADS": "1"}
    script = [str(ROOT / "examples" / "translate_shards.sh"), str(photos), str(out), "zebra", "2"]
    done = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    inputs = sorted(p.relative_to(photos) for p in photos.rglob("*.jpg"))
    assert sorted(p.relative_to(out) for p in out.rglob("*.jpg")) == inputs
    for relative in inputs:
        with Image.open(out / relative) as image:
            assert image.size == (256, 256)
    reports = [json.loads(p.read_text()) for p in sorted(out.glob(".shard-*-of-2.json"))]
    written = [r["output"] for report in reports for r in report["inputs"]]
    assert sorted(written) == sorted(str(out / p) for p in inputs)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")}
    again = subprocess.run(script, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.jpg")} == mtimes
