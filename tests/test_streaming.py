"""The streamed split: pass arithmetic, mixing of class-sorted shards, exact cheap resume, repeated augmentation."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hf_spectralkd.data import (
    ImageClassificationCollator,
    IterableDatasetShards,
    ParquetShards,
    RepeatedAugmentationSampler,
    ResumableImageStream,
    ShardLayout,
    TransformedImageDataset,
    steps_for_epochs,
)
from hf_spectralkd.data.splits import parquet_files_of
from hf_spectralkd.data.streaming import PassPlan, locate, reader_bounds, worker_start

SHARDS, ROWS, ROW_GROUP = 20, 32, 2  # 640 records, one class per shard, 320 row groups


def noisy_image(rng: np.random.Generator, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def class_sorted_parquet(root: Path, shards: int = SHARDS, rows: int = ROWS, row_group: int = ROW_GROUP) -> list[str]:
    """Shard ``s`` holds class ``s`` only; column ``record`` numbers the records, so class = record // rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for shard in range(shards):
        images = [{"bytes": noisy_image(rng), "path": None} for _ in range(rows)]
        table = pa.table({"image": images, "record": list(range(shard * rows, (shard + 1) * rows))})
        files.append(str(root / f"train-{shard:05d}.parquet"))
        pq.write_table(table, files[-1], row_group_size=row_group)
    return files


@pytest.fixture(scope="module")
def sorted_files(tmp_path_factory):
    return class_sorted_parquet(tmp_path_factory.mktemp("class_sorted"))


def pixels(image: Image.Image) -> torch.Tensor:
    """A transform with randomness: a seeded augmentation shows up as different pixels."""
    return torch.as_tensor(np.array(image), dtype=torch.float32).permute(2, 0, 1) / 255 + torch.rand(1)


def make_stream(files, window: int = 10_000, repeats: int = 1, cache_dir=None) -> ResumableImageStream:
    return ResumableImageStream(ParquetShards(files, "image", "record"), pixels, seed=7, shuffle_buffer_size=window,
                                repeated_augmentation=repeats, cache_dir=cache_dir)


def batches(stream, count: int, batch_size: int, workers: int) -> list[dict]:
    loader = torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers,
                                         collate_fn=ImageClassificationCollator())
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


# ------------------------------------------------------------------------------------------------
# Arithmetic
# ------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=4), min_size=1, max_size=6), st.integers(1, 7),
       st.integers(0, 50))
