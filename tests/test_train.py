"""Training: the step, its schedule and EMA, checkpoints, exact resume, data-parallel equivalence, and `efm train`."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Run, losses, shapes
from PIL import Image
from torch import Tensor

from efm_cli.capacitor.model import Capacitor
from efm_cli.cli.app import main
from efm_cli.integrator import Solution, integrate
from efm_cli.network import MLPConfig, MLPField
from efm_cli.training import checkpoint
from efm_cli.training.data import BatchStream, ImageFolder, Preprocessing, batches, domain_names
from efm_cli.training.run import Budget, RunSettings, SettingsError, fit, new_settings
from efm_cli.training.step import EMA, FieldSpec, Schedule, Trainer

SIZE = 16


@pytest.fixture(scope="module")
def domains(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return shapes(root / "squares", "square", 24, 0), shapes(root / "discs", "disc", 20, 1)


def settings(source: Path, target: Path, **changes: object) -> RunSettings:
    base = dict(
        source=str(source),
        target=str(target),
        source_name="square",
        target_name="disc",
        prep=Preprocessing(size=SIZE, hflip=True),
        field=FieldSpec(kind="coulomb", L=10.0, plan="ot"),
        schedule=Schedule(lr=1e-3, warmup=3, decay="cosine", total=12),
        network="tiny",
        charges=8,
        points=4,
        log_every=1,
        checkpoint_every=4,
        sample_every=6,
        samples=4,
        sample_steps=4,
    )
    return RunSettings(**{**base, **changes})


# --- schedule, EMA, the step -------------------------------------------------------------------------------------


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    schedule = Schedule(lr=1.0, warmup=4, decay="cosine", total=15, final=0.1)
    assert [schedule.lr_at(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule.lr_at(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule.lr_at(14) == pytest.approx(0.1)
    assert schedule.lr_at(100) == pytest.approx(0.1)
    assert Schedule(lr=1.0, warmup=0).lr_at(0) == 1.0


def test_ema_follows_its_warm_up_decay() -> None:
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.5)
    expected = 0.0
    for t, value in enumerate([1.0, 2.0, 3.0], start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.update(net)
        d = min(0.5, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * value
        assert ema.shadow[0][0, 0].item() == pytest.approx(expected)


def test_loss_is_the_mse_between_the_network_and_the_field_at_the_step_points() -> None:
    torch.manual_seed(0)
    net = MLPField(MLPConfig(dim=2, width=16, depth=2, L=6.0))
    spec = FieldSpec(kind="coulomb", L=6.0, plan="independent", eps=0.1)
    trainer = Trainer(net, spec, Schedule(), points=8, seed=3)
    source, target = torch.randn(16, 2), torch.randn(16, 2) + 4
    loss = trainer.loss(source, target)
    # Same seed, same step: the points are reproducible; recompute the loss from them independently, in float64.
    from efm_cli.field import coulomb_target, sample_points
    from efm_cli.training.step import _step_seed

    gen = torch.Generator().manual_seed(_step_seed(3, 0))
    z, x = sample_points(source[:8], target[:8], 6.0, eps=0.1, generator=gen)
    wanted = coulomb_target(z.double(), x.double(), source.double(), target.double(), 6.0)
    f_z, f_x = net(z, x)
    manual = ((torch.cat([f_z[:, None], f_x], 1).double() - wanted) ** 2).mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_a_step_with_a_non_finite_loss_is_skipped_and_counted() -> None:
    torch.manual_seed(0)
    net = MLPField(MLPConfig(dim=2, width=16, depth=2, L=6.0))
    trainer = Trainer(net, FieldSpec(L=6.0, eps=0.1, plan="independent"), Schedule(warmup=0), points=4)
    before = [p.detach().clone() for p in net.parameters()]
    bad = torch.randn(8, 2)
    bad[0, 0] = math.nan
    stats = trainer.step_on(bad, torch.randn(8, 2))
    assert not stats.applied and math.isnan(stats.loss)
    assert trainer.skipped == 1 and trainer.step == 1 and trainer.ema.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    stats = trainer.step_on(torch.randn(8, 2), torch.randn(8, 2))
    assert stats.applied and trainer.skipped == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


# --- data ------------------------------------------------------------------------------------------------------------


def test_batches_are_a_pure_function_of_seed_and_number(domains: tuple[Path, Path]) -> None:
    folder = ImageFolder(domains[0], Preprocessing(size=SIZE, hflip=True))
    first, again = BatchStream(folder, 10, seed=5), BatchStream(folder, 10, seed=5)
    assert torch.equal(first.rows(3), again.rows(3))  # batch 3 straight away, without batches 0–2
    assert torch.equal(first.rows(3)[2:5], again.rows(3, slice(2, 5)))
    assert not torch.equal(first.rows(3), BatchStream(folder, 10, seed=6).rows(3))
    # Without flips, one epoch of batches (24 images, 6 batches of 4) uses every image exactly once.
    plain = ImageFolder(domains[0], Preprocessing(size=SIZE))
    stream = BatchStream(plain, 4, seed=1)
    seen = ((torch.cat([stream.rows(k) for k in range(6)]) + 1) * 127.5).round().to(torch.uint8)
    matches = (seen[:, None] == plain.pixels[None]).flatten(2).all(2)
    assert torch.equal(matches.sum(0), torch.ones(24, dtype=torch.long))


def test_streamed_decoding_by_workers_gives_the_batches_held_in_memory(domains: tuple[Path, Path]) -> None:
    prep = Preprocessing(size=SIZE, hflip=True)
    held = [BatchStream(ImageFolder(d, prep), 6, seed=i) for i, d in enumerate(domains)]
    streamed = [BatchStream(ImageFolder(d, prep, cache_bytes=0), 6, seed=i) for i, d in enumerate(domains)]
    assert all(s.data.pixels is None for s in streamed)
    expected = [(held[0].rows(k), held[1].rows(k)) for k in range(3, 7)]
    got = batches(*streamed, start=3, workers=2)
    for want_source, want_target in expected:
        source, target = next(got)
        assert torch.equal(source, want_source) and torch.equal(target, want_target)


def test_cyclegan_folder_names_give_the_plate_names(tmp_path: Path) -> None:
    (tmp_path / "horse2zebra" / "trainA").mkdir(parents=True)
    root = tmp_path / "horse2zebra"
    assert domain_names(root / "trainA", root / "trainB", root) == ("horse", "zebra")
    assert domain_names(tmp_path / "summer", tmp_path / "winter") == ("summer", "winter")
    assert domain_names("noise", tmp_path / "faces") == ("noise", "faces")


# --- checkpoints and resume -------------------------------------------------------------------------------------------


def test_checkpoints_are_complete_or_absent_and_latest_falls_back(tmp_path: Path) -> None:
    tensors = {"model": {"w": torch.arange(4.0)}}
    checkpoint.save(tmp_path, 1, tensors, {"step": 1})
    checkpoint.save(tmp_path, 2, tensors, {"step": 2})
    checkpoint.save(tmp_path, 3, tensors, {"step": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    loaded, meta = checkpoint.load(checkpoint.latest(tmp_path))
    assert meta == {"step": 3} and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    # A kill between the folder rename and the pointer update: the pointer names an older step or is gone.
    (tmp_path / "latest").write_text("step-00000009\n")
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    (tmp_path / "latest").unlink()
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    # A kill while writing: the staging folder never becomes a checkpoint and is cleaned up by the next save.
    (tmp_path / ".step-00000004-abc").mkdir()
    assert checkpoint.latest(tmp_path).name == "step-00000003"
    checkpoint.save(tmp_path, 5, tensors, {"step": 5})
    assert not list(tmp_path.glob(".step-*"))


def test_resumed_run_has_the_losses_of_an_uninterrupted_one(domains: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = settings(*domains)
    whole = fit(cfg, tmp_path / "whole", budget=Budget(steps=12), device="cpu")
    first = fit(cfg, tmp_path / "parts", budget=Budget(steps=5), device="cpu")
    assert first.step == 5
    second = fit(cfg, tmp_path / "parts", budget=Budget(steps=12), resume=True, device="cpu")
    assert whole.step == second.step == 12
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    a = Capacitor.from_pretrained(tmp_path / "whole" / "model").network.state_dict()
    b = Capacitor.from_pretrained(tmp_path / "parts" / "model").network.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_folder_is_complete_and_its_capacitor_translates(domains: tuple[Path, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = fit(settings(*domains), run, budget=Budget(steps=12), device="cpu")
    assert summary.step == 12 and summary.source_images == 24 and summary.target_images == 20
    config = json.loads((run / "config.json").read_text())
    assert config["format"] == "efm-run" and config["settings"]["network"] == "tiny"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000006.png", "step-00000012.png"]
    with Image.open(run / "samples" / "step-00000012.png") as grid:
        assert grid.size == (4 * SIZE + 3 * 2, 2 * SIZE + 2)
    assert len(losses(run)) == 12 and all(math.isfinite(v) for v in losses(run))
    with Image.open(run / "loss.png") as plot:
        assert plot.size == (640, 360)
    assert checkpoint.latest(run / "checkpoints").name == "step-00000012"
    capacitor = Capacitor.from_pretrained(run / "model")
    assert (capacitor.source, capacitor.target) == ("square", "disc")
    assert capacitor.config["training"]["steps"] == 12
    assert (run / "model" / "sample.png").is_file()
    images = torch.rand(3, 3, SIZE, SIZE) * 2 - 1
    result = capacitor.translate(images, to="disc", solver="euler", steps=4)
    assert result.images.shape == images.shape and result.solution.landed.all()


# --- the command line ---------------------------------------------------------------------------------------------

TINY = ["--size", str(SIZE), "--network", "tiny", "--charges", "8", "--batch-size", "4", "--log-every", "1"]


def test_cli_trains_a_cyclegan_folder_and_refuses_to_overwrite(run_efm: Run, tmp_path: Path) -> None:
    root = tmp_path / "square2disc"
    shapes(root / "trainA", "square", 10, 0)
    shapes(root / "trainB", "disc", 10, 1)
    (root / "trainB" / "broken.png").write_bytes(b"not a picture")
    run = tmp_path / "run"
    done = run_efm("train", "--source", str(root), *TINY, "--steps", "3", "--out", str(run), "--json")
    assert done.returncode == 3, done.stderr  # finished, but an input was left out
    summary = json.loads(done.stdout)
    assert summary["ignored"] == [{"path": str(root / "trainB" / "broken.png"), "reason": "not an image"}]
    assert f"warning: skipped {root / 'trainB' / 'broken.png'}: not an image" in done.stderr.splitlines()
    assert summary["step"] == 3 and summary["stopped"] == "steps" and summary["model"] == str(run / "model")
    assert {"config.json", "checkpoints", "samples", "metrics.jsonl", "loss.png", "model"} <= {
        p.name for p in run.iterdir()
    }
    capacitor = Capacitor.from_pretrained(run / "model")
    assert (capacitor.source, capacitor.target) == ("square", "disc")
    result = capacitor.translate(torch.rand(2, 3, SIZE, SIZE) * 2 - 1, to="square", solver="euler", steps=4)
    assert result.direction == "backward" and result.solution.landed.all()
    again = run_efm("train", "--source", str(root), *TINY, "--steps", "3", "--out", str(run))
    assert again.returncode == 1
    assert (
        again.stderr.strip()
        == f"error: {run} already holds files — continue it with --resume {run}, or pick another --out"
    )
    changed = run_efm("train", "--resume", str(run), "--size", "32")
    assert changed.returncode == 2 and "--size cannot change when a run continues" in changed.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "A", "--target", "A"], "error: --source and --target are the same"),
        (["--source", "A"], "error: --target is missing"),
        (["--source", "A", "--target", "missing"], "error: missing is not a folder"),
        (["--source", "A", "--target", "B", "--size", "20"], "error: --size 20 is not a multiple of 8"),
        (["--source", "A", "--target", "B", "--charges", "2"], "error: --charges 2 is below --batch-size 32"),
        (["--resume", "nowhere"], "error: nowhere is not a training run (no config.json)"),
    ],
)
def test_cli_refuses_bad_settings_with_one_line(
    domains: tuple[Path, Path], args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    names = {"A": str(domains[0]), "B": str(domains[1])}
    code = main(["train", *[names.get(a, a) for a in args]])
    stderr = capsys.readouterr().err
    assert code in (1, 2)
    assert stderr.startswith(message) and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.parametrize(
    ("args", "charges", "width"),
    [
        (["--field", "tube"], 256, 5.0 * SIZE / 32),
        (["--field", "tube", "--size", "32"], 256, 5.0),
        (["--field", "tube", "--charges", "8", "--tube-width", "3"], 8, 3.0),
        (["--field", "coulomb"], 64, None),
    ],
)
def test_cli_defaults_for_charges_and_tube_width_follow_the_field_and_size(
    domains: tuple[Path, Path], tmp_path: Path, args: list[str], charges: int, width: float | None
) -> None:
    run = tmp_path / "run"
    source, target = (str(d) for d in domains)
    common = ["--source", source, "--target", target, "--size", str(SIZE), "--network", "tiny", "--batch-size", "4"]
    assert main(["train", *common, *args, "--steps", "1", "--out", str(run), "-q"]) == 0
    recorded = json.loads((run / "config.json").read_text())["settings"]
    assert recorded["charges"] == charges
    assert recorded["field"]["S"] == pytest.approx(width if width is not None else 5.0 * SIZE / 32)
    stored = Capacitor.from_pretrained(run / "model").config
    assert stored["training"]["charges_per_plate"] == charges
    assert stored["field"].get("S") == (pytest.approx(width) if width is not None else None)


def test_resume_with_more_steps_stretches_the_cosine_to_the_new_end(
    domains: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    source, target = (str(d) for d in domains)
    common = ["--size", str(SIZE), "--network", "tiny", "--charges", "8", "--batch-size", "4", "--log-every", "1"]
    first = ["train", "--source", source, "--target", target, *common, "--warmup", "2", "--steps", "4"]
    assert main([*first, "--lr-decay", "cosine", "--out", str(run), "-q"]) == 0
    assert main(["train", "--resume", str(run), "--steps", "10"]) == 0
    assert "warning: the schedule now ends at step 10 (was 4)" in capsys.readouterr().err
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert settings["schedule"]["total"] == 10
    stretched = Schedule(**settings["schedule"])
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 11))
    # Steps 5..10 follow the 10-step cosine, well above the floor where the 4-step schedule had already ended.
    assert [r["lr"] for r in logged[4:]] == pytest.approx([stretched.lr_at(k) for k in range(4, 10)])
    assert logged[4]["lr"] > 2 * stretched.lr * stretched.final
    assert main(["train", "--resume", str(run), "--steps", "6"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {run} is already at step 10, past the 6 steps asked for")
    assert sum(line.startswith("error:") for line in lines) == 1 and "warning" not in "".join(lines)


def test_python_callers_get_the_command_lines_settings_rules(domains: tuple[Path, Path]) -> None:
    source, target = (str(d) for d in domains)
    settings = new_settings(source, target, size=32, field="tube")
    assert (settings.charges, settings.field.L, settings.field.S) == (256, 20.0, 5.0)
    assert settings.schedule.total == 20000 and settings.schedule.decay == "cosine"
    assert new_settings(source, target, field="coulomb").field.L == 10.0
    for bad, message in (
        ({"size": 20}, "--size 20 is not a multiple of 8"),
        ({"charges": 8, "points": 16}, "--charges 8 is below --batch-size 16"),
        ({"source_name": "x", "target_name": "x"}, "both plates would be called 'x'"),
    ):
        with pytest.raises(SettingsError, match=message):
            new_settings(source, target, **bad)
    with pytest.raises(SettingsError, match="the same"):
        new_settings(source, source)


def test_run_configs_from_before_the_mode_rename_still_resume() -> None:
    old = settings(Path("a"), Path("b"), field=FieldSpec(mode="phys")).to_json()
    old["field"]["target"] = old["field"].pop("mode")
    assert RunSettings.from_json(old).field.mode == "phys"


def test_cli_ctrl_c_checkpoints_at_a_step_boundary_and_resume_matches(
    run_efm: Run, domains: tuple[Path, Path], tmp_path: Path
) -> None:
    source, target = (str(d) for d in domains)
    common = ["--source", source, "--target", target, *TINY, "--steps", "30", "--warmup", "2"]
    whole = tmp_path / "whole"
    assert run_efm("train", *common, "--out", str(whole), "-q").returncode == 0
    cut = tmp_path / "cut"
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "EFM_DEBUG")}
    process = subprocess.Popen(
        [sys.executable, "-m", "efm_cli", "train", *common, "--out", str(cut)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        metrics = cut / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert stderr.strip().endswith("error: interrupted")
    stopped_at = int(checkpoint.latest(cut / "checkpoints").name.split("-")[1])
    assert 3 <= stopped_at < 30
    done = run_efm("train", "--resume", str(cut), "-q")
    assert done.returncode == 0, done.stderr
    assert losses(cut) == losses(whole)


def test_two_processes_train_like_one_with_the_same_global_batch(
    domains: tuple[Path, Path], tmp_path: Path, run_efm: Run
) -> None:
    source, target = (str(d) for d in domains)
    common = ["train", "--source", source, "--target", target, *TINY, "--steps", "4", "--device", "cpu", "-q"]
    single = run_efm(*common, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "EFM_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = subprocess.run(
        [*launcher, "-m", "efm_cli", *common, "--out", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert double.returncode == 0, double.stderr[-2000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a = Capacitor.from_pretrained(tmp_path / "one" / "model").network.state_dict()
    b = Capacitor.from_pretrained(tmp_path / "two" / "model").network.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


# --- proof that it learns: a 2-D toy ------------------------------------------------------------------------------


def toy_capacitor(kind: str, steps: int) -> tuple[MLPField, FieldSpec]:
    """Train the toy MLP on Gaussian → two-Gaussian mixture (the papers' first toy); the EMA net."""
    from test_physics import gaussian, two_gaussians

    torch.manual_seed(0)
    L = 6.0
    spec = FieldSpec(kind=kind, L=L, eps=0.05, plan="ot", S=1.0, mode="phys")  # type: ignore[arg-type]
    config = MLPConfig(dim=2, width=128, depth=3, L=L)
    schedule = Schedule(lr=2e-3, warmup=50, decay="cosine", total=steps, ema=0.99)
    trainer = Trainer(MLPField(config), spec, schedule, points=128)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        trainer.step_on(gaussian(256, gen).float(), two_gaussians(256, gen).float())
    return trainer.ema_network(MLPField(config)), spec


def carried(kind: str) -> tuple[Solution, Tensor, float, float, float]:
    """Held-out points carried by a freshly trained toy capacitor: solution, points, distance, floor, untouched."""
    from test_physics import distance_and_floor, gaussian, two_gaussians

    net, spec = toy_capacitor(kind, 600)
    gen = torch.Generator().manual_seed(7)
    held_out = gaussian(512, gen).float()
    with torch.no_grad():
        solution = integrate(net, held_out, spec.eps, spec.L - spec.eps, rtol=1e-3, atol=1e-3)
    distance, floor = distance_and_floor(solution.x.double(), two_gaussians, gen)
    untouched, _ = distance_and_floor(held_out.double(), two_gaussians, gen)
    return solution, held_out, distance, floor, untouched


def test_a_trained_tube_capacitor_carries_held_out_points_onto_the_target() -> None:
    solution, _, distance, floor, untouched = carried("tube")
    assert solution.landed.all(), solution.summary()
    assert distance <= 3 * floor, (distance, floor)  # measured 2.2× the floor; untouched points are 190×
    assert untouched > 30 * floor


def test_a_trained_coulomb_capacitor_splits_the_source_between_both_target_clusters() -> None:
    """What forward Coulomb lines can do (see test_physics: even the exact field misses the 3× floor, because the
    flux leaving the source backwards is not followed): every point lands, half on each cluster, much nearer the
    target than it started. Measured: 0.18 of the untouched distance."""
    solution, _, distance, _, untouched = carried("coulomb")
    assert solution.landed.all(), solution.summary()
    right = (solution.x[:, 0] > 0).float().mean().item()
    assert 0.3 < right < 0.7  # measured 0.61: a short run leaves the split uneven, but both clusters get points
    assert (solution.x[:, 0].abs() > 4).float().mean() > 0.8  # on the clusters at ±8, not left between them
    assert distance < 0.3 * untouched, (distance, untouched)
