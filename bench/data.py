#!/usr/bin/env python
"""Throughput of the training input pipeline: decoded and augmented images per second, per worker count.

Reads a local dataset (imagefolder or parquet; by default a generated folder of 320×240 JPEGs,
ImageNet-like in size) through exactly what training uses: ``TransformedImageDataset`` with the
DeiT augmentation (RandomResizedCrop 224, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing),
the collator, and a DataLoader with the given workers, pinned memory and prefetching.

    python bench/data.py [--dataset DIR] [--workers 0 1 2] [--batch-size 64] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_spectralkd.data import DataArguments, load_image_datasets  # noqa: E402


def make_jpeg_folder(root: Path, count: int) -> str:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth random colour fields compress like photographs rather than like noise
        base = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
        Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return str(root)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="Local imagefolder/parquet dataset (default: generated JPEGs).")
    parser.add_argument("--images", type=int, default=640, help="Images to generate when no --dataset is given.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="Worker counts to measure.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per batch. Default: 64.")
    parser.add_argument("--batches", type=int, default=8, help="Measured batches per worker count. Default: 8.")
    parser.add_argument("--image-size", type=int, default=224, help="Training resolution. Default: 224.")
    options = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        dataset = options.dataset or make_jpeg_folder(Path(scratch), options.images)
        data = load_image_datasets(DataArguments(dataset=dataset, eval_split=None, validation_fraction=0.0), options.image_size)
        results = {}
        for workers in options.workers:
            loader = torch.utils.data.DataLoader(
                data.train, batch_size=options.batch_size, shuffle=True, num_workers=workers, collate_fn=data.collator,
                pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
            )
            iterator = iter(loader)
            next(iterator)  # start-up (worker spawn, first decode) is not throughput
            times = []
            for _ in range(options.batches):
                started = time.perf_counter()
                try:
                    next(iterator)
                except StopIteration:
                    iterator = iter(loader)
                    next(iterator)
                times.append(time.perf_counter() - started)
            results[workers] = options.batch_size / statistics.median(times)
            print(f"workers {workers}: {results[workers]:.1f} images/s")
    print(json.dumps({"batch_size": options.batch_size, "image_size": options.image_size, "cpu_threads": torch.get_num_threads(),
                      "images_per_s": {str(k): round(v, 1) for k, v in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
