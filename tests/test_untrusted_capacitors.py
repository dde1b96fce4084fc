"""Capacitor folders crafted to hurt (issue 20): each ends in one clear error, within seconds, without allocating
what its config asks for and without hanging. Most cases are a copy of the embedded `weights/digits-2to3` with an
edited config.json; the latent ones put a tiny autoencoder beside a tiny network."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_AE, Run, climbing_capacitor, make_capacitor, one_error_line
from hub_server import HubServer
from huggingface_hub import constants
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_file

from efm_cli.autoencoder import Autoencoder, AutoencoderError
from efm_cli.capacitor import hub, registry
from efm_cli.capacitor.format import CapacitorError, new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.errors import EfmError
from efm_cli.network import preset

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_hub")

DIGITS = Path(__file__).resolve().parents[1] / "weights" / "digits-2to3"
FILES = ("config.json", "model.safetensors")
AE_WEIGHTS = "autoencoder/diffusion_pytorch_model.safetensors"


def crafted(folder: Path, edit: Callable[[dict[str, Any]], object] | None = None) -> Path:
    """A copy of digits-2to3 (config.json and model.safetensors only) with `edit` applied to its config."""
    folder.mkdir(parents=True)
    config = json.loads((DIGITS / "config.json").read_text())
    if edit is not None:
        edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copyfile(DIGITS / "model.safetensors", folder / "model.safetensors")
    return folder


def latent_folder(folder: Path) -> Path:
    """A tiny latent capacitor: a climbing field between the codes of a random `TINY_AE`."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        autoencoder = Autoencoder(TINY_AE)
    latent = {"kind": "AutoencoderTiny", "factor": 4, "channels": 4, "mean": [0.0] * 4, "std": [1.0] * 4}
    config = new_config(
        source="horse",
        target="zebra",
        network=preset("tiny", channels=4, size=8, L=6.0).to_dict(),
        field={"kind": "tube", "L": 6.0, "S": 1.0},
        size=32,
        latent=latent,
    )
    return climbing_capacitor(config, autoencoder=autoencoder).save_pretrained(folder)