def test_each_pass_is_partitioned_between_readers_by_whole_blocks(block_rows, num_readers, pass_index):
    layout = ShardLayout(tuple(f"s{i}" for i in range(len(block_rows))), tuple(tuple(b) for b in block_rows))
    plan = PassPlan(layout.blocks(), pass_index, seed=3)
    seen = []
    for reader in range(num_readers):
        start, stop = reader_bounds(layout.num_rows, reader, num_readers)
        assert stop - start in (layout.num_rows // num_readers, layout.num_rows // num_readers + 1)
        for shard, first, end in plan.segments(start, stop):
            assert 0 <= first < end <= sum(block_rows[shard])
            seen += [(shard, row) for row in range(first, end)]
    assert sorted(seen) == sorted((s, r) for s, rows in enumerate(block_rows) for r in range(sum(rows)))


def test_positions_map_to_pass_window_slot_and_workers_continue_their_own_streams():
    # a reader with 10 rows per pass, windows of 4 rows, 3 copies: 30 samples per pass, windows of 12 slots
    assert locate(0, 10, 4, 3) == (0, 0, 0)
    assert locate(29, 10, 4, 3) == (0, 2, 5)
    assert locate(30 * 7 + 13, 10, 4, 3) == (7, 1, 1)
    # resuming at batch 5 with 2 workers: the new worker 0 continues old worker 1 (batches 1, 3 done) ...
    assert worker_start(5, 0, 2) == (1, 2)
    assert worker_start(5, 1, 2) == (0, 3)  # ... and the new worker 1 old worker 0 (batches 0, 2, 4 done)


# ------------------------------------------------------------------------------------------------
# Mixing
# ------------------------------------------------------------------------------------------------
def uniform_distinct(classes: int, per_class: int, batch: int) -> float:
    return classes * (1 - math.comb(classes * per_class - per_class, batch) / math.comb(classes * per_class, batch))


def test_class_sorted_shards_are_mixed_and_read_exactly_once_per_pass(sorted_files):
    world, workers, batch = 2, 2, 16
    per_process = SHARDS * ROWS // (world * batch)  # batches of one pass per process
    passes = {0: [], 1: []}
    distinct = []
    for rank in range(world):
        stream = make_stream(sorted_files).shard(num_shards=world, index=rank)
        for index, item in enumerate(batches(stream, 2 * per_process, batch, workers)):
            labels = item["labels"].tolist()
            passes[index // per_process] += labels
            if index < per_process:
                distinct.append(len({label // ROWS for label in labels}))
    for records in passes.values():  # no loss, no duplicate, in each pass
        assert sorted(records) == list(range(SHARDS * ROWS))
    assert passes[0] != passes[1]  # each pass has its own order
    assert np.mean(distinct) >= 0.9 * uniform_distinct(SHARDS, ROWS, batch)


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_stream_continues_with_the_same_batches_and_augmentations(sorted_files, workers):
    batch, window, repeats = 16, 48, 3  # 120 batches per pass: batch 131 lies in the second pass
    reference = batches(make_stream(sorted_files, window, repeats), 137, batch, workers)
    resumed_stream = make_stream(sorted_files, window, repeats)
    resumed_stream.fast_forward(131, batch)  # odd: with 2 workers the resumed loader's worker 0 continues worker 1
    resumed = batches(resumed_stream, 6, batch, workers)
    for expected, got in zip(reference[131:], resumed):
        assert got["labels"].tolist() == expected["labels"].tolist()
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=0)


def test_resume_reads_one_window_whatever_the_pass(sorted_files):
    batch, window = 16, 32
    read = []
    for skip in (3, 4000):  # pass 0 and pass 100
        stream = make_stream(sorted_files, window)
        stream.fast_forward(skip, batch)
        next(iter(stream))
        read.append((stream.records_read, stream.source.files_opened))
        assert locate(skip * batch, SHARDS * ROWS, window, 1)[0] == (0 if skip == 3 else 100)
    assert read[0][0] == read[1][0] == window  # one window of row groups, not the passes before it
    assert all(opened <= window // ROW_GROUP for _, opened in read)


def test_layout_is_cached_and_remote_urls_read_like_local_files(sorted_files, tmp_path):
    local = make_stream(sorted_files, cache_dir=str(tmp_path))
    assert local.num_rows == SHARDS * ROWS and local.layout.block_rows[0] == (ROW_GROUP,) * (ROWS // ROW_GROUP)
    cached = json.loads((tmp_path / "stream_layout.json").read_text())
    assert cached["layout"]["block_rows"][3] == [ROW_GROUP] * (ROWS // ROW_GROUP)
    remote = ParquetShards([Path(f).as_uri() for f in sorted_files], "image", "record")  # through fsspec
    assert remote.layout().block_rows == local.layout.block_rows
    assert [label for _, label in remote.read(4, 3, 9)] == list(range(4 * ROWS + 3, 4 * ROWS + 9))


def test_max_train_samples_keeps_the_first_records_of_a_stream(sorted_files):
    stream = ResumableImageStream(ParquetShards(sorted_files, "image", "record"), pixels, max_rows=75)
    assert stream.num_rows == 75 and stream.layout.block_rows[2] == (2,) * 5 + (1,)
    one_pass = [sample["labels"] for _, sample in zip(range(75), stream.reader_samples(0, 1))]
    assert sorted(one_pass) == list(range(75))  # shards 0 and 1 whole, 11 rows of shard 2


def test_parquet_files_of_a_builder(sorted_files):
    import datasets

    builder = datasets.load_dataset_builder("parquet", data_files={"train": sorted_files[:3]})
    assert parquet_files_of(builder, "train") == sorted_files[:3]
    assert parquet_files_of(builder, "validation") is None


def test_other_streams_are_counted_once_and_resume_exactly(tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    table = {"image": [{"bytes": noisy_image(rng), "path": None} for _ in range(30)], "label": list(range(30))}
    raw = datasets.Dataset.from_dict(table).to_iterable_dataset(num_shards=3)
    source = IterableDatasetShards(raw, "image", "label", name="generated")
    stream = ResumableImageStream(source, pixels, shuffle_buffer_size=8, cache_dir=str(tmp_path))
    assert stream.layout.block_rows == ((10,), (10,), (10,))
    reference = batches(stream, 12, 5, 2)  # in DataLoader workers, each reading parts of every shard
    assert sorted(label for item in reference[:6] for label in item["labels"].tolist()) == list(range(30))
    again = ResumableImageStream(IterableDatasetShards(raw, "image", "label", name="generated"), pixels,
                                 shuffle_buffer_size=8, cache_dir=str(tmp_path))
    again.source.layout = None  # the cached layout must be used: counting again would fail
    again.fast_forward(9, 5)
    assert [item["labels"].tolist() for item in batches(again, 3, 5, 2)] == [b["labels"].tolist() for b in reference[9:]]


def test_a_shard_shorter_than_its_layout_stops_the_stream_clearly(sorted_files):
    from hf_spectralkd.errors import RunFailedError

    stream = make_stream(sorted_files, window=32)
    stream._layout = ShardLayout(stream.layout.shards, tuple(sizes + (2,) for sizes in stream.layout.block_rows))
    with pytest.raises(RunFailedError, match="the data changed since its layout was recorded"):
        for _ in stream.reader_samples(0, 1):  # the first pass reaches a block of missing rows
            pass


# ------------------------------------------------------------------------------------------------
# Repeated augmentation
# ------------------------------------------------------------------------------------------------
def test_stream_repeats_each_record_nearby_with_distinct_augmentations(sorted_files):
    window, repeats = 40, 3
    stream = make_stream(sorted_files, window, repeats)
    samples = [sample for _, sample in zip(range(SHARDS * ROWS * repeats), stream.reader_samples(0, 1))]
    by_record: dict[int, list[int]] = {}
    for position, sample in enumerate(samples):
        by_record.setdefault(sample["labels"], []).append(position)
    assert sorted(by_record) == list(range(SHARDS * ROWS)) and all(len(p) == repeats for p in by_record.values())
    for positions in by_record.values():  # the copies of a record share its window
        assert len({p // (window * repeats) for p in positions}) == 1
        seeds = {samples[p]["seed"] for p in positions}
        assert len(seeds) == repeats
        first, *others = (samples[p]["pixel_values"] for p in positions)
        assert all(not torch.equal(first, other) for other in others)


def deit_shares(sampler: RepeatedAugmentationSampler) -> list[list[tuple[int, int]]]:
    """What each process receives through accelerate's batch sharding."""
    batch_sampler = torch.utils.data.BatchSampler(sampler, sampler.batch_size, drop_last=False)
    return [[tuple(item) for batch in BatchSamplerShard(batch_sampler, num_processes=sampler.num_processes,
                                                        process_index=rank) for item in batch]
            for rank in range(sampler.num_processes)]


def test_map_style_repeated_augmentation_follows_deit_across_processes():
    size, repeats, world, batch = 50, 3, 2, 4
    sampler = RepeatedAugmentationSampler(size, repeats, world, batch, seed=0, epoch=lambda: 0)
    shares = deit_shares(sampler)
    per_process = size // (world * batch) * batch
    assert [len(share) for share in shares] == [per_process] * world
    # DeiT: one sequence i,i,i,j,j,j,... dealt to the processes in turn
    dealt = [shares[j % world][j // world] for j in range(world * per_process)]
    groups = [dealt[k : k + repeats] for k in range(0, len(dealt) - repeats + 1, repeats)]
    assert all({i for i, _ in g} == {g[0][0]} and [c for _, c in g] == list(range(repeats)) for g in groups)
    assert len({g[0][0] for g in groups}) == len(groups)  # a permutation: no image in two groups
    sampler_next_epoch = RepeatedAugmentationSampler(size, repeats, world, batch, seed=0, epoch=lambda: 1)
    assert deit_shares(sampler_next_epoch) != shares


def test_copies_of_an_image_get_their_own_augmentation(imagefolder):
    import datasets

    from hf_spectralkd.data import DataArguments, build_train_transform

    raw = datasets.load_dataset("imagefolder", data_dir=imagefolder, split="train")
    dataset = TransformedImageDataset(raw, build_train_transform(DataArguments(auto_augment="none"), 32), "image", "label",
                                      repeated_augmentation=3)
    assert torch.equal(dataset[(4, 0)]["pixel_values"], dataset[4]["pixel_values"])  # copy 0 is the plain sample
    assert not torch.equal(dataset[(4, 1)]["pixel_values"], dataset[(4, 0)]["pixel_values"])
    assert not torch.equal(dataset[(4, 2)]["pixel_values"], dataset[(4, 1)]["pixel_values"])


def test_an_epoch_with_repeated_augmentation_counts_as_deit_counts_it():
    size, world, batch, accumulation = 1000, 2, 16, 2
    sampler = RepeatedAugmentationSampler(size, 3, world, batch, accumulation)
    steps_per_epoch = len(sampler) // (world * batch * accumulation)
    assert steps_per_epoch == size // (world * batch * accumulation) == 15  # whole global batches of N samples
    assert steps_for_epochs(size, 4, batch, world, accumulation, repeated_augmentation=3) == 4 * steps_per_epoch
    assert steps_for_epochs(size, 4, batch, world, accumulation) == math.ceil(4 * size / 64)  # partial batch counts


def test_recipe_with_repeated_augmentation_counts_epochs_as_deit(imagefolder, saved_models, tmp_path):
    import run_distill
    from helpers import tiny_run_args

    # 24 training images at batch 5: DeiT's epoch is 24 // 5 = 4 steps (without repeats ceil(24 / 5) = 5)
    args = tiny_run_args(saved_models, imagefolder, tmp_path / "out", "--max_steps", "-1", "--num_train_epochs", "1",
                         "--per_device_train_batch_size", "5", "--repeated_augmentation", "3", "--eval_strategy", "no",
                         "--save_strategy", "no", "--profile_images", "0", "--evaluate_teacher", "false")
    assert run_distill.main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["global_steps"] == 4 and results["train_images"] == 20


def test_repeated_augmentation_is_a_positive_integer(capsys):
    import run_distill
    from helpers import run_and_capture

    code, err = run_and_capture(run_distill.main, ["--student", "x", "--repeated_augmentation", "0"], capsys)
    assert code == 2 and "repeated_augmentation: expected a positive integer, got 0" in err


def test_accelerate_hands_each_process_its_own_view_of_the_stream(sorted_files):
    from accelerate.data_loader import prepare_data_loader

    stream = make_stream(sorted_files)
    labels = []
    for rank in range(2):
        loader = prepare_data_loader(torch.utils.data.DataLoader(stream, batch_size=16, collate_fn=ImageClassificationCollator()),
                                     num_processes=2, process_index=rank, put_on_device=False, dispatch_batches=False)
        assert isinstance(loader.dataset, ResumableImageStream)  # not wrapped a second time
        assert (loader.dataset.num_processes, loader.dataset.process_index) == (2, rank)
        iterator = iter(loader)
        labels += [label for _ in range(SHARDS * ROWS // 32) for label in next(iterator)["labels"].tolist()]
    assert sorted(labels) == list(range(SHARDS * ROWS))
    with pytest.raises(RuntimeError, match="already divided"):
        stream.shard(2, 0).shard(2, 1)
