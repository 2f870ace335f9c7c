#!/usr/bin/env python
"""Cost of the feature loss on pairs across token grids against pairs on one grid, measured in one run.

The paper's 8 pairs at DeiT-Tiny ← CaiT-S24 sizes (student B×192×14×14, teacher B×384×H×W), forward +
backward of :func:`hf_spectralkd.losses.spectral_alignment_loss` on fixed maps (the student's need
gradients). Cases: the teacher on the student's 14×14 grid (equal, the reference), on 16×16 and on
28×28 (a teacher at twice the resolution) with ``grid_alignment="spectral"``, and 16×16 with
``"interpolate"``. Every iteration runs each case once in a shuffled order (a shared machine drifts),
and the ratios to the equal-grid case are taken within each iteration; the medians are printed, then
one JSON line.

    python bench/grids.py --batch-size 8 --iterations 20
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_spectralkd.losses import spectral_alignment_loss  # noqa: E402

PAIRS = 8
CASES = {  # name: (teacher grid, grid_alignment)
    "equal 14×14": (14, "spectral"),
    "spectral 16×16→14×14": (16, "spectral"),
    "spectral 28×28→14×14": (28, "spectral"),
    "interpolate 16×16→14×14": (16, "interpolate"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    options = parser.parse_args()
    torch.manual_seed(0)
    batch = options.batch_size
    # Token-derived maps arrive as NCHW views of channels-last memory; so do these.
    student = [torch.randn(batch, 14, 14, 192).permute(0, 3, 1, 2).requires_grad_() for _ in range(PAIRS)]
    teachers = {size: [torch.randn(batch, size, size, 384).permute(0, 3, 1, 2) for _ in range(PAIRS)]
                for size in {size for size, _ in CASES.values()}}

    def run(name: str) -> float:
        size, alignment = CASES[name]
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        loss = spectral_alignment_loss(student, teachers[size], grid_alignment=alignment)
        torch.autograd.grad(loss, student)
        elapsed = time.perf_counter() - start
        gc.enable()
        return elapsed

    times: dict[str, list[float]] = {name: [] for name in CASES}
    ratios: dict[str, list[float]] = {name: [] for name in CASES}
    order = list(CASES)
    for iteration in range(options.warmup + options.iterations):
        random.shuffle(order)
        measured = {name: run(name) for name in order}
        if iteration >= options.warmup:
            for name, seconds in measured.items():
                times[name].append(seconds)
                ratios[name].append(seconds / measured["equal 14×14"])
    print(f"feature loss forward + backward, {PAIRS} pairs, batch {batch}, {torch.get_num_threads()} threads, "
          f"median of {options.iterations} iterations")
    print(f"{'case':<26}{'ms':>9}{'ratio to equal grids':>23}")
    for name in CASES:
        print(f"{name:<26}{1000 * statistics.median(times[name]):>9.1f}{statistics.median(ratios[name]):>23.2f}")
    print(json.dumps({"batch_size": batch, "iterations": options.iterations,
                      "median_ms": {n: round(1000 * statistics.median(t), 2) for n, t in times.items()},
                      "median_ratio": {n: round(statistics.median(r), 3) for n, r in ratios.items()}}))


if __name__ == "__main__":
    main()
