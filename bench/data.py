#!/usr/bin/env python
"""The training input pipeline: throughput, how well a stream mixes, and what a resume costs.

Three measurements, each printing its figures and one JSON line:

``python bench/data.py`` (default): decoded and augmented images per second through exactly what
training uses (``TransformedImageDataset`` with the DeiT augmentation at 224, the collator, a
DataLoader with persistent workers and prefetching) on generated ImageNet-like JPEGs (500×375,
quality 90), for 0, 1 and 2 workers, also per core in use. ``--streaming``: the same JPEGs as 10
parquet shards through the streamed path (the first batch, which waits for the first shuffle
window, is not counted). ``--backend torchvision``: the ``--data_backend torchvision`` path, workers
preparing (bytes, header, drawn augmentation) and the main process decoding and augmenting on
``--device`` (``cuda`` on a GPU machine: batched nvJPEG); with 0 workers the two halves are also
timed apart, which gives the workers' share per core. ``--stages`` times the training process's
stages (decode, crop + resize, flip + RandAugment + normalise + erase) on 0 workers' batches.

``python bench/data.py --mixing``: a class-sorted parquet set (20 shards, one class per shard, as
an archive packed per class would be) streamed by 2 processes × 2 DataLoader workers, batches of
32. Reports the mean number of distinct classes per batch against what uniform sampling without
replacement gives, and whether one pass of every process reads every record exactly once.

``python bench/data.py --resume``: the same 20-shard set trained through the Trainer (a tiny ViT);
a checkpoint placed in pass 1 and one in pass 50; the time from ``train()`` to the first trained
batch of each resume (2 workers) and the raw records one worker reads before it (shuffle window:
one shard's worth of records).

    python bench/data.py [--dataset DIR] [--workers 0 1 2] [--batch-size 64] [--batches 10] [--streaming]
                         [--backend pil|torchvision] [--device cpu|cuda] [--stages]
    python bench/data.py --mixing [--buffer 10000] [--row-group 4]
    python bench/data.py --resume [--resume-passes 1 50] [--resume-workers 2] [--resume-buffer 64]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: it reads these once
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from hf_spectralkd.data import DataArguments, load_image_datasets, pixel_batch  # noqa: E402

# ------------------------------------------------------------------------------------------------
# Data sets
# ------------------------------------------------------------------------------------------------


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour fields plus fine detail: compresses like a photograph rather than like noise or a flat image."""
    coarse = Image.fromarray(rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 255, size=(height // 4, width // 4, 3), dtype=np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return Image.blend(coarse, fine, 0.3)


def make_jpeg_folder(root: Path, count: int, size=(500, 375), quality: int = 90) -> str:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_like(rng, *size).save(folder / f"{i}.jpg", quality=quality)
    return str(root)


def make_class_sorted_parquet(root: Path, shards: int = 20, rows_per_shard: int = 64, row_group: int = 16,
                              image_size: int = 32) -> str:
    """``shards`` parquet files under ``root/train``, shard ``s`` holding only class ``s``.

    The label column ``record`` numbers the records (0..N-1, a ClassLabel): the class of record ``i``
    is ``i // rows_per_shard``, so both identity and class can be read from the labels.
    """
    import datasets

    total = shards * rows_per_shard
    features = datasets.Features({"image": datasets.Image(), "record": datasets.ClassLabel(num_classes=total)})
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        images = []
        for _ in range(rows_per_shard):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
            images.append({"bytes": buffer.getvalue(), "path": None})
        records = list(range(shard * rows_per_shard, (shard + 1) * rows_per_shard))
        table = datasets.Dataset.from_dict({"image": images, "record": records}, features=features).data.table
        import pyarrow.parquet as pq

        pq.write_table(table, root / "train" / f"train-{shard:05d}-of-{shards:05d}.parquet", row_group_size=row_group)
    return str(root)


def stream_arguments(dataset: str, buffer: int) -> DataArguments:
    return DataArguments(dataset=dataset, streaming=True, eval_split=None, image_column="image", label_column="record",
                         shuffle_buffer_size=buffer, auto_augment="none", reprob=0.0)


# ------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------


def jpeg_folder_to_parquet(folder: str, root: Path, shards: int = 10) -> str:
    """The JPEGs of ``folder/train`` as ``shards`` parquet files (bytes embedded, 100-row groups, as ``datasets`` writes)."""
    import datasets

    files = sorted(Path(folder, "train").rglob("*.jpg"))
    names = sorted({f.parent.name for f in files})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                                        "label": [names.index(f.parent.name) for f in files]}, features=features)
    (root / "train").mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        table.shard(shards, shard, contiguous=True).to_parquet(str(root / "train" / f"train-{shard:05d}.parquet"))
    return str(root)


