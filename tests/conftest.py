"""Shared test helpers: run efm the way a user does, in a subprocess with a predictable environment."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping

import pytest
import torch

from efm_cli.capacitor import Capacitor

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


def climbing_capacitor(config: dict, *, seed: int = 0, everything: bool = False) -> Capacitor:
    """A random capacitor whose field climbs everywhere (f_z ≈ 30), so that every line lands in a few steps.

    The network is built under `seed` (a test must not depend on the global RNG that earlier tests advanced), and its
    zero-initialised weights (with `everything`, all weights) are drawn from N(0, 0.05²), so the field moves images a
    little and different seeds give different weights.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        capacitor = Capacitor(config)
    generator = torch.Generator().manual_seed(seed)
    network = capacitor.network
    with torch.no_grad():
        for parameter in network.parameters():
            if everything or not parameter.abs().sum():
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        network.conv_out.bias[-1] = 30.0 / network.z_scale
        network.conv_out.weight[-1] /= network.z_scale
    return capacitor