def edit_json(path: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@contextmanager
def bounded(seconds: float = 5.0, megabytes: int = 200) -> Iterator[None]:
    """The block must end within `seconds` (it is interrupted at twice that, so that a hang fails instead of
    blocking the suite) and raise this process's peak resident memory by less than `megabytes`."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {2 * seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, 2 * seconds)
    start, peak = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.perf_counter() - start < seconds
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < megabytes * 1024  # ru_maxrss is in KiB


@pytest.fixture(scope="module", autouse=True)
def _diffusers_imported() -> None:
    """diffusers takes seconds to import on a busy machine: not what the time limits here measure."""
    import diffusers  # noqa: F401


# --- 1. configs that ask for more than their weights hold ----------------------------------------------------------


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (
            {"base": 768, "mult": [4, 4], "blocks": 1, "attention": []},
            r"does not match config\.json \([\d,]+ weights; the config describes 1,937,353,732\)",
        ),
        ({"base": 768}, r"model\.safetensors: '.*' has shape \[\d+(, \d+)*\] F16, expected \[\d+"),
    ],
    ids=["2e9-parameters-other-names", "same-names-larger-shapes"],
)
def test_a_config_asking_for_more_than_its_weights_hold_is_refused_before_allocation(
    tmp_path: Path, hub_server: HubServer, network: dict[str, Any], message: str
) -> None:
    """Issue 20 measured 26 s and 7.9 GB for the first: the network was built before its shapes met the weights."""
    folder = crafted(tmp_path / "bomb", lambda c: c["network"].update(network))
    with bounded(), pytest.raises(CapacitorError, match=message):
        Capacitor.from_pretrained(folder)
    with bounded(), pytest.raises(CapacitorError, match=message):
        hub.check_folder(folder, shapes=True)
    hub_server.add("eve/bomb", {name: (folder / name).read_bytes() for name in FILES})
    with bounded(), pytest.raises(hub.HubError, match="not a usable capacitor: .*" + message):
        hub.download("eve/bomb", endpoint=hub_server.url)
    assert hub.cached() == []  # the download left nothing in the cache


def test_an_autoencoder_config_asking_for_more_than_its_weights_hold_is_refused_before_allocation(
    tmp_path: Path,
) -> None:
    """A 151 M-parameter autoencoder config (600 MB) beside the weights of a 10 k-parameter one."""
    folder = latent_folder(tmp_path / "latent")
    wide = {"encoder_block_out_channels": [1024] * 3, "decoder_block_out_channels": [1024] * 3}
    edit_json(folder / "autoencoder" / "config.json", lambda c: c.update(wide))
    shape = r"diffusion_pytorch_model\.safetensors: '.*' has shape \[8(, \d+)*\] F32, expected \[1024"
    with bounded(), pytest.raises(CapacitorError, match=r"^autoencoder/: " + shape):
        Capacitor.from_pretrained(folder)
    with bounded(), pytest.raises(AutoencoderError, match=shape):
        Autoencoder.from_folder(folder / "autoencoder")
    with bounded(), pytest.raises(CapacitorError, match=shape):
        hub.check_folder(folder, shapes=True)


def test_an_autoencoder_config_diffusers_cannot_build_is_one_clear_error(tmp_path: Path) -> None:
    folder = latent_folder(tmp_path / "latent")
    kl = {"_class_name": "AutoencoderKL", "block_out_channels": [30], "norm_num_groups": 32, "latent_channels": 4}
    (folder / "autoencoder" / "config.json").write_text(json.dumps(kl))
    with pytest.raises(AutoencoderError, match=r"describes no AutoencoderKL \(num_channels \(30\) must be divisible"):
        Autoencoder.from_folder(folder / "autoencoder")


# --- 2. sampler settings that would run for hours -----------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler",
    [
        {"rtol": 1e-12, "atol": 1e-12, "max_nfe": 1_000_000},
        {"rtol": 1e-7},
        {"atol": 5e-7},
        {"max_nfe": 2001},
        {"solver": "euler", "steps": 100_000},
    ],
    ids=["issue", "rtol", "atol", "max_nfe", "steps"],
)
def test_a_config_cannot_ask_for_a_translation_that_runs_for_hours(tmp_path: Path, sampler: dict[str, Any]) -> None:
    folder = crafted(tmp_path / "slow", lambda c: c["sampler"].update(sampler))
    allowed = r"rtol in \[1e-06, 1\], atol in \[1e-06, 1\], steps in \[1, 1000\], max_nfe in \[1, 2000\]"
    with pytest.raises(CapacitorError, match=allowed) as caught:
        Capacitor.from_pretrained(folder)
    assert "--rtol" in caught.value.hint
    with pytest.raises(CapacitorError, match=allowed):
        hub.check_folder(folder)


def test_the_sampler_bounds_keep_real_settings_and_the_user_may_go_further(tmp_path: Path) -> None:
    edge = {"solver": "dopri5", "rtol": 1e-6, "atol": 1e-6, "max_nfe": 2000, "steps": 1000}
    loaded = Capacitor.from_pretrained(crafted(tmp_path / "edge", lambda c: c["sampler"].update(edge)))
    assert loaded.config["sampler"] == edge
    capacitor = make_capacitor()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.5
    assert capacitor.translate(x, rtol=1e-7, atol=1e-7).solution.landed.all()  # a caller's own choice is not bounded


# --- 3. attention over too many positions -------------------------------------------------------------------------


def scaled_up(folder: Path, network: dict[str, Any], size: int, attention: list[int] | None = None) -> Path:
    """A capacitor whose config is at image size `size` (attending at `attention`), with the random weights of the
    same network at 32×32 (attending at the same levels): a UNet's weights do not depend on the image size, so
    these match the config exactly, and only the positions its attention covers grow."""
    config = new_config(
        source="two",
        target="three",
        network={"kind": "unet", "dropout": 0.0, **network},
        field={"kind": "tube", "L": 20.0, "S": 5.0},
        size=32,
    )
    Capacitor(config).save_pretrained(folder)
    edit_json(folder / "config.json", lambda c: c["image"].update(size=size))
    if attention is not None:
        edit_json(folder / "config.json", lambda c: c["network"].update(attention=attention))
    return folder


@pytest.mark.parametrize(
    ("network", "size", "attention"),
    [
        ({"base": 16, "mult": [1, 2], "blocks": 1, "attention": []}, 256, None),
        ({"base": 16, "mult": [1, 2, 2, 2], "blocks": 1, "attention": [32]}, 128, [128]),
    ],
    ids=["middle-block-at-128", "listed-resolution-128"],
)
def test_attention_over_more_than_64x64_positions_is_refused(
    tmp_path: Path, network: dict[str, Any], size: int, attention: list[int] | None
) -> None:
    """Issue 20 measured 2.9 GB and 187 s per image for the first: 128×128 positions attending to each other."""
    folder = scaled_up(tmp_path / "attention", network, size, attention)
    message = r"attention would cover 128×128 = 16,384 positions, more than 4,096 \(64×64\); give 'mult' more"
    with bounded(), pytest.raises(CapacitorError, match=message):
        Capacitor.from_pretrained(folder)
    with bounded(), pytest.raises(CapacitorError, match=message):
        hub.check_folder(folder, shapes=True)


def test_attention_up_to_64x64_positions_still_loads(tmp_path: Path) -> None:
    folder = scaled_up(tmp_path / "edge", {"base": 16, "mult": [1, 2], "blocks": 1, "attention": []}, 128)
    assert Capacitor.from_pretrained(folder).network.config.attention_side == 64


# --- 4. special files as weights ----------------------------------------------------------------------------------


def special(path: Path, kind: str) -> None:
    """Replace the file at `path` with a FIFO, a link to /dev/zero, or a folder."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    else:
        path.mkdir()


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_special_files_as_weights_are_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    folder = crafted(tmp_path / "cap")
    special(folder / "model.safetensors", kind)
    for load in (Capacitor.from_pretrained, hub.check_folder):
        with bounded(), pytest.raises(CapacitorError, match=r"model\.safetensors is not a regular file"):
            load(folder)
    latent = latent_folder(tmp_path / "latent")
    special(latent / AE_WEIGHTS, kind)
    with bounded(), pytest.raises(CapacitorError, match=r"diffusion_pytorch_model\.safetensors is not a regular file"):
        Capacitor.from_pretrained(latent)
    with bounded(), pytest.raises(AutoencoderError, match="is not a regular file"):
        Autoencoder.from_folder(latent / "autoencoder")


# --- 6. domain names ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("source", "\x1b[31mred"),
        ("target", "two\nthree"),
        ("source", "carriage\rreturn"),
        ("target", "tab\tbed"),
        ("source", "x" * 65),
        ("target", "../../../tmp/outside"),
        ("source", "back\\slash"),
        ("target", ""),
        ("source", 3),
    ],
    ids=["escape", "newline", "carriage-return", "tab", "65-chars", "slash", "backslash", "empty", "number"],
)
def test_domain_names_must_be_short_printable_and_no_path(tmp_path: Path, key: str, name: Any) -> None:
    folder = crafted(tmp_path / "cap", lambda c: c["domains"].update({key: name}))
    with pytest.raises(CapacitorError, match=rf"domains\.{key} must be a printable name of 1 to 64 characters") as e:
        Capacitor.from_pretrained(folder)
    assert "\n" not in e.value.message and "\x1b" not in e.value.message and len(e.value.message) < 300


