"""Shared test helpers: run efm the way a user does (in a subprocess with a predictable environment), tiny random
capacitors, an isolated Hugging Face cache, and generated image folders."""

import functools
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_server import HubServer
from PIL import Image, ImageDraw

from efm_cli.capacitor.format import new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.network import preset

# Variables that change what efm prints; tests opt into them explicitly.
_OUTPUT_VARIABLES = (
    "NO_COLOR",
    "FORCE_COLOR",
    "PY_COLORS",
    "EFM_DEBUG",
    "HF_TOKEN",
    "COLUMNS",
    "GITHUB_ACTIONS",
)

Run = Callable[..., subprocess.CompletedProcess[str]]
TINY = 16
"""Image size of the tiny capacitors below."""
TINY_AE = {
    "_class_name": "AutoencoderTiny",
    "encoder_block_out_channels": [8, 8, 8],
    "decoder_block_out_channels": [8, 8, 8],
    "num_encoder_blocks": [0, 1, 1],
    "num_decoder_blocks": [1, 1, 0],
    "latent_channels": 4,
}
"""The config of a random autoencoder that makes images 4× smaller with 4 latent channels (32×32 → 4×8×8 codes)."""


def _run(command: list[str], env: Mapping[str, str] | None, timeout: float) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if key not in _OUTPUT_VARIABLES}
    clean.update(env or {})
    return subprocess.run(command, capture_output=True, text=True, env=clean, timeout=timeout)


