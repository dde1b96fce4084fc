"""Helpers shared by the benchmark scripts: best-of-N timing and one JSON object per run."""

import json
import sys
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Seconds of the fastest of `repeat` calls after `warmup` untimed ones.

    The minimum, not the mean: on a shared machine slower runs measure the neighbours, not the code.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def emit(result: dict) -> None:
    """Print `result` as one JSON object on stdout, for scripts, and as a two-column table on stderr, for people."""
    print(json.dumps(result), flush=True)
    width = max(map(len, result), default=0)
    for key, value in result.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key:<{width}}  {shown}", file=sys.stderr)
