"""`efm eval`: every metric against an independent float64 reference, the trick test, classifier caching, the CLI,
and the coloured-digits builder."""

import colorsys
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bars, climbing_capacitor, one_error_line
from PIL import Image
from scipy.linalg import sqrtm

from efm_cli.capacitor.format import new_config
from efm_cli.cli import console
from efm_cli.cli.app import main
from efm_cli.evaluation import classifier as clf
from efm_cli.evaluation import report as ev
from efm_cli.network import preset

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist" / "mnist.npz"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the test machine's cores are shared; two threads contend badly


pytestmark = pytest.mark.usefixtures("one_thread")


def solid(rgb: Sequence[float], size: int = 8) -> torch.Tensor:
    """One image [1, 3, size, size] in [−1, 1] of a single colour given in [0, 1]."""
    return (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) * 2 - 1).expand(1, 3, size, size).clone()


# Fréchet distance and KID


def test_frechet_distance_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) + 0.7
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    reference = diff @ diff + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real)
    assert ev.frechet_distance(a, b) == pytest.approx(reference, rel=1e-9)
    assert ev.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert math.isnan(ev.frechet_distance(a[:1], b))


def test_frechet_standard_error_matches_the_spread_over_fresh_draws() -> None:
    """The bootstrap from one draw of held-out features must say how much the FD moves between independent draws."""
    rng = np.random.default_rng(0)
    shift, scale = np.array([0.5, 0, 0, 0]), np.array([1.5, 1, 1, 0.7])

    def draw() -> tuple[np.ndarray, np.ndarray]:
        return rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) * scale + shift

    spread = np.std([ev.frechet_distance(*draw()) for _ in range(400)], ddof=1)
    estimates = [ev.frechet_standard_error(*draw(), seed=seed) for seed in range(8)]
    assert 0.8 < np.mean(estimates) / spread < 1.25
    a, b = draw()
    assert ev.frechet_standard_error(a, b, seed=3) == ev.frechet_standard_error(a, b, seed=3)  # seeded
    assert math.isnan(ev.frechet_standard_error(a[:1], b))


def test_paired_frechet_difference_error_matches_the_spread_over_fresh_draws() -> None:
    """Two translations of the same sources, compared against the same targets: the paired bootstrap must say how
    much their FD difference moves between independent draws of sources and targets, and be far below the cautious
    √(se₁² + se₂²) that two separate reports give, since most of each FD's noise is the shared draw."""
    rng = np.random.default_rng(1)
    shift, scale = np.array([0.5, 0, 0, 0]), np.array([1.5, 1, 1, 0.7])

    def draw() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sources = rng.normal(size=(200, 4))
        first = sources * scale + 0.2 + 0.1 * rng.normal(size=(200, 4))  # a good translation
        second = sources * scale + 0.4 + 0.1 * rng.normal(size=(200, 4))  # the same, a little more off
        return first, second, rng.normal(size=(200, 4)) * scale + shift

    def difference(first: np.ndarray, second: np.ndarray, target: np.ndarray) -> float:
        return ev.frechet_distance(first, target) - ev.frechet_distance(second, target)

    spread = np.std([difference(*draw()) for _ in range(400)], ddof=1)
    estimates = [ev.frechet_difference_standard_error(*draw(), seed=seed) for seed in range(8)]
    assert 0.75 < np.mean(estimates) / spread < 1.33
    first, second, target = draw()
    unpaired = math.hypot(ev.frechet_standard_error(first, target), ev.frechet_standard_error(second, target))
    assert ev.frechet_difference_standard_error(first, second, target) < 0.5 * unpaired
    assert ev.frechet_difference_standard_error(first, first, target) == 0.0
    with pytest.raises(ValueError, match="same rows"):
        ev.frechet_difference_standard_error(first, second[:-1], target)


def test_paired_rate_error_counts_only_the_images_the_two_judge_differently() -> None:
    first = torch.tensor([True, True, False, False])
    second = torch.tensor([True, False, False, False])
    # differences 0, 1, 0, 0: sample standard deviation 0.5, over √4
    assert ev.paired_rate_standard_error(first, second) == pytest.approx(0.25)
    assert ev.paired_rate_standard_error(first, first) == 0.0
    assert math.isnan(ev.paired_rate_standard_error(first[:1], second[:1]))
    gen = torch.Generator().manual_seed(0)
    shared = torch.rand(10_000, generator=gen) < 0.8
    flipped = shared ^ (torch.rand(10_000, generator=gen) < 0.05)
    # 5 % of the verdicts differ, in either direction: the paired error is √0.05/√n, not the unpaired √(2·0.16/n)
    assert ev.paired_rate_standard_error(shared, flipped) == pytest.approx((0.05 / 10_000) ** 0.5, rel=0.05)


