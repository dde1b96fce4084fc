"""Benchmark a distilled capacitor against its teacher on the same images, in one process.

- `speedup`: the student's images/s over the teacher's, each translating the same batches with its own stored
  sampler (best of `--repeat` alternating passes, so both see the same machine). Tensor in, tensor out: decoding and
  writing files cost the same for both and are left out.
- `nfe_teacher`, `nfe_student`: network evaluations per image.
- `endpoint_rms`: RMS difference between the student's and the teacher's translations, in 8-bit levels (mean and
  95th percentile over the images); `efm distill` reports the same on its held-out pairs.

Make the student first (`efm distill MODEL --source A --target B --out RUN`), then:

    OMP_NUM_THREADS=2 python benchmarks/bench_distill.py --teacher horse2zebra --student RUN/model --images DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _common import emit

from efm_cli import images as imgs
from efm_cli.capacitor import Capacitor
from efm_cli.translate import open_capacitor


def batches(folder: Path, size: int, count: int, batch_size: int) -> list[torch.Tensor]:
    """The first `count` images of `folder` (sorted) at the capacitor's size, in batches."""
    paths = imgs.find_images(folder)[:count]
    if not paths:
        raise SystemExit(f"no images in {folder}")
    stacked = torch.stack([imgs.to_tensor(imgs.load(path).rgb, size) for path in paths])
    return list(stacked.split(batch_size))


def run(capacitor: Capacitor, inputs: list[torch.Tensor]) -> tuple[float, torch.Tensor, float]:
    """Seconds to translate every batch, the translations and the mean NFE."""
    start = time.perf_counter()
    results = [capacitor.translate(batch) for batch in inputs]
    seconds = time.perf_counter() - start
    nfe = torch.cat([result.solution.nfe.float() for result in results]).mean().item()
    return seconds, torch.cat([result.images for result in results]), nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="the teacher's reference (name, folder or Hub repo)")
    parser.add_argument("--student", required=True, help="the distilled capacitor (RUN/model)")
    parser.add_argument("--images", type=Path, required=True, help="source-plate images to translate")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    teacher, _, _ = open_capacitor(model=args.teacher, to=None)
    student, _, _ = open_capacitor(model=args.student, to=None)
    size = teacher.config["image"]["size"]
    if student.config["image"]["size"] != size:
        raise SystemExit("the student and the teacher work at different sizes; is this the right teacher?")
    inputs = batches(args.images, size, args.count, args.batch_size)
    images = sum(len(batch) for batch in inputs)
    best = {"teacher": float("inf"), "student": float("inf")}
    outputs: dict[str, torch.Tensor] = {}
    nfe: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(args.repeat):
            for name, capacitor in (("teacher", teacher), ("student", student)):
                seconds, outputs[name], nfe[name] = run(capacitor, inputs)
                best[name] = min(best[name], seconds)
    levels = (outputs["student"] - outputs["teacher"]) * 127.5
    rms = levels.pow(2).flatten(1).mean(1).sqrt()
    emit(
        {
            "teacher": args.teacher,
            "teacher_sampler": teacher.config.get("sampler", {}),
            "student_sampler": student.config.get("sampler", {}),
            "images": images,
            "size": size,
            "threads": torch.get_num_threads(),
            "teacher_images_per_second": images / best["teacher"],
            "student_images_per_second": images / best["student"],
            "speedup": best["teacher"] / best["student"],
            "nfe_teacher": nfe["teacher"],
            "nfe_student": nfe["student"],
            "endpoint_rms_mean": rms.mean().item(),
            "endpoint_rms_p95": rms.quantile(0.95).item(),
        }
    )


if __name__ == "__main__":
    main()
