"""Benchmark the field network of an embedded capacitor in each precision on this machine, in one process.

- `slowdown_bf16`, `slowdown_fp16`: seconds of one network evaluation of a batch under that autocast precision over
  the same evaluation in fp32 (best of `--repeat` passes, the precisions alternating so that each sees the same
  machine). A CPU without bf16 or fp16 instructions emulates them: `efm translate --precision bf16` warns there.
- `native_bf16`, `native_fp16`: whether this CPU has those instructions (`efm_cli.devices.cpu_native`; null where
  /proc/cpuinfo cannot tell).

    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py [--model horse2zebra] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import emit

from efm_cli import devices
from efm_cli.translate import open_capacitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="horse2zebra", help="capacitor whose network is timed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    capacitor, _, _ = open_capacitor(model=args.model, to=None, device=torch.device("cpu"))
    network = capacitor.network.eval()
    size, channels = capacitor.config["image"]["size"], capacitor.config["image"]["channels"]
    x = torch.rand(args.batch_size, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = torch.full((args.batch_size,), 0.5 * float(capacitor.config["field"]["L"]))
    best = dict.fromkeys(devices.PRECISIONS, float("inf"))
    with torch.inference_mode():
        for rep in range(args.repeat + 1):
            for name in devices.PRECISIONS:
                with devices.autocast("cpu", name):
                    start = time.perf_counter()
                    network(z, x)
                    seconds = time.perf_counter() - start
                if rep:  # the first pass warms caches
                    best[name] = min(best[name], seconds)
    emit(
        {
            "model": args.model,
            "batch_size": args.batch_size,
            "size": size,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "seconds_fp32": round(best["fp32"], 4),
            "slowdown_bf16": round(best["bf16"] / best["fp32"], 2),
            "slowdown_fp16": round(best["fp16"] / best["fp32"], 2),
            "native_bf16": devices.cpu_native("bf16"),
            "native_fp16": devices.cpu_native("fp16"),
            "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/bench_precision.py --model "
            f"{args.model} --batch-size {args.batch_size} --repeat {args.repeat}",
        }
    )


if __name__ == "__main__":
    main()