def test_rate_standard_error_is_binomial() -> None:
    assert ev.rate_standard_error(0.9, 100) == pytest.approx(0.03)
    assert ev.rate_standard_error(1.0, 50) == 0.0
    assert math.isnan(ev.rate_standard_error(0.5, 0)) and math.isnan(ev.rate_standard_error(math.nan, 10))


def test_kernel_inception_distance_matches_pairwise_sums() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 1

    def k(x: np.ndarray, y: np.ndarray) -> float:
        return (float(x @ y) / 3 + 1) ** 3

    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j) / 42
    bb = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    ab = sum(k(x, y) for x in a for y in b) / 35
    assert ev.kernel_inception_distance(a, b) == pytest.approx(aa + bb - 2 * ab, rel=1e-12)


# SSIM


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of two grey float64 images [H, W]: every 11×11 window's weighted statistics written out directly."""
    offsets = np.arange(11) - 5.0
    g = np.exp(-0.5 * (offsets / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    wx = np.lib.stride_tricks.sliding_window_view(x, (11, 11))
    wy = np.lib.stride_tricks.sliding_window_view(y, (11, 11))
    mx, my = (wx * w).sum(axis=(2, 3)), (wy * w).sum(axis=(2, 3))
    vx = (w * (wx - mx[..., None, None]) ** 2).sum(axis=(2, 3))
    vy = (w * (wy - my[..., None, None]) ** 2).sum(axis=(2, 3))
    cxy = (w * (wx - mx[..., None, None]) * (wy - my[..., None, None])).sum(axis=(2, 3))
    c1, c2 = 0.01**2, 0.03**2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_ssim_matches_a_direct_implementation() -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(size=(2, 1, 20, 24))
    y = np.clip(x + rng.normal(scale=0.2, size=x.shape), 0, 1)
    ours = ev.ssim(torch.from_numpy(x), torch.from_numpy(y))
    for i in range(2):
        assert float(ours[i]) == pytest.approx(reference_ssim(x[i, 0], y[i, 0]), abs=1e-12)


def test_ssim_known_cases() -> None:
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(ev.ssim(x, x), torch.ones(3, dtype=torch.float64))
    a, b = 0.2, 0.7  # flat images: only the luminance term is left
    flat = ev.ssim(torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b))
    assert float(flat) == pytest.approx((2 * a * b + 1e-4) / (a * a + b * b + 1e-4), rel=1e-6)
    assert float(ev.ssim(x[:1], 1 - x[:1])) < 0  # inverted structure
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    assert torch.allclose(ev.structure(images, images), torch.ones(2, dtype=torch.float64))


# Hue


@pytest.mark.parametrize(("hue", "brightness"), [(0, 1.0), (120, 1.0), (240, 0.5), (10, 0.3), (350, 0.8), (95, 1.0)])
def test_dominant_hue_of_known_colours(hue: float, brightness: float) -> None:
    image = solid([brightness * c for c in colorsys.hsv_to_rgb(hue / 360, 1, 1)])
    measured = float(ev.dominant_hue(image))
    assert min(abs(measured - hue), 360 - abs(measured - hue)) < 1e-4


def test_hue_difference_is_circular_and_ignores_the_black_background() -> None:
    stroke = torch.full((2, 3, 8, 8), -1.0)  # black background, a coloured bar
    stroke[0, :, 2:6, 3:5] = solid(colorsys.hsv_to_rgb(350 / 360, 1, 1), 1).view(3, 1, 1) * 1.0
    stroke[1, :, 2:6, 3:5] = solid(colorsys.hsv_to_rgb(100 / 360, 1, 1), 1).view(3, 1, 1) * 1.0
    other = torch.full((2, 3, 8, 8), -1.0)
    other[0, :, 4:7, 1:7] = solid(colorsys.hsv_to_rgb(10 / 360, 1, 0.6), 1).view(3, 1, 1)
    other[1, :, 4:7, 1:7] = solid(colorsys.hsv_to_rgb(220 / 360, 1, 1), 1).view(3, 1, 1)
    assert ev.hue_difference(stroke, other).tolist() == pytest.approx([20.0, 120.0], abs=1e-4)
    grey = solid([0.4, 0.4, 0.4])
    assert math.isnan(float(ev.dominant_hue(grey))) and math.isnan(float(ev.hue_difference(grey, solid([1, 0, 0]))))


def test_mean_abs_change_is_in_8_bit_levels() -> None:
    a = torch.zeros(2, 3, 4, 4)
    assert ev.mean_abs_change(a, a + 20 / 127.5) == pytest.approx(20.0)


# Tricks and the trust test


def test_trick_views_do_what_they_say() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    views = ev.trick_views(images, seed=1)
    assert set(views) == {"desaturate", "greyscale", "darken", "blur", "noise"}
    lum = ev.luminance(images)
    grey = views["greyscale"]
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert torch.allclose(ev.luminance(grey), lum, atol=1e-6)
    chroma = images - clf.greyscale(images)
    assert torch.allclose(views["desaturate"] - clf.greyscale(images), chroma / 2, atol=1e-6)
    torch.testing.assert_close((views["darken"] + 1) / 2, 0.6 * (images + 1) / 2)
    assert views["blur"].var() < images.var() / 2
    flat = solid([0.3, 0.5, 0.7], 32)
    torch.testing.assert_close(ev.trick_views(flat)["blur"], flat)
    noise = views["noise"] - images
    assert 0.1 < float(noise[images.abs() < 0.5].std()) < 0.25
    assert torch.equal(ev.trick_views(images, seed=1)["noise"], views["noise"])
    assert not torch.equal(ev.trick_views(images, seed=2)["noise"], views["noise"])


def saturation(images: torch.Tensor) -> torch.Tensor:
    rgb = (images + 1) / 2
    return (rgb.amax(dim=1) - rgb.amin(dim=1)).mean(dim=(1, 2))


def test_a_classifier_that_judges_colour_is_caught() -> None:
    colourful = torch.stack([solid(colorsys.hsv_to_rgb(h, 0.9, 0.9), 16)[0] for h in np.linspace(0, 0.9, 10)])
    colourful[..., :8] = (colourful[..., :8] + 1) * 0.4 - 1  # content: a darker left half

    def colour_judge(images: torch.Tensor) -> torch.Tensor:
        return saturation(images) < 0.5  # "target" = dull colours: what a lazy classifier learns from zebras

    result = ev.trick_test(colour_judge, colourful)
    assert result.source_rate == 0.0 and not result.trustworthy
    assert {"greyscale", "desaturate"} <= set(result.fooled_by)
    assert result.rates["greyscale"] == 1.0

    def content_judge(images: torch.Tensor) -> torch.Tensor:
        lum = ev.luminance(images)[:, 0]
        return lum[:, :, : lum.shape[-1] // 2].mean(dim=(1, 2)) > lum[:, :, lum.shape[-1] // 2 :].mean(dim=(1, 2))

    assert ev.trick_test(content_judge, colourful).trustworthy


def test_robust_target_needs_every_view() -> None:
    images = torch.cat([solid([0.75] * 3), solid([0.95] * 3)])  # 0.5 and 0.9 in [−1, 1]

    def bright(images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3)) > 0

    assert bright(images).tolist() == [True, True]
    assert ev.robust_target(bright, images).tolist() == [False, True]  # darkened, the first one drops below 0


# The classifier


def test_augment_is_seeded_and_stays_in_range() -> None:
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    a = clf.augment(images, torch.Generator().manual_seed(0))
    b = clf.augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == images.shape and a.abs().max() <= 1
    assert not torch.equal(a, clf.augment(images, torch.Generator().manual_seed(1)))


def test_hue_rotation_keeps_luminance_and_turns_red_into_green() -> None:
    red = solid([0.8, 0.1, 0.1])
    turned = clf.rotate_hue(red, torch.tensor([2 * math.pi / 3]))
    torch.testing.assert_close(ev.luminance(turned), ev.luminance(red))
    assert abs(float(ev.dominant_hue(turned)) - 120) < 25


def test_classifier_is_cached_by_content(tmp_path: Path) -> None:
    bars(tmp_path / "a", True, 12, 0)
    bars(tmp_path / "b", False, 12, 1)
    settings = clf.Settings(size=16, min_steps=4, max_steps=4, batch=8, load_size=16)
    skipped = ev.Skipped()
    loads: list[int] = []

    def loader(files: Sequence[Path]) -> torch.Tensor:
        loads.append(len(files))
        return ev.load_images(files, 16, "resize", skipped, 16)

    def files(name: str) -> list[Path]:
        return sorted((tmp_path / name).glob("*.png"))

    blocked = tmp_path / "read-only-capacitor"
    blocked.mkdir()
    (blocked / clf.CACHE_FOLDER).write_text("a file where the cache folder would go")
    folders = clf.cache_folders(blocked, tmp_path / "efm-cache")
    first = clf.obtain(files("a"), files("b"), loader, settings, folders, torch.device("cpu"))
    assert not first.cached and loads == [12, 12]
    assert first.path.parent == tmp_path / "efm-cache" / "classifiers"  # the capacitor's folder was not writable
    assert json.loads(first.path.with_suffix(".json").read_text())["key"] == first.key

    second = clf.obtain(files("a"), files("b"), loader, settings, folders, torch.device("cpu"))
    assert second.cached and loads == [12, 12] and second.key == first.key
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name])

    assert clf.cache_key(settings, files("a")[::-1], files("b")) == first.key  # order does not matter
    assert clf.cache_key(clf.Settings(size=16, seed=1), files("a"), files("b")) != first.key
    bars(tmp_path / "b", True, 1, 7)  # one target image now has other content
    changed = clf.obtain(files("a"), files("b"), loader, settings, folders, torch.device("cpu"))
    assert not changed.cached and changed.key != first.key and loads == [12, 12, 12, 12]


