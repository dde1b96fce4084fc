"""The translation pipeline as a library: planning the output tree, reading every kind of input, writing safely."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BAD, GOOD, digests, make_capacitor, make_tree, noise_pixels, stamps
from PIL import Image
from torch import Tensor, nn

from efm_cli import devices
from efm_cli import translate as tr
from efm_cli.capacitor.model import Capacitor
from efm_cli.images import OUTPUT_MARKER, load, to_tensor

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def outputs(plan: tr.Plan) -> dict[str, str]:
    return {job.source.as_posix(): job.output.as_posix() for job in plan.jobs}


def test_one_folder_lands_directly_in_out_and_the_default_out_is_beside_it(tmp_path: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    plan = tr.plan([str(horses)], domain="zebra")
    assert plan.out == tmp_path / "horses-to-zebra"
    names = {Path(job.output).relative_to(plan.out).as_posix() for job in plan.jobs}
    assert names == set(GOOD) | set(BAD)
    assert all(job.output.relative_to(plan.out) == job.source.relative_to(horses) for job in plan.jobs)
    assert [job.output for job in plan.jobs] == sorted((job.output for job in plan.jobs), key=Path.as_posix)


def test_files_globs_and_several_inputs_keep_their_names(tmp_path: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    (tmp_path / "more").mkdir()
    Image.fromarray(noise_pixels(8, 8, 3, 9)).save(tmp_path / "more" / "x.png")
    one = tr.plan([str(horses / "photo.jpg")], domain="zebra")
    assert outputs(one) == {f"{horses}/photo.jpg": f"{tmp_path}/horses-to-zebra/photo.jpg"}  # not inside horses/
    several = tr.plan([str(horses), str(tmp_path / "more"), str(horses / "a/grey.png")], domain="zebra", out="o")
    assert outputs(several)[f"{horses}/a/b/web.webp"] == "o/horses/a/b/web.webp"
    assert outputs(several)[f"{tmp_path}/more/x.png"] == "o/more/x.png"
    assert {job.output.as_posix() for job in several.jobs if job.source == horses / "a/grey.png"} == {
        "o/horses/a/grey.png",
        "o/grey.png",
    }
    assert (
        tr.default_out([str(horses), str(tmp_path / "more")], "zebra") == tmp_path.parent / f"{tmp_path.name}-to-zebra"
    )
    globbed = tr.plan([f"{horses}/**/*.png"], domain="zebra", out="g")
    assert set(outputs(globbed).values()) == {"g/a/alpha.png", "g/a/grey.png", "g/a/b/deep16.png", "g/notes.png"}


def test_the_default_out_lies_beside_the_folder_the_outputs_are_named_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_tree(Path("horses"))
    (tmp_path / "more").mkdir()
    Image.fromarray(noise_pixels(8, 8, 3, 9)).save("x.png")
    cases = {
        ("horses",): "horses-to-zebra",
        ("horses/photo.jpg",): "horses-to-zebra",  # a file's own folder, never inside it
        ("horses/a/grey.png",): "horses/a-to-zebra",
        ("horses/*.jpg",): "horses-to-zebra",
        ("horses/*.jpg", "horses/a/grey.png"): str(tmp_path / "horses-to-zebra"),
        ("horses", "more"): str(tmp_path.parent / f"{tmp_path.name}-to-zebra"),
        (".",): str(tmp_path.parent / f"{tmp_path.name}-to-zebra"),
        ("x.png",): str(tmp_path.parent / f"{tmp_path.name}-to-zebra"),  # a file of the current folder
    }
    for inputs, out in cases.items():
        assert tr.default_out(inputs, "zebra") == Path(out), inputs
    assert tr.plan(["horses"], domain="zebra").default and not tr.plan(["horses"], domain="zebra", out="o").default


def test_outputs_inside_the_input_tree_are_never_read_back(tmp_path: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    out = horses / "translated"
    first = tr.plan([str(horses)], domain="zebra", out=out)
    for job in first.jobs:
        job.output.parent.mkdir(parents=True, exist_ok=True)
        job.output.write_bytes(b"previous output")
    for inputs in ([str(horses)], [f"{horses}/**/*.jpg"]):
        again = tr.plan(inputs, domain="zebra", out=out)
        assert not any(job.source.is_relative_to(out) for job in again.jobs)
    assert len(tr.plan([str(horses)], domain="zebra", out=out).jobs) == len(first.jobs)


def test_plans_that_would_touch_inputs_or_clash_are_refused(tmp_path: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    (tmp_path / "other" / "a").mkdir(parents=True)
    Image.fromarray(noise_pixels(8, 8, 3, 9)).save(tmp_path / "other" / "photo.jpg")
    with pytest.raises(tr.PlanError, match="is the input folder"):
        tr.plan([str(horses)], domain="zebra", out=horses)
    with pytest.raises(tr.PlanError, match="would overwrite an input"):
        tr.plan([str(horses / "photo.jpg")], domain="zebra", out=horses)
    with pytest.raises(tr.PlanError, match="would both"):
        tr.plan([str(horses / "photo.jpg"), str(tmp_path / "other" / "photo.jpg")], domain="zebra", out="o")
    with pytest.raises(tr.PlanError, match="no such file or folder"):
        tr.plan([str(tmp_path / "missing")], domain="zebra")
    with pytest.raises(tr.PlanError, match="would overwrite an input"):
        tr.check_sheet(horses / "photo.jpg", tr.plan([str(horses)], domain="zebra").jobs)
    with pytest.raises(tr.PlanError, match="unknown image format"):
        tr.check_sheet(tmp_path / "sheet.txt", [])
    jobs = tr.plan([str(horses)], domain="zebra", out=tmp_path / "o").jobs
    with pytest.raises(tr.PlanError, match="would overwrite the translation of"):
        tr.check_sheet(tmp_path / "o" / "photo.jpg", jobs)
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(tr.PlanError, match="is a folder"):
        tr.check_sheet(tmp_path / "dir.png", [])  # a folder with an image suffix is still a folder
    with pytest.raises(tr.PlanError, match="is where the outputs go"):
        tr.check_sheet(tmp_path / "o.png", jobs, tmp_path / "o.png" / "out")
    assert not (tmp_path / "o").exists()


def test_prepare_out_marks_only_a_default_out_and_report_paths_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_tree(Path("horses"))
    given = tr.plan(["horses"], domain="zebra", out="given")
    tr.prepare_out(given)
    assert Path("given").is_dir() and list(Path("given").iterdir()) == []  # the probe leaves nothing behind
    default = tr.plan(["horses"], domain="zebra")
    tr.prepare_out(default)
    assert [path.name for path in Path("horses-to-zebra").iterdir()] == [OUTPUT_MARKER]
    record = tr.Record(default.jobs[0].source, default.jobs[0].output, "translated")
    assert record.to_json()["path"] == str(tmp_path / default.jobs[0].source)
    assert record.to_json()["output"] == str(tmp_path / default.jobs[0].output)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 20])
def test_shards_cover_every_file_exactly_once(tmp_path: Path, count: int) -> None:
    jobs = tr.plan([str(make_tree(tmp_path / "horses"))], domain="zebra").jobs
    shards = [tr.shard(jobs, index, count) for index in range(1, count + 1)]
    taken = [job for part in shards for job in part]
    assert sorted(taken, key=lambda job: job.output.as_posix()) == jobs
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(tr.PlanError):
        tr.shard(jobs, count + 1, count)


def test_every_good_input_is_translated_at_its_size_and_bad_ones_are_skipped(tmp_path: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    before = digests(horses)
    plan = tr.plan([str(horses)], domain="zebra")
    seen: list[str] = []
    report = tr.translate_files(
        make_capacitor(), plan.jobs, direction="forward", batch_size=4, progress=lambda r: seen.append(r.status)
    )
    by_name = {record.path.relative_to(horses).as_posix(): record for record in report.records}
    assert [record.path for record in report.records] == [job.source for job in plan.jobs]
    assert sorted(seen) == sorted(record.status for record in report.records)
    for name, size in GOOD.items():
        record = by_name[name]
        assert record.status == "translated" and record.nfe > 0, record
        with Image.open(plan.out / name) as written:
            assert written.size == size == load(horses / name).size
            assert written.format == load(horses / name).format
    assert {name: by_name[name].reason for name in BAD} == BAD
    assert not any((plan.out / name).exists() for name in BAD)
    with Image.open(plan.out / "a/alpha.png") as written:
        assert written.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(written)[:, :, 3], load(horses / "a/alpha.png").alpha)
    assert digests(horses) == before
    assert report.summary()["translated"] == len(GOOD) and report.summary()["skipped"] == len(BAD)
    assert not list(plan.out.rglob(".*")), "no temporary file may be left behind"


def test_skip_existing_writes_nothing_new(tmp_path: Path) -> None:
    plan = tr.plan([str(make_tree(tmp_path / "horses"))], domain="zebra")
    capacitor = make_capacitor()
    tr.translate_files(capacitor, plan.jobs, direction="forward")
    written = stamps(plan.out)
    report = tr.translate_files(capacitor, plan.jobs, direction="forward", skip_existing=True)
    assert stamps(plan.out) == written
    assert report.count("existing") == len(GOOD) and report.count("translated") == 0


def test_both_directions_and_inline_workers_give_the_same_outputs(tmp_path: Path) -> None:
    horses = make_tree(tmp_path / "horses")
    capacitor = make_capacitor()
    plans = [tr.plan([str(horses)], domain="zebra", out=tmp_path / name) for name in ("threads", "inline")]
    tr.translate_files(capacitor, plans[0].jobs, direction="forward", batch_size=3)
    tr.translate_files(capacitor, plans[1].jobs, direction="forward", batch_size=3, workers=0)
    assert digests(tmp_path / "threads") == digests(tmp_path / "inline")
    back = tr.plan([str(tmp_path / "threads")], domain="horse", out=tmp_path / "back")
    report = tr.translate_files(capacitor, back.jobs, direction="backward")
    assert report.count("translated") == len(GOOD)


def test_a_grey_capacitor_sees_luminance_and_writes_rgb(tmp_path: Path) -> None:
    horses = tmp_path / "horses"
    horses.mkdir()
    Image.fromarray(noise_pixels(20, 12, 3, 8)).save(horses / "colour.png")
    plan = tr.plan([str(horses)], domain="zebra")
    report = tr.translate_files(make_capacitor(channels=1), plan.jobs, direction="forward")
    assert report.count("translated") == 1
    with Image.open(plan.out / "colour.png") as written:
        assert (written.mode, written.size) == ("RGB", (20, 12))
        pixels = np.asarray(written)
    assert (pixels[:, :, 0] == pixels[:, :, 1]).all() and (pixels[:, :, 1] == pixels[:, :, 2]).all()


class Flaky(nn.Module):
    """A field that is not finite whenever the network runs in reduced precision, and fine in fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # a capacitor takes its device and dtype from a parameter

    def forward(self, z: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        fx = -0.1 * x
        if torch.is_autocast_enabled("cpu"):
            fx = fx * torch.nan
        return torch.ones_like(z), fx


def test_reduced_precision_failures_are_retried_in_fp32(tmp_path: Path) -> None:
    flaky = Capacitor(make_capacitor().config, network=Flaky())
    plan = tr.plan([str(make_tree(tmp_path / "horses"))], domain="zebra")
    report = tr.translate_files(flaky, plan.jobs, direction="forward", precision="bf16")
    assert report.count("translated") == len(GOOD)
    assert report.retried == len(GOOD)


def _truth(rgb: np.ndarray) -> np.ndarray:
    """An 'ideal translator' that is easy to state at any size: a colour change, as in summer → winter."""
    return np.clip(0.5 * rgb + 0.5 * rgb.mean(axis=2, keepdims=True) + 40, 0, 255)


def test_detail_brings_an_ideal_low_resolution_translation_closer_to_the_truth() -> None:
    y, x = np.mgrid[0:96, 0:80]
    texture = 100 + 50 * np.sign(np.sin(x / 3.0) * np.sin(y / 4.0)) + x / 2.0  # sharp edges on a gradient
    rgb = (texture[:, :, None] * np.array([1.0, 0.8, 0.6])).astype(np.uint8)
    small_in = to_tensor(rgb, SIZE)
    small_out = torch.from_numpy(_truth((small_in.permute(1, 2, 0).numpy() + 1) * 127.5) / 127.5 - 1).permute(2, 0, 1)
    truth = _truth(rgb.astype(np.float64))
    errors = {
        detail: np.abs(tr.compose(rgb, small_in, small_out.float(), detail=detail) - truth).mean()
        for detail in (False, True)
    }
    assert errors[True] < 0.5 * errors[False]
    same = to_tensor(rgb[:SIZE, :SIZE].copy(), SIZE)
    np.testing.assert_array_equal(
        tr.compose(rgb[:SIZE, :SIZE].copy(), same, same, detail=True),
        tr.compose(rgb[:SIZE, :SIZE].copy(), same, same, detail=False),
    )


def test_the_local_gain_follows_an_inversion() -> None:
    small = np.random.default_rng(0).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    luma = small @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gain = tr.local_gain(small, -luma[:, :, None].repeat(3, axis=2))
    assert np.median(gain) < -0.8


def test_trace_runs_from_the_input_to_the_translation_and_the_pictures_have_their_layout(tmp_path: Path) -> None:
    capacitor = make_capacitor()
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2)) * 1.6 - 0.8
    heights, states = tr.trace(capacitor, images, direction="backward", frames=5)
    assert heights[0] == capacitor.plates("backward")[0] and heights[-1] == capacitor.plates("backward")[1]
    assert states.shape == (3, 5, 3, SIZE, SIZE)
    torch.testing.assert_close(states[:, 0], images)
    torch.testing.assert_close(states[:, -1], capacitor.translate(images, direction="backward").images)
    strip = tr.film_strip(states)
    assert strip.shape[0] > strip.shape[1] / 5 * 2 and strip.dtype == np.uint8
    pairs = [(np.zeros((tr.SHEET_TILE, tr.SHEET_TILE, 3), np.uint8),) * 2] * 5
    assert tr.contact_sheet(pairs, columns=4).shape[1] > tr.contact_sheet(pairs[:1]).shape[1] * 3
    tr.write_picture(tmp_path / "strip.png", strip)
    with Image.open(tmp_path / "strip.png") as written:
        assert written.size == (strip.shape[1], strip.shape[0])