def test_ordinary_domain_names_stay_valid(tmp_path: Path) -> None:
    names = {"source": "summer photos", "target": "Zebra-ü_2 (" + "x" * 52 + ")"}
    assert len(names["target"]) == 64
    capacitor = Capacitor.from_pretrained(crafted(tmp_path / "cap", lambda c: c["domains"].update(names)))
    assert (capacitor.source, capacitor.target) == (names["source"], names["target"])


# --- 9. Hub references that name paths ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ref",
    [
        "user/name@../../../../{target}",
        "user/name@/{target}",
        "user/name@refs/../../..{target}",
        "user/name@main//x",
        "user/name@-x",
        "user/name@.hidden",
        "user/..",
        "user/a--b",
        "user/a..b",
        "user/.name",
        "user/name.",
        "-user/name",
        "user/name.git",
        "üser/name",
    ],
)
def test_hub_references_cannot_name_a_path_or_break_the_hub_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ref: str
) -> None:
    """Offline, the cache must never hand out a folder outside itself, and huggingface_hub's own validation errors
    must never surface: each of these is no Hub reference at all."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    ref = ref.format(target=crafted(tmp_path / "x"))
    assert hub.parse_hub_ref(ref) is None
    repo, _, revision = ref.partition("@")
    attempts = [lambda: Capacitor.from_pretrained(ref), lambda: registry.resolve(ref)]
    if revision:
        attempts.append(lambda: Capacitor.from_pretrained(repo, revision=revision))
    for attempt in attempts:
        with pytest.raises(EfmError) as caught:
            attempt()
        assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    "ref", ["alice/h2z", "a/b", "Org_1/model.v2-x", "u/n@v1.0", "u/n@refs/pr/1", "u/n@" + "a" * 40]
)
def test_every_accepted_hub_reference_is_one_huggingface_hub_accepts(ref: str) -> None:
    parsed = hub.parse_hub_ref(ref)
    assert parsed is not None
    validate_repo_id(parsed[0])


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_a_cache_entry_pointing_outside_the_cache_is_refused(
    tmp_path: Path, isolated_hub: Path, monkeypatch: pytest.MonkeyPatch, relative: bool
) -> None:
    """The cache finds a branch through the commit hash in refs/BRANCH: an edited one must not reach other folders."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    target = crafted(tmp_path / "elsewhere")
    repo = isolated_hub / "models--user--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    (repo / "refs" / "main").write_text(os.path.relpath(target, repo / "snapshots") if relative else str(target))
    with pytest.raises(hub.HubError, match="the cache entry of user/name points outside the cache"):
        Capacitor.from_pretrained("user/name")