def test_training_is_deterministic() -> None:
    settings = clf.Settings(size=16, min_steps=3, max_steps=3, batch=8)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    a, _ = clf.train(x, x.flip(2), settings, torch.device("cpu"))
    b, _ = clf.train(x, x.flip(2), settings, torch.device("cpu"))
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name])
    assert clf.features(a, x).shape == (8, 128) and clf.logits(a, clf.resize(x, 32)).shape == (8,)


# The command


def bars_config(size: int) -> dict:
    """A tiny vertical → horizontal capacitor's config at `size` (4 Euler steps)."""
    return new_config(
        source="vertical",
        target="horizontal",
        network=preset("tiny", size=size, L=6.0).to_dict(),
        field={"kind": "tube", "L": 6.0, "S": 1.0},
        size=size,
        sampler={"solver": "euler", "steps": 4},
    )


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny capacitor (16×16, 4 Euler steps) and bar folders: train and test, source and target."""
    root = tmp_path_factory.mktemp("eval")
    climbing_capacitor(bars_config(16)).save_pretrained(root / "cap")
    for split, count in (("train", 24), ("test", ev.MIN_HELD_OUT)):  # just enough held-out images to mean something
        bars(root / split / "a", True, count, 10 + count)
        bars(root / split / "b", False, count, 20 + count)
    return root


REPORT_KEYS = {
    "autoencoder",
    "model",
    "data",
    "classifier",
    "target_rate",
    "target_rate_se",
    "robust_target_rate",
    "robust_target_rate_se",
    "trick_test",
    "mean_abs_change",
    "fd",
    "structure_ssim",
    "hue_difference_deg",
    "hue_images",
    "speed",
    "against",
    "inception",
    "skipped",
    "meaningful",
    "meaningless_because",
}


def test_eval_json_report_then_cached_rerun(run_efm, bench: Path) -> None:
    args = ["eval", "--model", str(bench / "cap"), "--source", str(bench / "test/a"), "--target", str(bench / "test/b")]
    args += ["--train-source", str(bench / "train/a"), "--train-target", str(bench / "train/b"), "--json"]
    env = {**ONE_THREAD, "EFM_CACHE": str(bench / "efm-cache")}
    result = run_efm(*args, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == REPORT_KEYS
    assert report["data"]["split"] == "given" and report["data"]["images"]["source"] == ev.MIN_HELD_OUT
    assert report["meaningful"] and report["meaningless_because"] == []
    cls = report["classifier"]
    assert not cls["cached"] and Path(cls["path"]).parent == bench / "cap" / clf.CACHE_FOLDER
    assert cls["accuracy"] >= 0.9  # bars are easy, whatever their colour
    assert set(report["trick_test"]["rates"]) == set(ev.TRICKS) and report["trick_test"]["trustworthy"]
    assert set(report["fd"]) == {"features", "translated", "translated_se", "no_op", "noise_floor"}
    assert report["fd"]["noise_floor"] < report["fd"]["no_op"] and report["fd"]["translated_se"] > 0
    assert 0 <= report["target_rate"] <= 1 and report["robust_target_rate"] <= report["target_rate"]
    for rate in ("target_rate", "robust_target_rate"):
        assert report[f"{rate}_se"] == pytest.approx(ev.rate_standard_error(report[rate], 50))
    assert report["mean_abs_change"] > 0 and -1 <= report["structure_ssim"] <= 1
    assert report["speed"]["nfe_mean"] == 4 and report["speed"]["device"] == "cpu" and report["speed"]["landed"] == 50
    assert report["hue_images"] == 50 and 0 <= report["hue_difference_deg"] <= 180
    assert report["autoencoder"] is None  # a pixel capacitor has no round trip to report
    assert "training the domain classifier" in result.stderr

    (bench / "test/a/broken.png").write_bytes(b"not a png")
    table = run_efm(*args[:-1], "--report", str(bench / "reports/eval.json"), env=env, timeout=120)
    (bench / "test/a/broken.png").unlink()
    assert table.returncode == 3, table.stderr
    assert "target rate" in table.stdout and "FD noise floor" in table.stdout
    written = json.loads((bench / "reports/eval.json").read_text())  # the table on stdout, the document in the file
    assert set(written) == REPORT_KEYS and written["target_rate"] == report["target_rate"]
    fd_line = next(line for line in table.stdout.splitlines() if "translations vs target" in line)
    assert f"{written['fd']['translated']:.2f} ± {written['fd']['translated_se']:.2f}" in fd_line
    assert [Path(item["path"]).name for item in written["skipped"]] == ["broken.png"]
    assert os.listdir(bench / "reports") == ["eval.json"]
    assert "training" not in table.stderr and "loaded from" in table.stderr
    assert "broken.png" in table.stderr


def test_against_a_second_capacitor_reports_both_and_their_paired_differences(
    run_efm, bench: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    config = json.loads((bench / "cap" / "config.json").read_text())
    climbing_capacitor(config, seed=5).save_pretrained(other)
    args = ["eval", "--model", str(bench / "cap"), "--source", str(bench / "test/a"), "--target", str(bench / "test/b")]
    args += ["--train-source", str(bench / "train/a"), "--train-target", str(bench / "train/b")]
    env = {**ONE_THREAD, "EFM_CACHE": str(tmp_path / "efm-cache")}
    result = run_efm(*args, "--against", str(other), "--json", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    against, difference = report["against"], report["against"]["difference"]
    assert against["model"]["ref"] == str(other) and against["speed"]["landed"] == 50
    assert difference["target_rate"] == pytest.approx(report["target_rate"] - against["target_rate"])
    assert difference["fd"] == pytest.approx(report["fd"]["translated"] - against["fd"])
    assert against["fd"] != report["fd"]["translated"] and difference["fd_se"] > 0

    # Against itself: every difference is exactly zero, and so is its paired error (the unpaired ones are not).
    same = run_efm(*args, "--against", str(bench / "cap"), env=env, timeout=300)
    assert same.returncode == 0, same.stderr
    lines = same.stdout.splitlines()
    assert "+0.000 ± 0.000" in next(line for line in lines if "difference: target rate" in line)
    assert "+0.00 ± 0.00" in next(line for line in lines if "difference: FD" in line)
    fd_row = next(line for line in lines if line.lstrip("│ ").startswith("FD ") and "±" in line)
    assert "± 0.00 " not in fd_row

    wrong = tmp_path / "wrong"
    climbing_capacitor(bars_config(32)).save_pretrained(wrong)
    refused = run_efm(*args, "--against", str(wrong), env=env, timeout=300)
    assert refused.returncode == 1
    assert "a paired report needs both to translate the same pictures" in one_error_line(refused.stderr)


def test_without_train_folders_each_folder_is_split_in_half(
    bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(clf.Settings, "steps", lambda self, count: 3)  # the pipeline, not the classifier, is tested
    monkeypatch.setenv("EFM_CACHE", str(tmp_path / "efm-cache"))
    shutil.copytree(bench / "cap", tmp_path / "cap")
    messages: list[str] = []
    report = ev.report(str(tmp_path / "cap"), bench / "train/a", bench / "train/b", limit=3, say=messages.append)
    assert report["data"]["split"] == "halves" and report["data"]["images"]["train_source"] == 12
    assert report["data"]["images"]["source"] == 3 and report["data"]["images"]["target"] == 3
    assert any("seeded half of each folder (12 + 12 images)" in message for message in messages)
    fit, held_out = ev.split_halves(list(range(24)), seed=0)
    assert len(fit) == len(held_out) == 12 and set(fit).isdisjoint(held_out)
    assert (fit, held_out) == ev.split_halves(list(range(24)), seed=0) != ev.split_halves(list(range(24)), seed=1)
    (tmp_path / "few").mkdir()
    bars(tmp_path / "few", True, 3, 0)
    with pytest.raises(ev.EvalError, match="4 images or more"):
        ev.assign_roles(tmp_path / "few", bench / "train/b", None, None, None, 0)


def test_meaningless_because_names_each_domain_that_falls_short() -> None:
    assert ev.meaningless_because({"horse": 120, "zebra": 140}, {"horse": 0.87, "zebra": 0.89}) == []
    assert ev.meaningless_because({"horse": 2, "zebra": 140}, {"horse": 0.0, "zebra": 0.65}) == [
        f"only 2 held-out horse images (at least {ev.MIN_HELD_OUT} needed)",
        f"the classifier recognises 0% of the held-out horse images (at least {ev.MIN_ACCURACY:.0%} needed)",
        f"the classifier recognises 65% of the held-out zebra images (at least {ev.MIN_ACCURACY:.0%} needed)",
    ]


def test_a_report_on_two_images_per_domain_means_nothing(
    bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 13: 2 + 2 held-out images once scored a target rate of 1.000, "trustworthy"."""
    monkeypatch.setattr(clf.Settings, "steps", lambda self, count: 3)
    monkeypatch.setattr(console, "_quiet", False)
    monkeypatch.setenv("EFM_CACHE", str(tmp_path / "efm-cache"))
    shutil.copytree(bench / "cap", tmp_path / "cap")
    for name, vertical in (("a", True), ("b", False)):
        bars(tmp_path / "few" / name, vertical, 2, 5)
    args = ["eval", "--model", str(tmp_path / "cap"), "--source", str(tmp_path / "few/a")]
    args += ["--target", str(tmp_path / "few/b"), "--train-source", str(bench / "train/a")]
    args += ["--train-target", str(bench / "train/b"), "--report", str(tmp_path / "eval.json")]
    assert main(args) == 0
    table, stderr = capsys.readouterr()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert not report["meaningful"] and not report["trick_test"]["trustworthy"]
    assert report["meaningless_because"][:2] == [
        f"only 2 held-out vertical images (at least {ev.MIN_HELD_OUT} needed)",
        f"only 2 held-out horizontal images (at least {ev.MIN_HELD_OUT} needed)",
    ]
    assert "MEANINGLESS: only 2 held-out vertical images" in table and "trustworthy" not in table.lower()
    assert f"warning: these numbers mean nothing: {'; '.join(report['meaningless_because'])}" in stderr.splitlines()
    assert main([*args[:-2], "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["meaningful"] is False


def test_a_classifier_that_calls_everything_target_makes_the_report_meaningless(
    bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enough images, but a judge that calls every untouched source "target": its target rate of 1 says nothing."""
    monkeypatch.setattr(clf.Settings, "steps", lambda self, count: 3)
    monkeypatch.setattr(clf, "logits", lambda model, images, batch=256: torch.ones(len(images)))
    monkeypatch.setenv("EFM_CACHE", str(tmp_path / "efm-cache"))
    shutil.copytree(bench / "cap", tmp_path / "cap")
    report = ev.report(
        str(tmp_path / "cap"),
        bench / "test/a",
        bench / "test/b",
        train_source=bench / "train/a",
        train_target=bench / "train/b",
    )
    assert report["target_rate"] == 1.0 and report["classifier"]["accuracy"] == 0.5
    assert not report["meaningful"] and not report["trick_test"]["trustworthy"]
    assert report["meaningless_because"] == [
        f"the classifier recognises 0% of the held-out vertical images (at least {ev.MIN_ACCURACY:.0%} needed)"
    ]


def test_eval_bad_inputs(
    bench: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process through `main`, which owns exit codes and error lines (the subprocess path is tested above)."""
    monkeypatch.setattr(console, "_quiet", False)  # `-q` below must not silence later tests in this process
    monkeypatch.setenv("EFM_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cap, a, b = str(bench / "cap"), str(bench / "test/a"), str(bench / "test/b")
    usage = [
        ["eval", "--source", a, "--target", b],
        ["eval", "--model", cap, "--source", str(tmp_path / "missing"), "--target", b],
        ["eval", "--model", cap, "--source", a, "--target", b, "--train-source", a],
        ["eval", "--model", cap, "--source", a, "--target", b, "--device", "gpu"],
        ["eval", "--model", cap, "--source", a, "--target", b, "--features", "clip"],
        ["eval", "--model", cap, "--source", a, "--target", b, "--limit", "0"],
    ]
    for args in usage:
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and out == ""
    (tmp_path / "empty").mkdir()
    failures = {
        "no capacitor called": ["--model", "no-such-capacitor", "--source", a, "--target", b],
        "holds no images": ["--model", cap, "--source", str(tmp_path / "empty"), "--target", b],
        "Inception v3 weights are not on this machine": [
            *["--model", cap, "--source", a, "--target", b],
            *["--features", "inception"],
        ],
    }
    for message, args in failures.items():
        assert main(["eval", "-q", *args]) == 1, args
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith("error: ")
        assert message in lines[0] and " — " in lines[0]


def test_eval_help_does_not_import_torch(run_python) -> None:
    code = "import sys\nfrom efm_cli.cli.app import main\nmain(['eval', '--help'])\nprint('torch' in sys.modules)"
    result = run_python(code)
    assert result.stdout.strip().endswith("False") and "--train-source" in result.stdout


# The coloured-digits builder


def load_digits_script():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hsv_recipe_matches_colorsys() -> None:
    digits = load_digits_script()
    hues = np.linspace(0, 359.9, 50)
    expected = np.array([colorsys.hsv_to_rgb(h / 360, 1, 1) for h in hues])
    np.testing.assert_allclose(digits.hsv_to_rgb_full(hues), expected, atol=1e-12)


@pytest.mark.skipif(not MNIST.is_file(), reason=f"MNIST not available at {MNIST}")
def test_digits_folders_follow_the_recipe(tmp_path: Path) -> None:
    digits = load_digits_script()
    assert digits.main([str(tmp_path / "one"), "--per-split", "4", "--mnist", str(MNIST)]) == 0
    digits.main([str(tmp_path / "two"), "--per-split", "4", "--mnist", str(MNIST)])
    with np.load(MNIST, allow_pickle=False) as data:
        grey = {"two": data["x_test"][data["y_test"] == 2][:4], "three": data["x_test"][data["y_test"] == 3][:4]}
    for split in ("train", "test"):
        for name in ("two", "three"):
            files = sorted((tmp_path / "one" / split / name).glob("*.png"))
            assert len(files) == 4
            for file in files:
                assert file.read_bytes() == (tmp_path / "two" / split / name / file.name).read_bytes()
    for name, originals in grey.items():
        images = np.stack([np.asarray(Image.open(f)) for f in sorted((tmp_path / "one/test" / name).glob("*.png"))])
        assert images.shape == (4, 32, 32, 3)
        # The value channel is the resized grey digit, so the brightest channel reproduces it exactly.
        expected = np.rint(digits.resize_digits(originals) * 255)
        assert np.abs(images.max(axis=3) - expected).max() <= 1  # one level of float rounding in the hue recipe
        assert (images[:, 0, 0] == 0).all()  # black background
        strokes = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        for stroke, hue in zip(strokes, ev.dominant_hue(strokes), strict=True):
            pixels = stroke.permute(1, 2, 0).reshape(-1, 3, 1, 1)
            pixels = pixels[pixels.amax(dim=(1, 2, 3)) > 0]  # brighter than half: 8-bit rounding barely moves them
            spread = torch.remainder(ev.dominant_hue(pixels) - hue + 180, 360) - 180
            assert spread.abs().max() < 2  # one colour per digit