def test_devices() -> None:
    assert devices.choose("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert devices.choose("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(devices.DeviceError, match="cuda is not available"):
            devices.choose("cuda")
        with pytest.raises(devices.DeviceError, match="cuda:1 is not available"):
            devices.choose("cuda:1")
    with pytest.raises(devices.DeviceError, match="unknown device 'tpu'"):
        devices.choose("tpu")
    with pytest.raises(devices.DeviceError, match="unknown device 'cpu:0'"):
        devices.choose("cpu:0")


def test_the_cpus_native_precisions_are_read_from_its_flags() -> None:
    """x86 lists AVX-512/AMX extensions under `flags`, Arm its extensions under `Features`; no such line: unknown."""
    x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    assert devices.cpu_native("bf16", x86) is False and devices.cpu_native("fp16", x86) is False
    assert devices.cpu_native("bf16", x86.replace("avx2", "avx2 avx512f avx512_bf16")) is True
    assert devices.cpu_native("bf16", x86.replace("avx2", "amx_bf16 amx_tile")) is True
    arm = "processor\t: 0\nFeatures\t: fp asimd asimdhp bf16 sve\n"
    assert devices.cpu_native("bf16", arm) is True and devices.cpu_native("fp16", arm) is True
    assert devices.cpu_native("bf16", "processor\t: 0\n") is None
    assert devices.cpu_native("fp32", x86) is True


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_a_precision_name_runs_a_layer_in_its_dtype(precision: devices.Precision, dtype: torch.dtype) -> None:
    """Translation, training and the precision benchmark share one mapping from a name to an autocast dtype."""
    layer = torch.nn.Linear(4, 3)
    with devices.autocast("cpu", precision):
        assert layer(torch.ones(2, 4)).dtype == dtype
    assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_open_capacitor_by_domain_picks_the_direction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from efm_cli.capacitor import registry

    make_capacitor().save_pretrained(tmp_path / "h2z")
    monkeypatch.setenv("EFM_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(registry, "known", registry.embedded)  # the HF cache of this machine stays out of it
    _, forward, name = tr.open_capacitor(model=None, to="zebra")
    _, backward, _ = tr.open_capacitor(model=None, to="horse")
    assert (forward, backward, name) == ("forward", "backward", "h2z")
    with pytest.raises(tr.PlanError, match="between 'horse' and 'zebra', not 'cat'") as refused:
        tr.open_capacitor(model=str(tmp_path / "h2z"), to="cat")
    assert refused.value.hint == "pass --to horse or --to zebra"