def endless(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cores(backend: str, workers: int) -> int:
    """Cores a measurement keeps busy: the workers, plus the main process when it decodes and augments (torchvision)."""
    return max(1, workers) if backend == "pil" else workers + 1


def stages(batch, device: torch.device) -> dict[str, float]:
    """Seconds of each stage of building one encoded batch on ``device`` (synchronised after each)."""
    images, pipeline = batch["encoded_images"], batch["encoded_images"].pipeline
    started = time.perf_counter()
    decoded = images.decode(device)
    _synchronize(device)
    decoded_at = time.perf_counter()
    kept = [(image, params) for image, params in zip(decoded, images.params) if image is not None]
    resized = torch.stack([pipeline.resize_crop(image, params) for image, params in kept])
    _synchronize(device)
    resized_at = time.perf_counter()
    if pipeline.train:
        pipeline.augment(resized, [params for _, params in kept])
    else:
        pipeline.normalize(resized)
    _synchronize(device)
    return {"decode": decoded_at - started, "crop_resize": resized_at - decoded_at,
            "augment": time.perf_counter() - resized_at}


def throughput(options) -> dict:
    # One intra-op thread, as in DataLoader workers: the figures are per core, and with 2 threads on a
    # shared 2-core machine the main process's transforms slowed 10x whenever another process ran
    # (18 instead of 250 images/s, measured).
    torch.set_num_threads(1)
    device = torch.device(options.device)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = options.dataset or make_jpeg_folder(Path(scratch), options.images)
        if options.streaming:
            dataset = jpeg_folder_to_parquet(dataset, Path(scratch) / "parquet")
        data = load_image_datasets(DataArguments(dataset=dataset, eval_split=None, validation_fraction=0.0,
                                                 streaming=options.streaming, data_backend=options.backend),
                                   options.image_size)
        results, split = {}, {}
        for workers in options.workers:
            loader = torch.utils.data.DataLoader(
                data.train, batch_size=options.batch_size, shuffle=not options.streaming, num_workers=workers,
                collate_fn=data.collator, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
            )
            iterator = endless(loader)
            # start-up (worker spawn, first decode, CUDA/nvJPEG initialisation) is not throughput
            pixel_batch(next(iterator), device)
            _synchronize(device)
            times, loading, building = [], [], []
            for _ in range(options.batches):
                started = time.perf_counter()
                batch = next(iterator)
                loaded = time.perf_counter()
                # the training process's share: decoding and augmenting on the device (torchvision backend)
                pixel_values = pixel_batch(batch, device)["pixel_values"].to(device)
                _synchronize(device)
                done = time.perf_counter()
                times.append(done - started)
                loading.append(loaded - started)
                building.append(done - loaded)
                del pixel_values
            results[workers] = options.batch_size / statistics.median(times)
            cores = _cores(options.backend, workers)
            line = f"workers {workers}: {results[workers]:.1f} images/s, {results[workers] / cores:.1f} per core ({cores})"
            if workers == 0 and options.backend == "torchvision" and options.stages:
                timed = [stages(next(iterator), device) for _ in range(options.batches)]
                split["stage_ms_per_image"] = {name: round(1000 * statistics.median(t[name] for t in timed) / options.batch_size, 3)
                                               for name in timed[0]}
                print(f"stages, ms per image on {device.type}: {split['stage_ms_per_image']}")
            if workers == 0 and options.backend == "torchvision":
                split |= {"prepare_images_per_s": round(options.batch_size / statistics.median(loading), 1),
                         "build_images_per_s": round(options.batch_size / statistics.median(building), 1)}
                line += (f"; prepare (read, header, draws, collate) {split['prepare_images_per_s']:.1f} images/s, "
                         f"decode + augment on {device.type} {split['build_images_per_s']:.1f} images/s")
            print(line)
    return {"measure": "throughput", "backend": options.backend, "device": device.type, "streaming": options.streaming,
            "batch_size": options.batch_size, "image_size": options.image_size, "cpu_threads": torch.get_num_threads(),
            "images_per_s": {str(k): round(v, 1) for k, v in results.items()},
            "images_per_s_per_core": {str(k): round(v / _cores(options.backend, k), 1) for k, v in results.items()}, **split}


# ------------------------------------------------------------------------------------------------
# Mixing
# ------------------------------------------------------------------------------------------------


def uniform_distinct(classes: int, per_class: int, batch: int) -> float:
    """Expected distinct classes in ``batch`` records drawn without replacement from equal classes."""
    total = classes * per_class
    missing = math.comb(total - per_class, batch) / math.comb(total, batch)
    return classes * (1.0 - missing)


def mixing(options) -> dict:
    world, workers, batch = 2, 2, options.mixing_batch
    shards, rows = 20, 64
    with tempfile.TemporaryDirectory() as scratch:
        root = make_class_sorted_parquet(Path(scratch), shards=shards, rows_per_shard=rows, row_group=options.row_group)
        total = shards * rows
        batches_per_process = total // (world * batch)  # one pass of the data over all processes
        distinct, records = [], []
        for rank in range(world):
            data = load_image_datasets(stream_arguments(root, options.buffer), 32)
            stream = data.train.shard(num_shards=world, index=rank)
            loader = torch.utils.data.DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=data.collator)
            iterator = iter(loader)
            for _ in range(batches_per_process):
                labels = next(iterator)["labels"].tolist()
                records += labels
                distinct.append(len({label // rows for label in labels}))
            del iterator, loader
    expected = uniform_distinct(shards, rows, batch)
    counts = np.bincount(records, minlength=total)
    exactly_once = bool((counts == 1).all())
    mean = statistics.mean(distinct)
    print(f"class-sorted set: {shards} shards × {rows} records in row groups of {options.row_group}, one class per shard; "
          f"{world} processes × {workers} workers, batch {batch}, shuffle buffer {options.buffer}")
    print(f"distinct classes per batch: {mean:.2f} (uniform sampling: {expected:.2f}) → ratio {mean / expected:.3f}")
    print(f"one pass: {int((counts == 1).sum())} records read once, {int((counts == 0).sum())} never, "
          f"{int((counts > 1).sum())} more than once → exactly once: {exactly_once}")
    return {"measure": "mixing", "batch_size": batch, "buffer": options.buffer, "row_group": options.row_group, "distinct_per_batch": round(mean, 3),
            "uniform_expectation": round(expected, 3), "ratio": round(mean / expected, 3), "exactly_once": exactly_once,
            "never_read": int((counts == 0).sum()), "read_twice_or_more": int((counts > 1).sum())}


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------


class _FirstStep:
    """A callback noting when the first trained batch reaches the model, then ending the run."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if outer.at is None:
                    outer.at = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                control.should_training_stop = True
                control.should_save = False

        self.at = None
        self.callback = Callback()


def _resume_trainer(root: str, output_dir: Path, max_steps: int, workers: int, batch: int, buffer: int, callbacks=()):
    from transformers import ViTConfig, ViTForImageClassification

    from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer

    data = load_image_datasets(stream_arguments(root, buffer), 32)
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=len(data.id2label)))
    args = SpectralDistillationConfig(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch, distillation_type="none",
        beta=0.0, use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="steps", save_steps=1,
        dataloader_num_workers=workers, logging_steps=1000, eval_strategy="no",
    )
    return SpectralDistillationTrainer(model=model, args=args, train_dataset=data.train, data_collator=data.collator,
                                       callbacks=list(callbacks)), data


def _records_read_before_first_batch(root: str, skip_batches: int, batch: int, workers: int, buffer: int):
    """Raw records one worker's reader reads before its first trained sample, when the stream counts them."""
    data = load_image_datasets(stream_arguments(root, buffer), 32)
    stream = data.train
    if not hasattr(stream, "reader_samples"):
        return None
    from hf_spectralkd.data.streaming import worker_start

    logical, batches_done = worker_start(skip_batches, 0, max(1, workers))
    next(stream.reader_samples(logical, max(1, workers), batches_done * batch))
    return int(stream.records_read)


def resume(options) -> dict:
    shards, rows, batch = 20, 64, 32
    steps_per_pass = shards * rows // batch
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = make_class_sorted_parquet(Path(scratch) / "data", shards=shards, rows_per_shard=rows, row_group=options.row_group)
        seed_run = Path(scratch) / "seed_run"
        trainer, _ = _resume_trainer(root, seed_run, 1, 0, batch, options.resume_buffer)
        trainer.train()
        template = seed_run / "checkpoint-1"
        for pass_number in options.resume_passes:
            step = (pass_number - 1) * steps_per_pass + steps_per_pass // 2  # the middle of that pass
            output_dir = Path(scratch) / f"resume_{pass_number}"
            checkpoint = output_dir / f"checkpoint-{step}"
            shutil.copytree(template, checkpoint)
            state = json.loads((checkpoint / "trainer_state.json").read_text())
            state["global_step"], state["max_steps"] = step, step + 1
            (checkpoint / "trainer_state.json").write_text(json.dumps(state))
            first = _FirstStep()
            trainer, _ = _resume_trainer(root, output_dir, step + 1, options.resume_workers, batch, options.resume_buffer,
                                         [first.callback])
            started = time.perf_counter()
            trainer.train(resume_from_checkpoint=str(checkpoint))
            seconds = first.at - started
            read = _records_read_before_first_batch(root, step, batch, options.resume_workers, options.resume_buffer)
            note = "" if read is not None else " (counted: this stream re-reads every earlier record)"
            read = read if read is not None else step * batch
            results[pass_number] = {"step": step, "seconds_to_first_batch": round(seconds, 3), "records_read": read}
            print(f"resume in pass {pass_number} (step {step}): {seconds:.2f} s from train() to the first trained batch, "
                  f"{read} raw records read before it{note}")
    passes = sorted(results)
    ratio = results[passes[-1]]["seconds_to_first_batch"] / results[passes[0]]["seconds_to_first_batch"]
    print(f"ratio pass {passes[-1]} / pass {passes[0]}: {ratio:.2f} (shard: {rows} records; shuffle window: "
          f"{options.resume_buffer} records)")
    return {"measure": "resume", "shards": shards, "rows_per_shard": rows, "batch_size": batch, "buffer": options.resume_buffer,
            "workers": options.resume_workers, "passes": {str(k): v for k, v in results.items()}, "ratio": round(ratio, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="Local imagefolder/parquet dataset (default: generated JPEGs).")
    parser.add_argument("--images", type=int, default=640, help="Images to generate when no --dataset is given.")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="Worker counts to measure.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images per batch. Default: 64.")
    parser.add_argument("--batches", type=int, default=8, help="Measured batches per worker count. Default: 8.")
    parser.add_argument("--image-size", type=int, default=224, help="Training resolution. Default: 224.")
    parser.add_argument("--backend", choices=["pil", "torchvision"], default="pil",
                        help="Data backend (--data_backend) of the throughput measurement. Default: pil.")
    parser.add_argument("--device", default="cpu",
                        help="Where the torchvision backend decodes and augments (cpu, cuda). Default: cpu.")
    parser.add_argument("--stages", action="store_true",
                        help="With --backend torchvision: also time decoding, crop + resize and augmentation apart.")
    parser.add_argument("--streaming", action="store_true",
                        help="Measure the streamed path: the JPEGs as 10 parquet shards read by the resumable stream.")
    parser.add_argument("--mixing", action="store_true", help="Measure how a stream mixes a class-sorted set.")
    parser.add_argument("--mixing-batch", type=int, default=32, help="Batch size of the mixing measurement. Default: 32.")
    parser.add_argument("--buffer", type=int, default=10_000, help="Shuffle buffer of the mixing measurement. Default: 10000.")
    parser.add_argument("--row-group", type=int, default=4, help="Rows per parquet row group of the mixing set. Default: 4.")
    parser.add_argument("--resume", action="store_true", help="Measure the cost of resuming a stream early and late.")
    parser.add_argument("--resume-passes", type=int, nargs="+", default=[1, 50], help="Passes to resume in. Default: 1 50.")
    parser.add_argument("--resume-workers", type=int, default=2, help="DataLoader workers of the resumed runs. Default: 2.")
    parser.add_argument("--resume-buffer", type=int, default=64,
                        help="Shuffle buffer of the resumed runs; the default is one shard of the set. Default: 64.")
    options = parser.parse_args(argv)
    if options.mixing:
        result = mixing(options)
    elif options.resume:
        result = resume(options)
    else:
        result = throughput(options)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
