"""OpenMP's idle threads, made to yield the cores when other programs need them.

torch's CPU kernels run on libgomp, whose workers keep spinning for a while after each parallel region, waiting for
the next. Alone on a machine that saves a wake-up; beside one other busy process on 2 cores the spinning workers
take turns with it and a translation ran 1.5× slower than on one thread. A short spin keeps most of the idle speed
and loses next to nothing when the cores are shared (README, "Threads"). libgomp reads its settings once, when
torch loads it, so this must run before `import torch`.
"""

import os
from collections.abc import MutableMapping

SPIN_COUNT = "1000"
"""Busy-wait iterations before an idle OpenMP worker sleeps (libgomp's default is 300 000)."""

USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
"""Variables by which a user already chose how OpenMP waits; efm then leaves the choice alone."""


def share_cores(environ: MutableMapping[str, str] = os.environ) -> None:
    """Give OpenMP a short spin before it sleeps, unless the user set its wait policy or spin count."""
    if not any(environ.get(name) for name in USER_SETTINGS):
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def openmp_waiting(environ: MutableMapping[str, str] = os.environ) -> dict[str, str | None]:
    """How OpenMP was told to wait, for `efm env`."""
    return {name: environ.get(name) for name in USER_SETTINGS}
