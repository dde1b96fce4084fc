"""Defaults an unknown pair gets without flags: the training size fits the images, random flips only for plates
that look mirror-symmetric, and OpenMP yields shared cores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_AE
from PIL import Image

from efm_cli.threads import SPIN_COUNT, share_cores
from efm_cli.training.data import MIRROR_LIMIT, fitting_size, mirror_asymmetry
from efm_cli.training.run import flips_message, new_settings


def pictures(folder: Path, sides: list[tuple[int, int]]) -> Path:
    """One flat grey picture per (width, height)."""
    folder.mkdir(parents=True)
    for i, (width, height) in enumerate(sides):
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize(
    ("sides", "size"),
    [
        ([(32, 32)] * 5, 32),  # coloured digits train at their own size
        ([(256, 256)] * 5, 64),  # photos at the size a CPU affords
        ([(300, 44)] * 5, 40),  # the shorter side counts, rounded down to a multiple of 8
        ([(20, 20)] * 5, 32),  # tiny images are enlarged to the smallest measured size, no further
        ([(50, 50), (50, 50), (500, 500)], 48),  # the median, not an outlier
    ],
)
def test_the_default_size_follows_the_images(tmp_path: Path, sides: list[tuple[int, int]], size: int) -> None:
    assert fitting_size([pictures(tmp_path / "a", sides)], 8) == size


def test_the_smaller_plate_decides_and_a_latent_run_keeps_its_multiple(tmp_path: Path) -> None:
    small = pictures(tmp_path / "small", [(40, 40)] * 3)
    large = pictures(tmp_path / "large", [(256, 256)] * 3)
    assert fitting_size([small, large], 8) == 40
    assert fitting_size([small, large], 16) == 32
    assert fitting_size([tmp_path / "large"], 16) == 64


def test_new_settings_fits_the_size_unless_given_and_the_width_follows(tmp_path: Path) -> None:
    source = pictures(tmp_path / "two", [(32, 32)] * 3)
    target = pictures(tmp_path / "three", [(32, 32)] * 3)
    fitted = new_settings(str(source), str(target), charges=32)
    assert fitted.prep.size == 32
    assert fitted.field.S == 5.0  # the tube width of 32×32 images, not of 64×64
    given = new_settings(str(source), str(target), size=64, charges=32)
    assert (given.prep.size, given.field.S) == (64, 10.0)


def test_a_latent_run_fits_its_size_to_the_autoencoder(tmp_path: Path) -> None:
    from efm_cli.autoencoder import Autoencoder

    autoencoder = Autoencoder(TINY_AE)
    folder = autoencoder.save(tmp_path / "ae")
    factor = autoencoder.factor
    source = pictures(tmp_path / "a", [(60, 60)] * 3)
    target = pictures(tmp_path / "b", [(60, 60)] * 3)
    settings = new_settings(str(source), str(target), charges=32, latent=str(folder))
    assert settings.prep.size % (8 * factor) == 0 and settings.prep.size <= 60


def test_share_cores_sets_a_short_spin_unless_the_user_chose() -> None:
    environ: dict[str, str] = {}
    share_cores(environ)
    assert environ == {"GOMP_SPINCOUNT": SPIN_COUNT}
    for chosen in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        environ = dict(chosen)
        share_cores(environ)
        assert environ == chosen


@pytest.mark.parametrize(
    ("extra", "spin", "policy"),
    [({}, SPIN_COUNT, None), ({"OMP_WAIT_POLICY": "PASSIVE"}, None, "PASSIVE"), ({"GOMP_SPINCOUNT": "7"}, "7", None)],
)
def test_efm_runs_torch_with_the_spin_in_effect(
    run_python, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str], spin: str | None, policy: str | None
) -> None:
    """The setting is in the environment before any command imports torch (libgomp reads it once, at load)."""
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)  # an in-process `main()` of another test may have set it
    probe = (
        "import os, sys\n"
        "from efm_cli.cli.app import main\n"
        "assert 'torch' not in sys.modules\n"
        "code = main(['env', '--json'])\n"
        "print(os.environ.get('GOMP_SPINCOUNT'), file=sys.stderr)\n"
        "raise SystemExit(code)\n"
    )
    result = run_python(probe, env=extra)
    assert result.returncode == 0, result.stderr
    devices = json.loads(result.stdout)["devices"]
    assert (devices["GOMP_SPINCOUNT"], devices["OMP_WAIT_POLICY"]) == (spin, policy)
    assert result.stderr.strip().splitlines()[-1] == str(spin)


def glyphs(folder: Path, count: int, seed: int, *, mirrored_too: bool = False) -> Path:
    """'L'-shaped strokes of random colour and jitter: a domain whose mirror images (a reversed L) it never shows.
    With `mirrored_too`, every picture also comes mirrored, so the plate's distribution is mirror-symmetric."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        image = np.zeros((32, 32, 3), np.uint8)
        x, y = (int(v) for v in rng.integers(4, 9, 2))
        colour = rng.integers(80, 256, 3, dtype=np.uint8)
        image[y : y + 20, x : x + 4] = colour
        image[y + 16 : y + 20, x : x + 14] = colour
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        if mirrored_too:
            Image.fromarray(image[:, ::-1]).save(folder / f"{i:03d}-mirrored.png")
    return folder