@pytest.fixture
def run_efm() -> Run:
    """Run `python -m efm_cli ARGS...`, the real entry point; return the finished process (text output)."""

    def run(*args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-m", "efm_cli", *args], env, timeout)

    return run


@pytest.fixture
def run_python() -> Run:
    """Run `python -c CODE ARGS...` in the same clean environment, for tests that patch efm before it runs."""

    def run(
        code: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return _run([sys.executable, "-c", code, *args], env, timeout)

    return run


@pytest.fixture
def hub_server():
    """A Hub-compatible server on 127.0.0.1 (tests/hub_server.py), stopped after the test."""
    from hub_server import HubServer

    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread in this process: tiny networks on shared cores run far faster without OpenMP
    threads waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def climbing_capacitor(config: dict, *, seed: int = 0, everything: bool = False, autoencoder=None) -> Capacitor:
    """A random capacitor whose field climbs everywhere (f_z ≈ 30), so that every line lands in a few steps.

    The network is built under `seed` (a test must not depend on the global RNG that earlier tests advanced), and its
    zero-initialised weights (with `everything`, all weights) are drawn from N(0, 0.05²), so the field moves images a
    little and different seeds give different weights.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        capacitor = Capacitor(config, autoencoder=autoencoder)
    generator = torch.Generator().manual_seed(seed)
    network = capacitor.network
    with torch.no_grad():
        for parameter in network.parameters():
            if everything or not parameter.abs().sum():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        network.conv_out.bias[-1] = 30.0 / network.z_scale
        network.conv_out.weight[-1] /= network.z_scale
    return capacitor


CAPACITOR_FILES = {"config.json", "model.safetensors"}


GOOD = {
    "photo.jpg": (24, 18),
    "a/alpha.png": (20, 26),
    "a/grey.png": (17, 17),
    "a/b/deep16.png": (30, 12),
    "a/b/web.webp": (22, 22),
    "rotated.jpg": (20, 30),  # stored 30×20 with EXIF orientation 6: upright it is 20 wide, 30 high
}


BAD = {"a/empty.jpg": "empty file", "a/b/cut.jpg": "truncated or corrupt", "notes.png": "not an image"}


def make_capacitor(source: str = "horse", target: str = "zebra", channels: int = 3) -> Capacitor:
    """A tiny random capacitor whose field climbs everywhere (f_z > 0) and moves images a little."""
    config = new_config(
        source=source,
        target=target,
        network=preset("tiny", channels=channels, size=TINY, L=6.0).to_dict(),
        field={"kind": "tube", "L": 6.0, "S": 1.0},
        size=TINY,
        channels=channels,
        sampler={"solver": "dopri5", "rtol": 1e-2, "atol": 1e-2},
    )
    return climbing_capacitor(config)


@functools.cache
def capacitor_files(seed: int = 0, source: str = "horse", target: str = "zebra") -> dict[str, bytes]:
    """config.json and model.safetensors of a tiny random capacitor; different seeds give different weights."""
    config = new_config(
        source=source,
        target=target,
        network=preset("tiny", size=TINY, L=6.0).to_dict(),
        field={"kind": "tube", "L": 6.0, "S": 1.0},
        size=TINY,
        training={"steps": 10 + seed, "datasets": ["local/horses"], "metrics": {"fid": 12.5}},
    )
    capacitor = climbing_capacitor(config, seed=seed, everything=True)
    with tempfile.TemporaryDirectory() as folder:
        capacitor.save_pretrained(folder)
        return {name: (Path(folder) / name).read_bytes() for name in sorted(CAPACITOR_FILES)}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved `make_capacitor()` folder, shared by a module's tests (none of which may change it)."""
    return make_capacitor().save_pretrained(tmp_path_factory.mktemp("weights") / "h2z")


@pytest.fixture
def isolated_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache under tmp_path, no token from the environment or a stored login, no Xet."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


def subprocess_env(server: HubServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    home = tmp_path / "hf"
    return {
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "EFM_WEIGHTS_DIR": str(tmp_path / "no-embedded"),  # the capacitors shipped in weights/ stay out of it
        **extra,
    }


def noise_pixels(width: int, height: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (height, width, channels) if channels > 1 else (height, width)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def make_tree(root: Path) -> Path:
    """Nested folders of every kind of input the issue lists, good and bad."""
    for name in [*GOOD, *BAD]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(noise_pixels(24, 18, 3, 1)).save(root / "photo.jpg", quality=90)
    Image.fromarray(noise_pixels(20, 26, 4, 2), "RGBA").save(root / "a/alpha.png")
    Image.fromarray(noise_pixels(17, 17, 1, 3), "L").save(root / "a/grey.png")
    deep = (noise_pixels(30, 12, 1, 4).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(root / "a/b/deep16.png")
    Image.fromarray(noise_pixels(22, 22, 3, 5)).save(root / "a/b/web.webp")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(noise_pixels(30, 20, 3, 6)).save(root / "rotated.jpg", exif=exif)
    (root / "a/empty.jpg").write_bytes(b"")
    whole = io.BytesIO()
    Image.fromarray(noise_pixels(40, 40, 3, 7)).save(whole, format="JPEG")
    (root / "a/b/cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "notes.png").write_text("not an image at all\n")
    return root


def digests(root: Path) -> dict[str, str]:
    """Content hash of every file under root, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def stamps(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime in ns) of every file under root: a rewrite changes one or the other."""
    return {
        path.relative_to(root).as_posix(): (path.stat().st_ino, path.stat().st_mtime_ns) for path in root.rglob("*")
    }


def tree(root: Path) -> dict[str, bytes]:
    """Every file under root, hidden ones included, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def shapes(folder: Path, kind: str, count: int, seed: int) -> Path:
    """Pictures of red squares or blue discs at random places, of assorted sizes (the loader resizes them)."""
    gen = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        side = int(torch.randint(20, 40, (1,), generator=gen))
        x, y = (int(v) for v in torch.randint(0, side - 10, (2,), generator=gen))
        image = Image.new("RGB", (side, side), "black")
        draw = ImageDraw.Draw(image)
        if kind == "square":
            draw.rectangle([x, y, x + 9, y + 9], fill=(220, 40, 30))
        else:
            draw.ellipse([x, y, x + 9, y + 9], fill=(30, 40, 220))
        image.save(folder / f"{kind}-{i:03d}.png")
    return folder


def bars(folder: Path, vertical: bool, count: int, seed: int, size: int = 20) -> None:
    """Random-coloured bars on black: domain 'a' vertical, 'b' horizontal (content, not colour, tells them apart)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.zeros((size, size, 3), np.uint8)
        colour = rng.integers(60, 256, 3, dtype=np.uint8)
        start = int(rng.integers(2, 6))
        if vertical:
            image[start : start + 12, 8:12] = colour
        else:
            image[8:12, start : start + 12] = colour
        Image.fromarray(image).save(folder / f"{i:03d}.png")


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:] and " — " in lines[-1], stderr
    assert "Traceback" not in stderr
    return lines[-1]