# --- 11. deep JSON, NaN weights, booleans as numbers --------------------------------------------------------------


def test_deeply_nested_json_is_one_clear_error(tmp_path: Path) -> None:
    folder = crafted(tmp_path / "config")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CapacitorError, match="nested too deeply"):
        Capacitor.from_pretrained(folder)
    folder = crafted(tmp_path / "header")
    nested = ("[" * 100_000 + "]" * 100_000).encode()
    (folder / "model.safetensors").write_bytes(len(nested).to_bytes(8, "little") + nested)
    for load in (Capacitor.from_pretrained, hub.check_folder):
        with pytest.raises(CapacitorError, match=r"model\.safetensors is not a valid safetensors file"):
            load(folder)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weights_are_refused_once_at_load(tmp_path: Path, value: float) -> None:
    folder = crafted(tmp_path / "cap")
    weights = load_file(folder / "model.safetensors")
    weights["mid.1.qkv.weight"][0, 0] = value
    weights["conv_out.bias"][-1] = value
    save_file(weights, str(folder / "model.safetensors"))
    message = r"model\.safetensors holds NaN or infinite values: 2 of its \d+ tensors, first 'conv_out\.bias'"
    with pytest.raises(CapacitorError, match=message):
        Capacitor.from_pretrained(folder)
    latent = latent_folder(tmp_path / "latent")
    weights = load_file(latent / AE_WEIGHTS)
    next(iter(weights.values())).view(-1)[0] = value
    save_file(weights, str(latent / AE_WEIGHTS))
    with pytest.raises(AutoencoderError, match=r"diffusion_pytorch_model\.safetensors holds NaN or infinite"):
        Capacitor.from_pretrained(latent)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format_version=True), "format_version True"),
        (lambda c: c["image"].update(channels=True), "'image' needs 1 or 3 channels, got True"),
        (lambda c: c["sampler"].update(steps=True), "'sampler' may only set"),
        (lambda c: c["network"].update(blocks=True), "must be integers"),
        (lambda c: c["network"].update(mult=[True, 2, 2]), "must be integers"),
        (lambda c: c["network"].update(base=32.0), "must be integers"),
        (lambda c: c["preprocessing"].update(hflip=1), "'preprocessing' may set resize"),
        (lambda c: c.update(training=[1, 2]), "'training' must be an object"),
        (
            lambda c: c.update(
                latent={"kind": "AutoencoderTiny", "factor": True, "channels": 3, "mean": [0] * 3, "std": [1] * 3}
            ),
            "'latent' needs a factor",
        ),
    ],
    ids=[
        "format_version",
        "channels",
        "steps",
        "blocks",
        "mult",
        "float-base",
        "hflip-int",
        "training-list",
        "latent-factor",
    ],
)
def test_booleans_and_floats_are_no_counts(
    tmp_path: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    """JSON's `true` is an int to Python (True == 1): every whole-number field must say no to it."""
    folder = crafted(tmp_path / "cap", edit)
    with pytest.raises(CapacitorError, match=message):
        Capacitor.from_pretrained(folder)


# --- the command line: one error line, exit 1 ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["network"].update(base=768, mult=[4, 4], blocks=1, attention=[]), "does not match config.json"),
        (lambda c: c["domains"].update(target="\x1b[2J\x1b[31mthree"), "domains.target must be a printable name"),
    ],
    ids=["memory-bomb", "escape-sequence"],
)
def test_translate_with_a_crafted_capacitor_ends_in_one_error_line(
    tmp_path: Path, run_efm: Run, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    folder = crafted(tmp_path / "cap", edit)
    images = Path(__file__).resolve().parents[1] / "examples" / "horses"
    start = time.perf_counter()
    result = run_efm(
        "translate", str(images), "--model", str(folder), "--out", str(tmp_path / "out"), env={"OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 1
    assert message in one_error_line(result.stderr)
    assert "\x1b[2J" not in result.stderr and not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 60  # a subprocess start on a busy machine; the bomb alone took 26 s
