"""Decoding, tensor conversion, atomic saving and folder scanning of `efm_cli.images`, on files made in tmp_path."""

import os
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from efm_cli import images
from efm_cli.images import (
    OUTPUT_MARKER,
    ImageError,
    find_images,
    from_tensor,
    in_output_folder,
    load,
    save_atomic,
    to_tensor,
)

WIDTH, HEIGHT = 12, 8


def _rgb(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (WIDTH, HEIGHT), 0)
    image.putpalette([0, 0, 0, 255, 0, 0])
    image.paste(1, (0, 0, WIDTH // 2, HEIGHT))
    image.info["transparency"] = 0
    return image


def _sixteen_bit() -> Image.Image:
    ramp = np.linspace(0, 65535, WIDTH * HEIGHT).round().astype(np.uint16).reshape(HEIGHT, WIDTH)
    return Image.fromarray(ramp)


MODES: dict[str, tuple[Callable[[], Image.Image], str, bool]] = {
    "RGB": (lambda: Image.fromarray(_rgb()), "jpg", False),
    "L": (lambda: Image.fromarray(_rgb()[:, :, 0]), "png", False),
    "LA": (lambda: Image.fromarray(_rgb()[:, :, :2].copy()).convert("LA"), "png", True),
    "P": (_palette_with_transparency, "png", True),
    "RGBA": (lambda: Image.fromarray(np.dstack([_rgb(), _rgb(seed=1)[:, :, 0]])), "png", True),
    "CMYK": (lambda: Image.new("CMYK", (WIDTH, HEIGHT), (0, 255, 255, 0)), "tiff", False),
    "I;16": (_sixteen_bit, "png", False),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_loads_as_uint8_rgb_with_alpha_only_when_present(tmp_path: Path, mode: str) -> None:
    make, suffix, has_alpha = MODES[mode]
    source = make()
    path = tmp_path / f"in.{suffix}"
    source.save(path)
    assert Image.open(path).mode == mode  # the file really is in the mode under test

    loaded = load(path)

    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (HEIGHT, WIDTH, 3)
    assert loaded.size == (WIDTH, HEIGHT) and loaded.mode == mode
    assert (loaded.alpha is not None) == has_alpha
    if loaded.alpha is not None:
        assert loaded.alpha.dtype == np.uint8 and loaded.alpha.shape == (HEIGHT, WIDTH)


def test_palette_transparency_becomes_alpha(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    _palette_with_transparency().save(path)
    loaded = load(path)
    assert loaded.alpha is not None
    assert (loaded.alpha[:, : WIDTH // 2] == 255).all() and (loaded.alpha[:, WIDTH // 2 :] == 0).all()
    assert (loaded.rgb[:, : WIDTH // 2] == [255, 0, 0]).all()


def test_cmyk_converts_to_the_matching_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tiff"
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(path)
    assert (load(path).rgb == [255, 0, 0]).all()


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    _sixteen_bit().save(path)
    loaded = load(path)
    grey = loaded.rgb[:, :, 0].ravel()
    assert (loaded.rgb == loaded.rgb[:, :, :1]).all()
    assert grey[0] == 0 and grey[-1] == 255
    assert (np.diff(grey.astype(int)) >= 0).all()
    assert len(np.unique(grey)) > WIDTH * HEIGHT // 2  # spread over the range, not saturated at 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:6, :6] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    loaded = load(path)

    assert loaded.size == (20, 40) and loaded.rgb.shape == (40, 20, 3)
    assert loaded.rgb[:4, -4:].min() > 200  # the corner turned to the top right
    assert loaded.rgb[-4:, :4].max() < 50 and loaded.rgb[:4, :4].max() < 50


@pytest.mark.parametrize("suffix", ["gif", "tiff"])
def test_multi_frame_files_give_the_first_frame(tmp_path: Path, suffix: str) -> None:
    red, green, blue = (Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in ("red", "lime", "blue"))
    path = tmp_path / f"frames.{suffix}"
    red.save(path, save_all=True, append_images=[green, blue])
    assert Image.open(path).n_frames == 3

    assert (load(path).rgb == [255, 0, 0]).all()


def _jpeg_bytes() -> bytes:
    buffer = BytesIO()
    Image.fromarray(_rgb(64, 64)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg_bytes()


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        pytest.param("empty.jpg", b"", "empty file", id="empty"),
        pytest.param("half.jpg", JPEG[: len(JPEG) // 2], "truncated or corrupt", id="truncated"),
        pytest.param("text.png", b"just some words, not pixels\n", "not an image", id="text"),
    ],
)
def test_unreadable_inputs_raise_with_a_reason_and_stay_untouched(
    tmp_path: Path, name: str, content: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as raised:
        load(path)
    assert str(raised.value) == reason
    assert path.read_bytes() == content


@pytest.mark.parametrize("pixels", [150, 400])  # above the limit (PIL warns), above twice the limit (PIL raises)
def test_images_over_the_bomb_limit_are_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pixels: int) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (pixels // 10, 10)).save(path)
    content = path.read_bytes()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError) as raised:
        load(path)
    assert str(raised.value) == f"too large ({pixels} pixels, limit 100)"
    assert path.read_bytes() == content


def test_missing_file_is_an_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read"):
        load(tmp_path / "nowhere.png")


@pytest.mark.parametrize("mode", ["resize", "crop"])
def test_to_tensor_shape_dtype_range(mode: str) -> None:
    t = to_tensor(_rgb(50, 30), 16, mode=mode)
    assert t.shape == (3, 16, 16) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1 and t.min() < -0.5 and t.max() > 0.5


def test_crop_keeps_the_centre_and_resize_keeps_everything() -> None:
    wide = np.zeros((20, 60, 3), dtype=np.uint8)
    wide[:, 28:32] = 255  # a vertical stripe in the middle
    wide[:, :4, 0] = 255  # red bars at both far edges
    wide[:, -4:, 0] = 255

    cropped = to_tensor(wide, 20, mode="crop")
    assert cropped[:, :, 9:11].min() > 0.9  # the stripe, now in the centre of the square
    assert cropped[0, :, :2].max() < -0.9 and cropped[0, :, -2:].max() < -0.9  # the edges are cut away

    squashed = to_tensor(wide, 20, mode="resize")
    assert squashed[0, :, 0].min() > 0.5 and squashed[0, :, -1].min() > 0.5


def test_round_trip_of_a_smooth_image_is_within_a_few_levels() -> None:
    y, x = np.mgrid[0:32, 0:48]
    smooth = np.stack([x * 5, y * 7, (x + y) * 3], axis=2).astype(np.uint8)

    assert np.array_equal(from_tensor(to_tensor(smooth[:, :32], 32), (32, 32)), smooth[:, :32])
    back = from_tensor(to_tensor(smooth, 32), (48, 32))
    assert back.shape == smooth.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - smooth.astype(int))[2:-2, 2:-2].max() <= 3


def test_from_tensor_rounds_and_clamps() -> None:
    levels = torch.tensor([100.6, 100.4, 400.0, -80.0]) / 127.5 - 1  # pixel values 101, 100, clamped 255 and 0
    t = levels.view(1, 1, 4).expand(3, 5, 4)
    out = from_tensor(t, (4, 5))
    assert out.shape == (5, 4, 3)
    assert out[0, :, 0].tolist() == [101, 100, 255, 0]
    assert from_tensor(t, (9, 7)).shape == (7, 9, 3)


def _leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.endswith(".tmp")]


@pytest.mark.parametrize("suffix", ["jpg", "png", "webp"])
def test_save_atomic_writes_readable_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / "nested" / "deeper" / f"out.{suffix}"
    save_atomic(path, _rgb())
    with Image.open(path) as written:
        assert written.size == (WIDTH, HEIGHT) and written.mode == "RGB"
    assert _leftovers(path.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(("suffix", "mode"), [("png", "RGBA"), ("webp", "RGBA"), ("jpg", "RGB"), ("bmp", "RGB")])
def test_alpha_is_kept_where_the_format_has_one(tmp_path: Path, suffix: str, mode: str) -> None:
    alpha = np.linspace(0, 255, WIDTH * HEIGHT).astype(np.uint8).reshape(HEIGHT, WIDTH)
    path = tmp_path / f"out.{suffix}"
    save_atomic(path, _rgb(), alpha=alpha)
    with Image.open(path) as written:
        assert written.mode == mode
    if suffix == "png":
        assert np.array_equal(load(path).alpha, alpha)


def test_explicit_format_wins_over_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "out.img"
    save_atomic(path, _rgb(), format="png")
    assert load(path).format == "PNG"
    with pytest.raises(ValueError, match="format"):
        save_atomic(tmp_path / "out.unknown", _rgb())


def test_failed_save_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"half an image")  # type: ignore[arg-type]
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", broken_save)
        with pytest.raises(OSError, match="disk full"):
            save_atomic(tmp_path / "out.png", _rgb())
    with pytest.raises(KeyError):
        save_atomic(tmp_path / "out.png", _rgb(), format="NOPE")
    assert os.listdir(tmp_path) == []


def test_existing_file_keeps_its_old_content_until_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.png"
    path.write_bytes(b"old")
    real_replace = os.replace
    seen: list[bytes] = []

    def checking_replace(source: Path, target: Path) -> None:
        seen.append(Path(target).read_bytes())
        assert load(source).size == (WIDTH, HEIGHT)  # the temporary file is complete before it is renamed
        real_replace(source, target)

    monkeypatch.setattr(images.os, "replace", checking_replace)
    save_atomic(path, _rgb())
    assert seen == [b"old"]
    assert load(path).size == (WIDTH, HEIGHT)
    assert os.listdir(tmp_path) == ["out.png"]


def test_find_images_recurses_sorted_skipping_hidden_and_links(tmp_path: Path) -> None:
    for relative in [
        "z.Tiff",
        "b/sub/g.webp",
        "a.JPG",
        "b/c.png",
        "b.png",
        "b/notes.txt",
        "b/.f.png",
        ".hidden/e.png",
        "b/sub/.cache/h.jpg",
        "noext",
    ]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "b" / "sub" / "loop").symlink_to(tmp_path / "b", target_is_directory=True)
    (tmp_path / "b" / "folder.png").mkdir()

    found = find_images(tmp_path)

    expected = ["a.JPG", "b.png", "b/c.png", "b/sub/g.webp", "z.Tiff"]
    assert [p.relative_to(tmp_path).as_posix() for p in found] == expected


def test_find_images_skips_marked_output_folders_below_the_root(tmp_path: Path) -> None:
    for name in ("a.png", "out/b.png", "out/deeper/c.png", "sub/d.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "out" / OUTPUT_MARKER).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == ["a.png", "sub/d.png"]
    assert len(find_images(tmp_path / "out")) == 2  # a marked folder given itself is searched
    assert in_output_folder(tmp_path / "out" / "deeper" / "c.png", tmp_path)
    assert in_output_folder(tmp_path / "out", tmp_path)
    assert not in_output_folder(tmp_path / "sub" / "d.png", tmp_path)
    assert not in_output_folder(tmp_path / "out" / "b.png", tmp_path / "out")
