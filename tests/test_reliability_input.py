"""Bad input for `efm translate` and `efm train`: every odd file gets its documented outcome, never a traceback.

Translate skips what it cannot read (with the reason, exit 3) and translates every other kind of picture at its own
pixel size; train ignores the same files with the same reasons. Folders that give nothing to work on, or the same
pictures on both plates, are one-line errors that leave nothing behind.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line, shapes, tree
from PIL import Image

from efm_cli.cli.app import main

FAST_SOLVER = ("--solver", "euler", "--steps", "2")
TRAIN = ["--size", "16", "--network", "tiny", "--charges", "4", "--batch-size", "2", "--steps", "2", "--warmup", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    channels = len(Image.new(mode, (1, 1)).getbands())
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, "L" if channels == 1 else None).convert(mode)


def _bomb_png() -> bytes:
    """A PNG whose header claims 100000×100000 pixels (far above PIL's bomb limit) with next to no data."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    chunk = b"IHDR" + struct.pack(">II", 100_000, 100_000) + bytes(data[24:29])
    data[12:33] = chunk + struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def _half(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


GOOD = {
    "tiny 1x1.png": (1, 1),
    "long/20000x20.png": (20000, 20),
    "modes/deep16.png": (30, 12),
    "modes/cmyk.jpg": (21, 17),
    "modes/palette.png": (19, 23),
    "modes/la.png": (18, 14),
    "modes/rgba.webp": (16, 20),
    "modes/rotated.jpg": (20, 30),
    "frames/animated.gif": (24, 16),
    "frames/pages.tiff": (24, 16),
    "ünï côdé/馬 with  spaces.png": (15, 13),
}
BAD = {
    "zero.jpg": "empty file",
    "cut.jpg": "truncated or corrupt",
    "cut.png": "truncated or corrupt",
    "text.jpg": "not an image",
    "bomb.png": f"too large (10000000000 pixels, limit {Image.MAX_IMAGE_PIXELS})",
    "links/loop.png": "cannot read (Too many levels of symbolic links)",
    "links/again.png": "cannot read (Too many levels of symbolic links)",
}
ALPHA = ("modes/la.png", "modes/rgba.webp", "modes/palette.png")


def make_inputs(root: Path) -> Path:
    """A folder holding one of each odd input the issue lists, good and bad."""
    for name in [*GOOD, *BAD]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    _noise(1, 1).save(root / "tiny 1x1.png")
    _noise(20000, 20).save(root / "long/20000x20.png")
    Image.fromarray((np.arange(360, dtype=np.uint16).reshape(12, 30) * 181).astype(np.uint16)).save(
        root / "modes/deep16.png"
    )
    _noise(21, 17, "CMYK").save(root / "modes/cmyk.jpg")
    palette = _noise(19, 23).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(root / "modes/palette.png", transparency=3)
    _noise(18, 14, "LA").save(root / "modes/la.png")
    _noise(16, 20, "RGBA").save(root / "modes/rgba.webp", lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30×20, shown rotated: 20 wide, 30 high
    _noise(30, 20).save(root / "modes/rotated.jpg", exif=exif)
    frames = [_noise(24, 16, seed=s) for s in range(3)]
    frames[0].save(root / "frames/animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    frames[0].save(root / "frames/pages.tiff", save_all=True, append_images=frames[1:])
    _noise(15, 13).save(root / "ünï côdé/馬 with  spaces.png")
    (root / "zero.jpg").write_bytes(b"")
    (root / "cut.jpg").write_bytes(_half(_noise(40, 40), "JPEG"))
    (root / "cut.png").write_bytes(_half(_noise(40, 40), "PNG"))
    (root / "text.jpg").write_text("a shopping list, not a picture\n")
    (root / "bomb.png").write_bytes(_bomb_png())
    (root / "links/loop.png").symlink_to("again.png")
    (root / "links/again.png").symlink_to("loop.png")
    (root / "links/up").symlink_to("..", target_is_directory=True)  # a folder loop: never entered
    return root


def test_translate_skips_each_unreadable_file_with_its_reason_and_translates_every_other_kind(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_inputs(tmp_path / "in")
    out = root / "modes" / "out"  # inside the input tree, and already holding a picture: never read as input
    out.mkdir()
    _noise(9, 9).save(out / "leftover.png")
    before = tree(root)
    code = main(["translate", str(root), "--model", str(model), "--out", str(out), "--json", *FAST_SOLVER])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "Traceback" not in captured.err
    report = json.loads(captured.out)
    records = {Path(r["path"]).relative_to(root).as_posix(): r for r in report["inputs"]}
    assert {name: r["reason"] for name, r in records.items() if r["status"] == "skipped"} == BAD
    assert {name for name, r in records.items() if r["status"] == "translated"} == set(GOOD)
    for name, reason in BAD.items():
        assert f"warning: skipped {root / name}: {reason}" in captured.err
        assert not (out / name).exists()
    for name, size in GOOD.items():
        with Image.open(out / name) as written:
            assert written.size == size, name
            assert getattr(written, "n_frames", 1) == 1, name
            assert written.format == Image.open(root / name).format, name
            if name in ALPHA:
                assert written.mode == "RGBA", name
    with Image.open(root / "modes/la.png") as source, Image.open(out / "modes/la.png") as written:
        assert np.array_equal(np.asarray(source)[:, :, 1], np.asarray(written)[:, :, 3])
    assert not [p for p in out.rglob(".*")], "temporary files left behind"
    assert tree(root) == {**before, **{f"modes/out/{k}": v for k, v in tree(out).items()}}  # inputs untouched


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: file permissions do not stop root from reading")
def test_an_unreadable_file_is_skipped_with_the_reason(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    _noise(12, 12).save(root / "ok.png")
    _noise(12, 12).save(root / "locked.png")
    (root / "locked.png").chmod(0)
    code = main(["translate", str(root), "--model", str(model), "--out", str(tmp_path / "out"), *FAST_SOLVER])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"warning: skipped {root / 'locked.png'}: truncated or corrupt" in err or "Permission denied" in err
    assert (tmp_path / "out" / "ok.png").is_file() and not (tmp_path / "out" / "locked.png").exists()


@pytest.mark.parametrize("content", [None, "notes.txt"], ids=["empty-folder", "no-images"])
def test_a_folder_without_images_is_one_error_and_writes_nothing(
    tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    root = tmp_path / "in"
    (root / "deeper").mkdir(parents=True)
    if content:
        (root / "deeper" / content).write_text("hello\n")
    code = main(["translate", str(root), "--model", str(model)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: no images found in {root} — ")
    assert not (tmp_path / "in-to-zebra").exists()
    target = shapes(tmp_path / "discs", "disc", 2, 1)
    run = tmp_path / "run"
    code = main(["train", "--source", str(root), "--target", str(target), *TRAIN, "--out", str(run)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"error: {root} holds no images "), line
    assert not run.exists()


def test_train_ignores_unreadable_files_with_their_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_inputs(tmp_path / "odd")
    target = shapes(tmp_path / "discs", "disc", 4, 1)
    run = tmp_path / "run"
    code = main(["train", "--source", str(source), "--target", str(target), *TRAIN, "--out", str(run), "--json"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    summary = json.loads(captured.out)
    ignored = {Path(item["path"]).relative_to(source).as_posix(): item["reason"] for item in summary["ignored"]}
    assert ignored == BAD
    assert summary["source_images"] == len(GOOD) and summary["step"] == 2
    assert "Traceback" not in captured.err
    assert (run / "model" / "model.safetensors").is_file()


def test_train_refuses_the_same_pictures_on_both_plates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    photos = shapes(tmp_path / "photos", "square", 4, 0)
    shapes(photos / "winter", "disc", 4, 1)
    (tmp_path / "alias").symlink_to(photos, target_is_directory=True)
    for target, message in [
        (photos, "--source and --target are the same"),
        (tmp_path / "alias", "--source and --target are the same"),
        (photos / "winter", f"--target {photos / 'winter'} is inside --source {photos}"),
    ]:
        run = tmp_path / "run"
        code = main(["train", "--source", str(photos), "--target", str(target), *TRAIN, "--out", str(run)])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and line.startswith(f"error: {message} — "), line
        assert not run.exists()