def noise(folder: Path, count: int, seed: int) -> Path:
    """Independent uniform noise pictures: mirror-symmetric in distribution, asymmetric in any finite sample."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_mirror_asymmetry_tells_one_handed_pictures_from_symmetric_ones_whatever_their_mean(
    tmp_path: Path,
) -> None:
    from efm_cli.images import find_images

    one_handed = mirror_asymmetry(find_images(glyphs(tmp_path / "l", 60, seed=0)))
    both_hands = mirror_asymmetry(find_images(glyphs(tmp_path / "both", 30, seed=0, mirrored_too=True)))
    sampled = mirror_asymmetry(find_images(noise(tmp_path / "noise", 200, seed=1)))
    assert one_handed == 1.0  # no reversed L is as close to an L as the nearest other L
    assert both_hands == 0.0  # every mirror image is in the plate itself
    # Noise is symmetric in distribution: a mirrored picture is as likely to be the closer one, whatever the sample.
    assert sampled is not None and abs(sampled - 0.5) < 0.1 and sampled < MIRROR_LIMIT
    mixed = tmp_path / "mixed"  # half turned upside down: a nearly symmetric mean picture, one-handed pictures
    mixed.mkdir()
    for i, path in enumerate(find_images(glyphs(tmp_path / "l2", 60, seed=4))):
        picture = np.asarray(Image.open(path))
        Image.fromarray(np.ascontiguousarray(picture[::-1, ::-1] if i % 2 else picture)).save(mixed / path.name)
    assert (mirror_asymmetry(find_images(mixed)) or 0.0) > MIRROR_LIMIT
    assert mirror_asymmetry([tmp_path / "missing.png"]) is None


def test_flips_are_on_by_default_only_when_both_plates_look_mirror_symmetric(tmp_path: Path) -> None:
    letters, shapes_ = glyphs(tmp_path / "letters", 30, seed=0), noise(tmp_path / "shapes", 30, seed=2)
    symmetric = glyphs(tmp_path / "both", 15, seed=3, mirrored_too=True)
    one_handed = new_settings(str(letters), str(shapes_))
    assert one_handed.prep.hflip is False and one_handed.mirror is not None
    assert one_handed.mirror["source"] > MIRROR_LIMIT > one_handed.mirror["target"]
    message = flips_message(one_handed)
    assert message is not None and message.startswith("random flips off") and "--hflip" in message
    assert "letters" in message and "shapes" in message
    both = new_settings(str(symmetric), str(shapes_))
    assert both.prep.hflip is True and "--no-hflip" in (flips_message(both) or "")
    assert new_settings("noise", str(symmetric)).prep.hflip is True  # a noise plate has no pictures to measure
    chosen = new_settings(str(letters), str(shapes_), hflip=True)
    assert chosen.prep.hflip is True and chosen.mirror is None and flips_message(chosen) is None
    settings = json.loads(json.dumps(one_handed.to_json()))
    assert type(one_handed).from_json(settings) == one_handed  # --resume reads the same choice back
