"""Latent capacitors: autoencoders in the diffusers format, the field in their latent space, and everything a user
does with such a capacitor (train, translate at the input's size, eval, models, push, download)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_AE, climbing_capacitor, noise_pixels, shapes, subprocess_env
from hub_server import TOKEN, HubServer
from PIL import Image

from efm_cli import translate as tr
from efm_cli.autoencoder import Autoencoder, AutoencoderError, LatentScale
from efm_cli.capacitor import hub
from efm_cli.capacitor.card import render
from efm_cli.capacitor.format import CapacitorError, new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.cli.app import main
from efm_cli.errors import UsageError
from efm_cli.images import to_tensor
from efm_cli.network import preset
from efm_cli.training.autoencoder import PRESETS, AutoencoderSettings, reconstruction_loss, reconstruction_report
from efm_cli.training.run import SettingsError, new_settings

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_hub")
SIZE = 32
WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_autoencoder(folder: Path, seed: int = 0) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Autoencoder(TINY_AE).save(folder)


def latent_capacitor(folder: Path) -> Capacitor:
    """A climbing latent capacitor over `tiny_autoencoder`, with made-up latent statistics."""
    autoencoder = Autoencoder.from_folder(tiny_autoencoder(folder))
    latent = {"kind": "AutoencoderTiny", "factor": 4, "channels": 4, "mean": [0.1, -0.2, 0.0, 0.3]}
    latent |= {"std": [0.5, 1.0, 2.0, 0.25], "origin": "random, for tests"}
    config = new_config(
        source="horse",
        target="zebra",
        network=preset("tiny", channels=4, size=SIZE // 4, L=6.0).to_dict(),
        field={"kind": "tube", "L": 6.0, "S": 1.0},
        size=SIZE,
        sampler={"solver": "dopri5", "rtol": 1e-2, "atol": 1e-2},
        latent=latent,
    )
    return climbing_capacitor(config, autoencoder=autoencoder)


def images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


# --- the autoencoder --------------------------------------------------------------------------------------------


def test_our_folders_are_diffusers_folders_and_back(tmp_path: Path) -> None:
    """What efm writes, diffusers reads (and the reverse): same codes, same reconstructions."""
    import diffusers

    folder = tiny_autoencoder(tmp_path / "ae")
    ours = Autoencoder.from_folder(folder)
    theirs = diffusers.AutoencoderTiny.from_pretrained(folder).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x).latents)
        torch.testing.assert_close(ours(x), theirs.decode(theirs.encode(x).latents).sample)
    theirs.save_pretrained(tmp_path / "saved")
    again = Autoencoder.from_folder(tmp_path / "saved")
    assert ours.latent_shape(SIZE) == again.latent_shape(SIZE) == (4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), ours.encode(x))


def test_an_autoencoder_kl_is_read_too(tmp_path: Path) -> None:
    import diffusers

    config = {"block_out_channels": [8, 8], "layers_per_block": 1, "latent_channels": 2, "norm_num_groups": 4}
    config |= {"down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    torch.manual_seed(0)
    diffusers.AutoencoderKL(**config).save_pretrained(tmp_path / "kl")
    kl = Autoencoder.from_folder(tmp_path / "kl")
    assert (kl.kind, kl.factor, kl.latent_shape(16)) == ("AutoencoderKL", 2, (2, 8, 8))
    x = images(2)[:, :, :16, :16]
    with torch.no_grad():
        codes = kl.encode(x)
        torch.testing.assert_close(codes, kl.encode(x))  # the posterior's mean: deterministic
        assert kl.decode(codes).shape == x.shape


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(_class_name="UNet2DModel"), "is not one of AutoencoderTiny, AutoencoderKL"),
        (lambda c: c.update(encoder_block_out_channels=[8, 16, 8]), "must repeat one width"),
        (lambda c: c.update(num_encoder_blocks=[0, 1]), "differ in length"),
        (lambda c: c.update(latent_channels=0), "latent_channels must be an integer"),
        (lambda c: c.update(in_channels=1), "3 input and output channels"),
        (lambda c: c.update(act_fn="os.system"), "unknown act_fn"),
        (lambda c: c.update(encoder_block_out_channels=["8"] * 3), "must be 1 to 8 integers"),
        (
            lambda c: c.update(encoder_block_out_channels=[2048] * 8, num_encoder_blocks=[16] * 8),
            "describes .* parameters; at most",
        ),
    ],
)
def test_malformed_autoencoder_configs_are_refused_before_anything_is_built(tmp_path: Path, edit, message) -> None:
    folder = tiny_autoencoder(tmp_path / "ae")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AutoencoderError, match=message):
        Autoencoder.from_folder(folder)


def test_autoencoder_weights_are_safetensors_matching_the_config(tmp_path: Path) -> None:
    folder = tiny_autoencoder(tmp_path / "ae")
    weights = folder / "diffusion_pytorch_model.safetensors"
    other = Autoencoder({**TINY_AE, "latent_channels": 2}).save(tmp_path / "other")
    weights.write_bytes((other / weights.name).read_bytes())
    with pytest.raises(AutoencoderError, match=r"diffusion_pytorch_model\.safetensors: 'decoder.* has shape"):
        Autoencoder.from_folder(folder)
    weights.unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(AutoencoderError, match=r"has no diffusion_pytorch_model\.safetensors"):
        Autoencoder.from_folder(folder)


def test_latent_statistics_match_float64_and_invert() -> None:
    generator = torch.Generator().manual_seed(0)
    codes = torch.randn(50, 3, 4, 4, generator=generator) * torch.tensor([1.0, 3.0, 0.2])[None, :, None, None] + 5
    scale = LatentScale.measure(codes)
    flat = codes.double().numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(scale.to_config()["mean"], flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(scale.to_config()["std"], flat.std(1, ddof=1), rtol=1e-6)
    normal = scale.normalise(codes)
    assert normal.transpose(0, 1).reshape(3, -1).std(1).sub(1).abs().max() < 1e-4
    torch.testing.assert_close(scale.restore(normal), codes)
    with pytest.raises(AutoencoderError, match="positive std"):
        LatentScale([0.0], [0.0])


def test_reconstruction_report_against_numpy() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(4, 3, 24, 24, generator=generator) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(a, 3, stride=1, padding=1, count_include_pad=False)
    report = reconstruction_report(a, blurred)
    x, y = (a.double().numpy() + 1) / 2, (blurred.double().numpy() + 1) / 2
    psnr = np.mean([10 * np.log10(1 / np.mean((x[i] - y[i]) ** 2)) for i in range(4)])
    assert report["psnr"] == pytest.approx(psnr, abs=1e-3)
    assert 0 < report["texture"] < 0.7  # a 3×3 box blur removes most of the gradient energy of noise
    assert reconstruction_report(a, a)["texture"] == pytest.approx(1.0)
    assert reconstruction_report(a, a)["ssim"] == pytest.approx(1.0)


# --- latent capacitors ------------------------------------------------------------------------------------------


def test_a_latent_capacitor_round_trips_with_its_autoencoder(tmp_path: Path) -> None:
    capacitor = latent_capacitor(tmp_path / "ae")
    folder = capacitor.save_pretrained(tmp_path / "cap")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "autoencoder/config.json",
        "autoencoder/diffusion_pytorch_model.safetensors",
        "config.json",
        "model.safetensors",
    ]
    loaded = Capacitor.from_pretrained(folder)
    assert loaded.latent and loaded.config == json.loads((folder / "config.json").read_text())
    x = images()
    first, second = capacitor.translate(x, to="zebra", reconstruct=True), loaded.translate(x, to="zebra")
    torch.testing.assert_close(first.images, second.images)
    assert first.images.shape == x.shape and first.solution.x.shape == (3, 4, 8, 8)
    assert first.reconstruction is not None
    with torch.no_grad():
        ae = capacitor.autoencoder
        torch.testing.assert_close(first.reconstruction, ae.decode(ae.encode(x)))
    # The field moved normalised codes: decoding the integrator's end points gives the translation.
    torch.testing.assert_close(capacitor.decode(first.solution.x), first.images)


def test_a_latent_capacitor_needs_the_autoencoder_its_config_names(tmp_path: Path) -> None:
    folder = latent_capacitor(tmp_path / "ae").save_pretrained(tmp_path / "cap")
    Autoencoder({**TINY_AE, "latent_channels": 2}).save(folder / "autoencoder")
    with pytest.raises(CapacitorError, match=r"does not match config\.json's latent section"):
        Capacitor.from_pretrained(folder)
    (folder / "autoencoder" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CapacitorError, match=r"has no diffusion_pytorch_model\.safetensors"):
        hub.check_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    config["latent"]["std"][0] = -1.0
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CapacitorError, match="standard deviations must be positive"):
        hub.check_folder(folder)


def test_detail_adds_back_what_the_autoencoder_lost() -> None:
    """A translation that changes nothing, through a blurry autoencoder, comes out as the input with --detail:
    the detail is measured against the reconstruction, not the input. (Detail is luminance: a grey picture.)"""
    rgb = np.repeat(noise_pixels(32, 32, 1, 0)[:, :, None], 3, axis=2)
    original = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    blurred = torch.nn.functional.avg_pool2d(original[None], 5, stride=1, padding=2, count_include_pad=False)[0]
    kept = tr.compose(rgb, blurred, blurred, detail=True, reconstructed=True)
    assert np.abs(kept.astype(int) - rgb.astype(int)).mean() < 2
    plain = tr.compose(rgb, blurred, blurred, detail=True)  # a pixel capacitor at the input's size adds nothing
    assert np.abs(plain.astype(int) - rgb.astype(int)).mean() > 20


def test_translate_trace_and_card_of_a_latent_capacitor(tmp_path: Path) -> None:
    capacitor = latent_capacitor(tmp_path / "ae")
    folder = capacitor.save_pretrained(tmp_path / "cap")
    photos = tmp_path / "photos"
    photos.mkdir()
    for index, (width, height) in enumerate([(40, 30), (32, 32), (17, 50)]):
        Image.fromarray(noise_pixels(width, height, 3, index)).save(photos / f"{index}.png")
    assert main(["translate", str(photos), "--model", str(folder), "--out", str(tmp_path / "out"), "-q"]) == 0
    sizes = sorted(Image.open(path).size for path in (tmp_path / "out").glob("*.png"))
    assert sizes == [(17, 50), (32, 32), (40, 30)]
    _, states = tr.trace(capacitor, images(2), direction="forward", frames=4)
    assert states.shape == (2, 4, 3, SIZE, SIZE) and states.abs().max() <= 1
    with torch.no_grad():
        ae = capacitor.autoencoder
        torch.testing.assert_close(states[:, 0], ae.decode(ae.encode(images(2))), atol=1e-4, rtol=0)
    card = render(capacitor.config, "bob/latent")
    assert "| space | latent |" in card and "AutoencoderTiny in autoencoder/, 4× smaller, 4×8×8 codes" in card


def test_train_latent_end_to_end_then_models_and_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = shapes(tmp_path / "squares", "square", 8, 0), shapes(tmp_path / "discs", "disc", 8, 1)
    autoencoder = tiny_autoencoder(tmp_path / "ae")
    run = tmp_path / "run"
    common = ["--network", "tiny", "--charges", "4", "--batch-size", "2", "--warmup", "1", "--sample-every", "2"]
    args = ["train", "--source", str(source), "--target", str(target), "--latent", str(autoencoder), *common]
    assert main([*args, "--size", "16", "--steps", "3", "--out", str(tmp_path / "bad")]) == 2
    assert "--size 16 is not a multiple of 32" in capsys.readouterr().err
    assert main([*args, "--size", str(SIZE), "--steps", "2", "--out", str(run), "-q"]) == 0
    (tmp_path / "ae" / "config.json").unlink()  # the run keeps its own copy of the autoencoder
    assert main(["train", "--resume", str(run), "--steps", "4", "-q"]) == 0
    model = Capacitor.from_pretrained(run / "model")
    latent = model.config["latent"]
    assert model.config["training"]["steps"] == 4 and latent["origin"] == str(autoencoder.resolve())
    assert (latent["kind"], latent["factor"], latent["channels"]) == ("AutoencoderTiny", 4, 4)
    assert model.config["field"]["S"] == pytest.approx(2 * 5.0 * math.sqrt(4 * 8 * 8 / (3 * 32 * 32)))
    # The statistics are those of both plates' codes, so normalised codes have unit variance per channel.
    with torch.no_grad():
        loaded = torch.stack(
            [to_tensor(np.asarray(Image.open(p).convert("RGB")), SIZE) for p in sorted(source.glob("*.png"))]
            + [to_tensor(np.asarray(Image.open(p).convert("RGB")), SIZE) for p in sorted(target.glob("*.png"))]
        )
        codes = model.autoencoder.encode(loaded)
    measured = LatentScale.measure(codes).to_config()
    np.testing.assert_allclose(latent["mean"], measured["mean"], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(latent["std"], measured["std"], rtol=1e-3)
    assert Image.open(run / "samples" / "step-00000002.png").size[1] == 2 * SIZE + 2
    out = tmp_path / "squares-to-disc"
    assert main(["translate", str(source), "--model", str(run), "--out", str(out), "-q"]) == 0  # the run's model/
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in source.iterdir())
    capsys.readouterr()
    assert main(["models", str(run), "--json"]) == 0
    (row,) = [r for r in json.loads(capsys.readouterr().out)["models"] if r["origin"] == "path"]
    assert row["space"] == "latent" and row["autoencoder"] == {"kind": "AutoencoderTiny", "factor": 4, "channels": 4}
    report = tmp_path / "eval.json"
    eval_args = ["eval", "-m", str(run / "model"), "--source", str(source), "--target", str(target)]
    eval_args += ["--train-source", str(source), "--train-target", str(target)]
    assert main([*eval_args, "--report", str(report), "-q"]) == 0
    evaluated = json.loads(report.read_text())
    assert evaluated["speed"]["landed"] == 8
    # The autoencoder's own round trip of real images: the ceiling the translations are measured against.
    ceiling = evaluated["autoencoder"]
    assert set(ceiling) == {"target_rate", "robust_target_rate", "source_target_rate", "fd", "ssim"}
    assert 0 <= ceiling["robust_target_rate"] <= ceiling["target_rate"] <= 1 and ceiling["fd"] >= 0
    assert -1 <= ceiling["ssim"] < 1
    assert main(eval_args) == 0
    assert "autoencoder: robust" in capsys.readouterr().out


def test_new_settings_check_the_autoencoder(tmp_path: Path) -> None:
    source, target = shapes(tmp_path / "a", "square", 2, 0), shapes(tmp_path / "b", "disc", 2, 1)
    with pytest.raises(AutoencoderError, match="neither an autoencoder folder nor a Hub repo"):
        new_settings(str(source), str(target), size=SIZE, latent=str(tmp_path / "missing"))
    with pytest.raises(SettingsError, match="--size 24 is not a multiple of 32") as caught:
        new_settings(str(source), str(target), size=24, latent=str(tiny_autoencoder(tmp_path / "ae")))
    assert "makes images 4× smaller" in caught.value.hint


def test_push_and_download_a_latent_capacitor(hub_server: HubServer, tmp_path: Path) -> None:
    folder = latent_capacitor(tmp_path / "ae").save_pretrained(tmp_path / "cap")
    result = hub.push(folder, "bob/latent", token=TOKEN, endpoint=hub_server.url)
    assert set(result.files) == {
        "config.json",
        "model.safetensors",
        "README.md",
        "autoencoder/config.json",
        "autoencoder/diffusion_pytorch_model.safetensors",
    }
    downloaded = hub.download("bob/latent", endpoint=hub_server.url)
    for name in ("model.safetensors", "autoencoder/diffusion_pytorch_model.safetensors"):
        assert (downloaded / name).read_bytes() == (folder / name).read_bytes()
    x = images()
    torch.testing.assert_close(
        Capacitor.from_pretrained(downloaded).translate(x).images, Capacitor.from_pretrained(folder).translate(x).images
    )


def test_a_hub_autoencoder_can_be_trained_in(hub_server: HubServer, tmp_path: Path, run_efm) -> None:
    """`--latent user/name` reads a diffusers autoencoder published on the Hub (config and safetensors only)."""
    folder = tiny_autoencoder(tmp_path / "ae")
    files = {name: (folder / name).read_bytes() for name in ("config.json", "diffusion_pytorch_model.safetensors")}
    hub_server.add("someone/tiny-vae", files | {"diffusion_pytorch_model.bin": b"\x80\x04pickle"})
    source, target = shapes(tmp_path / "a", "square", 2, 0), shapes(tmp_path / "b", "disc", 2, 1)
    run = tmp_path / "run"
    args = ["train", "--source", str(source), "--target", str(target), "--latent", "someone/tiny-vae"]
    args += ["--size", str(SIZE), "--network", "tiny", "--charges", "2", "--batch-size", "2", "--steps", "1"]
    result = run_efm(*args, "--out", str(run), "-q", env=subprocess_env(hub_server, tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run / "autoencoder").iterdir()) == ["config.json", WEIGHTS]
    assert (run / "autoencoder" / WEIGHTS).read_bytes() == files[WEIGHTS]
    assert not [r for r in hub_server.file_requests() if r.path.endswith(".bin")]


def test_autoencoder_command_trains_resumes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source, target = shapes(tmp_path / "a", "square", 6, 0), shapes(tmp_path / "b", "disc", 6, 1)
    run = tmp_path / "ae-run"
    base = ["autoencoder", "--source", str(source), "--target", str(target), "--held-out", str(target)]
    assert main([*base, "--size", "16", "--batch-size", "4", "--steps", "2", "--out", str(run), "-q"]) == 0
    assert main(["autoencoder", "--resume", str(run), "--steps", "4", "--json", "-q"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and set(summary["held_out"]) == {"train", str(target)}
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    report = json.loads((run / "model" / "efm.json").read_text())
    assert report["step"] == 4 and 0 < report["reconstruction"][str(target)]["psnr"] < 60
    autoencoder = Autoencoder.from_folder(run / "model")
    assert autoencoder.latent_shape(16) == (8, 2, 2)
    # The run folder itself is what `--latent` takes; its 8 latent channels are what the field network sees.
    latent_run = tmp_path / "latent-run"
    args = ["train", "--source", str(source), "--target", str(target), "--latent", str(run), "--size", "64"]
    args += ["--network", "tiny", "--charges", "2", "--batch-size", "2", "--steps", "1", "--out", str(latent_run)]
    assert main([*args, "-q"]) == 0
    assert Capacitor.from_pretrained(latent_run / "model").network.config.channels == 8
    assert AutoencoderSettings(source="a", target="b").steps == 3000
    with pytest.raises(UsageError, match="batch size must be even"):
        AutoencoderSettings(source="a", target="b", batch=3)


def test_a_4x_autoencoder_trains_on_black_images_and_resume_needs_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Mostly black pictures (digits) drive an untrained decoder below −1 everywhere; clamping there would zero the
    # gradient and the loss would stay flat, so training reconstructs unclamped.
    autoencoder = Autoencoder(PRESETS["small-4x"])
    last = autoencoder.model.decoder.layers[-1]
    with torch.no_grad():
        last.bias.fill_(-5.0)
    black = -torch.ones(2, 3, 16, 16)
    reconstruction_loss(black, autoencoder(black), 1.0).backward()
    assert last.bias.grad is not None and last.bias.grad.abs().sum() > 0
    assert autoencoder.latent_shape(32) == (8, 8, 8)
    source, target = shapes(tmp_path / "a", "square", 4, 0), shapes(tmp_path / "b", "disc", 4, 1)
    run = tmp_path / "ae-run"
    args = ["autoencoder", "--source", str(source), "--target", str(target), "--architecture", "small-4x"]
    assert main([*args, "--size", "16", "--batch-size", "2", "--steps", "1", "--out", str(run), "-q"]) == 0
    assert Autoencoder.from_folder(run / "model").latent_shape(16) == (8, 4, 4)
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    assert main(["autoencoder", "--resume", str(run), "--steps", "2", "-q"]) == 1
    assert "holds no checkpoint: there is nothing to resume" in capsys.readouterr().err
    assert main([*args, "--architecture", "huge", "--out", str(tmp_path / "x"), "-q"]) == 2
