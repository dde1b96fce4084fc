"""`efm distill` (efm_cli.training.distill): the straight-line target, a short distillation that lands closer to the
teacher with few Euler steps than the teacher itself does, the exported capacitor, cached pairs on --resume, the
`distilled` config record, and the command's refusals."""

import copy
import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, Run, climbing_capacitor, digests, one_error_line, shapes
from PIL import Image

from efm_cli.capacitor.format import CONFIG_NAME, CapacitorError, new_config, validate
from efm_cli.capacitor.model import Capacitor
from efm_cli.integrator import integrate
from efm_cli.network import preset
from efm_cli.training import distill as dist

L = 6.0
LEVELS = 127.5


def teacher() -> Capacitor:
    """A tiny random teacher whose field has about the norm √N that trained fields have (their targets' norm):
    f_z ≈ 20 and |f_x| ≈ 19 at 16×16 (√N ≈ 27.7), so its lines move images by about 9 levels and bend a little."""
    config = new_config(
        source="square",
        target="disc",
        network=preset("tiny", size=TINY, L=L).to_dict(),
        field={"kind": "tube", "L": L, "S": 1.0},
        size=TINY,
        sampler={"solver": "dopri5", "rtol": 1e-3, "atol": 1e-3},
    )
    capacitor = climbing_capacitor(config, seed=1, everything=True)
    network = capacitor.network
    with torch.no_grad():
        network.conv_out.bias[-1] = 20.0 / network.z_scale
        network.conv_out.weight[:-1] *= 10.0
        network.conv_out.bias[:-1] *= 10.0
    return capacitor


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved teacher and two small image folders, shared by the module's tests (none may change them)."""
    root = tmp_path_factory.mktemp("distill")
    teacher().save_pretrained(root / "teacher")
    shapes(root / "squares", "square", 20, seed=0)
    shapes(root / "discs", "disc", 10, seed=1)
    (root / "empty").mkdir()
    return root


def settings(data: Path, **changes: object) -> dist.DistillSettings:
    base = dist.DistillSettings(
        teacher=str(data / "teacher"),
        source=str(data / "squares"),
        target=str(data / "discs"),
        steps=120,
        lr=1e-3,
        seed=0,
    )
    return replace(base, **changes)


def rms_levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).flatten(1).square().mean(1).sqrt() * LEVELS


