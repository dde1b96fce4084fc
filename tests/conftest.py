"""Shared test helpers: run efm the way a user does, in a subprocess with a predictable environment."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping

import pytest
import torch

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