def test_a_field_along_the_straight_target_carries_a_onto_b_with_any_euler_step_count() -> None:
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    b = torch.rand(5, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = 1e-3
    z0, z1 = eps, L - eps
    target = dist.straight_target(a, b, z1 - z0)
    n = 1 + 3 * 4 * 4
    # Scaled like the teacher's training targets (norm √N), and its slope is the chord's.
    torch.testing.assert_close(target.norm(dim=1), torch.full((5,), n**0.5, dtype=torch.float64))
    torch.testing.assert_close(target[:, 1:] / target[:, :1], (b - a).flatten(1) / (z1 - z0))

    def field(z: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return target[:, 0], target[:, 1:].view_as(x)  # constant along each line: what a straight field is

    for steps in (1, 2, 4):
        forward = integrate(field, a, z0, z1, solver="euler", steps=steps)
        backward = integrate(field, b, z1, z0, solver="euler", steps=steps)
        torch.testing.assert_close(forward.x, b, rtol=0, atol=1e-12)
        torch.testing.assert_close(backward.x, a, rtol=0, atol=1e-12)
    z, x = dist.line_points(a, b, torch.tensor([0.0, 1.0, 0.5, 0.25, 1.0], dtype=torch.float64), z0, z1)
    torch.testing.assert_close(z, torch.tensor([z0, z1, (z0 + z1) / 2, z0 + (z1 - z0) / 4, z1], dtype=torch.float64))
    torch.testing.assert_close(x[0], a[0])
    torch.testing.assert_close(x[2], (a[2] + b[2]) / 2)


def distilled_config(**record: object) -> dict:
    good = {
        "teacher": "runs/h2z/model",
        "pairs": 90,
        "held_out": 10,
        "steps": 1000,
        "nfe": 2,
        "errors": {"1": {"student": 1.5, "teacher": 9.0}, "2": {"student": 0.7, "teacher": 4.0}},
    }
    config = teacher().config
    return {**config, "sampler": {"solver": "euler", "steps": 2}, "distilled": {**good, **record}}


def test_the_config_accepts_a_distilled_record_and_refuses_malformed_ones() -> None:
    assert validate(distilled_config())["distilled"]["nfe"] == 2
    bad = [
        {"nfe": 3},
        {"nfe": True},
        {"pairs": 0},
        {"steps": -1},
        {"held_out": 1.5},
        {"teacher": ""},
        {"teacher": "a\x1b[2Jb"},
        {"errors": {"3": {"student": 1.0, "teacher": 1.0}}},
        {"errors": {"1": {"student": float("nan"), "teacher": 1.0}}},
        {"errors": {"1": {"student": -1.0, "teacher": 1.0}}},
        {"errors": {"1": {"student": 1.0}}},
        {"errors": [1.0]},
    ]
    for change in bad:
        with pytest.raises(CapacitorError, match="'distilled'"):
            validate(distilled_config(**change))
    with pytest.raises(CapacitorError, match="'distilled'"):
        validate({**teacher().config, "distilled": "yes"})


def test_a_short_distillation_lands_closer_with_few_steps_and_exports_a_capacitor_resume_reuses_its_pairs(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    before = digests(data)
    run = tmp_path / "run"
    summary = dist.distill(settings(data), run)
    assert (summary.step, summary.total, summary.stopped) == (120, 120, "steps")
    assert (summary.pairs, summary.forward_pairs, summary.backward_pairs, summary.dropped) == (30, 20, 10, 0)
    assert (summary.train_pairs, summary.held_out, summary.reused_pairs) == (27, 3, False)
    by_k = {row.steps: row for row in summary.errors}
    assert by_k[1].student_mean < 0.7 * by_k[1].teacher_mean
    assert by_k[2].student_mean < by_k[2].teacher_mean

    # The exported folder is a plain capacitor: it loads, its sampler is Euler with the chosen steps, and it lands
    # nearer the teacher's own translations than the teacher's field does with one Euler step (measured here, on
    # every source image, independently of the run's held-out numbers).
    student = Capacitor.from_pretrained(run / "model")
    assert summary.nfe == 4 and summary.chosen_by == "the default"  # 4 steps unless --nfe says otherwise
    assert student.config["sampler"] == {"solver": "euler", "steps": 4}
    record = student.config["distilled"]
    assert (record["teacher"], record["pairs"], record["held_out"], record["steps"]) == (
        str(data / "teacher"),
        27,
        3,
        120,
    )
    assert record["nfe"] == summary.nfe and set(record["errors"]) == {"1", "2", "4"}
    assert json.loads((run / "distill.json").read_text())["nfe"] == summary.nfe
    original = Capacitor.from_pretrained(data / "teacher")
    from efm_cli.capacitor.sampler import load_folder

    images, _ = load_folder(original, data / "squares")
    reference = original.translate(images).images
    one_step = rms_levels(original.translate(images, solver="euler", steps=1).images, reference).mean()
    distilled = student.translate(images, solver="euler", steps=1)
    assert int(distilled.solution.nfe.max()) == 1
    assert rms_levels(distilled.images, reference).mean() < 0.7 * one_step

    # --resume with more steps: the cached pairs are read back, not integrated again, and the student continues.
    pairs_digest = hashlib.sha256((run / dist.PAIRS_NAME).read_bytes()).hexdigest()

    def no_integration(*args: object, **kwargs: object) -> None:
        raise AssertionError("the teacher integrated again")

    monkeypatch.setattr(dist, "integrate_teacher", no_integration)
    again = dist.distill(settings(data, steps=130), run, resume=True)
    assert again.reused_pairs and (again.step, again.total) == (130, 130)
    assert hashlib.sha256((run / dist.PAIRS_NAME).read_bytes()).hexdigest() == pairs_digest
    assert Capacitor.from_pretrained(run / "model").config["distilled"]["steps"] == 130
    assert digests(data) == before


def test_runs_with_the_same_seed_give_the_same_student(data: Path, tmp_path: Path, one_thread: None) -> None:
    few = settings(data, steps=5, pairs=6)
    first = dist.distill(few, tmp_path / "one")
    second = dist.distill(copy.copy(few), tmp_path / "two")
    assert first.errors == second.errors
    weights = [(tmp_path / run / "model" / "model.safetensors").read_bytes() for run in ("one", "two")]
    assert weights[0] == weights[1]
    assert first.pairs == 6 and first.forward_pairs == 3 and first.backward_pairs == 3


def test_a_latent_teacher_distils_into_a_latent_student_with_its_autoencoder(
    data: Path, tmp_path: Path, one_thread: None
) -> None:
    from test_latent import latent_capacitor

    latent_capacitor(tmp_path / "ae").save_pretrained(tmp_path / "latent")
    summary = dist.distill(settings(data, teacher=str(tmp_path / "latent"), steps=3, pairs=4), tmp_path / "run")
    pairs = dist.load_pairs(tmp_path / "run" / dist.PAIRS_NAME)
    assert pairs.a.shape == (4, 4, 8, 8)  # the field's space: 4-channel codes of the 32×32 images
    student = Capacitor.from_pretrained(tmp_path / "run" / "model")
    assert student.latent and student.config["sampler"] == {"solver": "euler", "steps": summary.nfe}
    assert student.translate(torch.zeros(1, 3, 32, 32)).images.shape == (1, 3, 32, 32)


def test_the_command_distils_and_its_capacitor_translates(data: Path, tmp_path: Path, run_efm: Run) -> None:
    before = digests(data)
    out = tmp_path / "fast"
    common = ("--source", str(data / "squares"), "--out", str(out), "--steps", "10", "--nfe", "1", "--pairs", "8")
    done = run_efm("distill", str(data / "teacher"), *common, "--lr", "1e-3", "--json", "-q")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["nfe"], report["step"], report["pairs"]) == (1, 10, 8)
    assert json.loads((out / "model" / CONFIG_NAME).read_text())["sampler"] == {"solver": "euler", "steps": 1}
    with Image.open(out / "model" / "sample.png") as sample:  # the held-out pair: input, teacher's, student's
        assert sample.size == (TINY, 3 * TINY + 4)
        rows = np.asarray(sample.convert("RGB"), dtype=np.float32).reshape(-1, TINY, 3)
    start, teacher_end, student_end = rows[:TINY], rows[TINY + 2 : 2 * TINY + 2], rows[2 * TINY + 4 :]
    assert np.abs(teacher_end - start).mean() > 2 and np.abs(student_end - start).mean() > 2
    translated = run_efm("translate", str(data / "squares"), "-m", str(out / "model"), "-o", str(tmp_path / "t"), "-q")
    assert translated.returncode == 0, translated.stderr
    assert len(list((tmp_path / "t").glob("*.png"))) == 20

    # Installed beside its teacher, the student leaves --to to the teacher and answers --to with --fast.
    weights = tmp_path / "weights"
    shutil.copytree(data / "teacher", weights / "shapes")
    shutil.copytree(out / "model", weights / "shapes-fast")
    env = {"EFM_WEIGHTS_DIR": str(weights)}
    for extra, picked in (((), "shapes"), (("--fast",), "shapes-fast")):
        args = ("translate", str(data / "discs"), "--to", "square", *extra, "-o", str(tmp_path / picked), "--json")
        done = run_efm(*args, env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["model"] == picked
    listed = {row["name"]: row for row in json.loads(run_efm("models", "--json", env=env).stdout)["models"]}
    assert listed["shapes-fast"]["distilled_from"] == str(data / "teacher")
    assert listed["shapes"]["distilled_from"] is None
    assert listed["shapes-fast"]["sampler"] == {"solver": "euler", "steps": 1}
    both = run_efm("translate", str(data / "discs"), "--fast", "-m", "shapes-fast", env=env)
    assert both.returncode == 2 and "--fast" in both.stderr

    refusals = [
        (("--source", str(data / "missing")), 2, "does not exist"),
        (("--source", str(data / "empty"), "--out", str(tmp_path / "e")), 1, "no readable images"),
        (("--source", str(data / "squares"), "--nfe", "3"), 2, "--nfe"),
        (common, 1, "already holds files"),
    ]
    for args, code, reason in refusals:
        failed = run_efm("distill", str(data / "teacher"), *args)
        assert failed.returncode == code, (args, failed.stderr)
        assert reason in one_error_line(failed.stderr)
    assert not (tmp_path / "e").exists()
    assert digests(data) == before


def test_pairs_that_eat_the_minutes_are_warned_about_early_kept_and_trained_on_by_resume(
    data: Path, tmp_path: Path, one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dist.integrate_teacher

    def slow(*args: object, **kwargs: object) -> object:  # a teacher at 0.2 s per batch against 0.6 s of budget
        def late(count: int) -> None:
            time.sleep(0.2)
            on_batch(count)

        on_batch = kwargs.pop("on_batch")
        return real(*args, on_batch=late, **kwargs)

    monkeypatch.setattr(dist, "integrate_teacher", slow)
    warnings: list[str] = []
    run = tmp_path / "run"
    with pytest.raises(dist.DistillError, match="left to train") as refused:
        dist.distill(settings(data, steps=None, minutes=0.01), run, warn=warnings.append)
    assert f"--resume {run}" in refused.value.hint
    assert len(warnings) == 1 and "pairs take about" in warnings[0] and "--pairs" in warnings[0]
    assert len(dist.load_pairs(run / dist.PAIRS_NAME)) == 30 and not (run / "model").exists()
    monkeypatch.setattr(dist, "integrate_teacher", real)
    again = dist.distill(settings(data, steps=3, minutes=None), run, resume=True)
    assert again.reused_pairs and again.step == 3 and (run / "model" / CONFIG_NAME).is_file()


def test_euler_heights_train_the_student_only_where_euler_with_one_two_or_four_steps_evaluates_it() -> None:
    """With heights="euler" every training point sits at 0, 1/4, 1/2, 3/4 or 1 of the way between the plates (the
    nodes of Euler with 1, 2 or 4 steps up or down), all five are drawn, and uniform heights are not so limited."""
    capacitor = teacher()
    field_config = capacitor.config["field"]
    spec = dist.FieldSpec(kind="tube", L=float(field_config["L"]), eps=float(field_config.get("eps", 1e-3)))
    schedule = dist.Schedule(lr=1e-4, warmup=0, decay="cosine", total=10, ema=0.9)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(8, 3, TINY, TINY, generator=gen) * 2 - 1 for _ in range(2))
    z0, z1 = spec.eps, spec.L - spec.eps
    seen: dict[str, list[torch.Tensor]] = {"uniform": [], "euler": []}
    for heights, heights_seen in seen.items():
        network = copy.deepcopy(capacitor.network)
        original = network.forward

        def recording(z: torch.Tensor, x: torch.Tensor, into: list = heights_seen, run=original) -> object:
            into.append(((z - z0) / (z1 - z0)).detach())
            return run(z, x)

        network.forward = recording
        trainer = dist._Reflow(network, spec, schedule, batch=64, seed=0, heights=heights)
        for _ in range(3):
            trainer.step_on(a, b)
    fractions = torch.cat(seen["euler"]).double()
    nodes = torch.tensor(dist.EULER_NODES, dtype=torch.float64)
    assert dist.EULER_NODES == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert (fractions[:, None] - nodes).abs().min(dim=1).values.max() < 1e-5
    assert len({round(float(f), 4) for f in fractions}) == 5
    uniform = torch.cat(seen["uniform"]).double()
    assert (uniform[:, None] - nodes).abs().min(dim=1).values.max() > 0.01
    with pytest.raises(dist.UsageError, match="--heights"):
        dist.DistillSettings(teacher="x", source="y", heights="middle")
    assert dist.DistillSettings.from_json({"teacher": "x", "source": "y"}).heights == "uniform"  # runs made before


def test_the_student_trains_without_the_teachers_dropout_unless_asked_and_its_config_says_so(tmp_path: Path) -> None:
    config = teacher().config
    config["network"] = {**config["network"], "dropout": 0.2}
    dropping = climbing_capacitor(config, seed=1)
    rates = {}
    for dropout in (0.0, None, 0.5):
        run = tmp_path / str(dropout)
        choice = dist.DistillSettings(teacher="t", source="s", steps=1, dropout=dropout)
        trainer, _ = dist._student(dropping, choice, run, torch.device("cpu"), resume=False)
        rates[dropout] = {m.p for m in trainer.network.modules() if isinstance(m, torch.nn.Dropout)}
        exported = dist.distilled_config(dropping, choice, 1, [], 1, 1, 1)
        assert exported["network"]["dropout"] == (0.2 if dropout is None else dropout)
    assert rates == {0.0: {0.0}, None: {0.2}, 0.5: {0.5}}
    assert {m.p for m in dropping.network.modules() if isinstance(m, torch.nn.Dropout)} == {0.2}  # teacher untouched
    assert dist.DistillSettings.from_json({"teacher": "x", "source": "y"}).dropout is None  # runs made before
    with pytest.raises(dist.UsageError, match="dropout"):
        dist.DistillSettings(teacher="x", source="y", dropout=1.0)


def test_a_resume_without_steps_or_minutes_keeps_the_runs_length_and_only_exports_again(
    data: Path, tmp_path: Path, run_efm: Run
) -> None:
    """A time-sized run stores its --max-minutes; `--resume RUN --nfe 1` must not spend them again on training,
    and its report keeps the time and losses of the session that trained."""
    run = tmp_path / "run"
    common = ("--source", str(data / "squares"), "--out", str(run), "--steps", "6", "--pairs", "6", "-q")
    assert run_efm("distill", str(data / "teacher"), *common).returncode == 0
    trained = json.loads((run / "distill.json").read_text())
    stored = json.loads((run / "config.json").read_text())
    stored["settings"] |= {"steps": None, "minutes": 30.0}  # as `--max-minutes 30` leaves it
    (run / "config.json").write_text(json.dumps(stored))
    again = run_efm("distill", "--resume", str(run), "--nfe", "1", "--json", "-q")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["step"], report["total"], report["nfe"]) == (6, 6, 1)
    kept = ("seconds", "steps_per_s", "loss_start", "loss_end")
    assert trained["seconds"] > 0 and trained["loss_end"] is not None
    assert {key: report[key] for key in kept} == {key: trained[key] for key in kept}
    assert json.loads((run / "distill.json").read_text())["loss_end"] == trained["loss_end"]
    assert json.loads((run / "model" / CONFIG_NAME).read_text())["sampler"] == {"solver": "euler", "steps": 1}
    assert json.loads((run / "config.json").read_text())["settings"]["minutes"] is None
