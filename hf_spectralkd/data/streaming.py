"""An endless, exactly and cheaply resumable training stream: every pass, shard and row found by arithmetic.

The Trainer knows no length for a stream, so it counts a whole streamed run as one "epoch".
:class:`ResumableImageStream` makes the split an endless sequence of passes and plans each pass
from the :class:`~.shards.ShardLayout` (rows per block, known from parquet footers or counted once):

1. **Pass order.** Pass ``p`` permutes all blocks (row groups) of all shards with a generator
   seeded by ``(seed, p)``: a fresh shard order every pass, and neighbouring blocks of the pass come
   from unrelated shards. The concatenated rows form the pass sequence ``G_p`` (``N`` rows).
2. **Readers.** Each (process, DataLoader worker) pair is one of ``T = world × workers`` readers;
   reader ``r`` reads the rows ``[⌊rN/T⌋, ⌊(r+1)N/T⌋)`` of ``G_p``. The ranges partition the pass:
   every record is read exactly once per pass, by one reader, and every reader draws from all shards.
3. **Windows.** A reader cuts its range into windows of ``shuffle_buffer_size`` rows, reads a
   window's blocks (only their row groups), and emits its rows in a seeded permutation of the
   window, each record ``repeated_augmentation`` times (copies of one record sit in the same window).
   The next window is read progressively while the current one is emitted, so no read stalls a worker.

Every sample is augmented under RNGs seeded by ``(seed, pass, shard, row, copy)``. A reader's
``k``-th sample is therefore a pure function of ``k``: a resume at process batch ``b`` computes,
for each worker, how many samples it already produced, hence the pass, the window and the slot in
it, reads that one window and starts there. No earlier pass, window or block is read, and the
Trainer replays nothing (the trainer turns its batch skipping off for streams that position
themselves, ``resumes_itself``).

This module holds all of the data's resume logic: the arithmetic above, the stream that positions itself
(:meth:`ResumableImageStream.fast_forward`), :func:`resumes_itself` (the trainer's test for
not replaying batches), :class:`DatasetEpochCallback` (the epoch a resumed run's dataset and the
Trainer see) and :func:`steps_for_epochs` (a streamed run's length in steps). The trainer's one
share is to call ``fast_forward`` with the checkpoint's step.

The stream subclasses ``datasets.IterableDataset`` only so that accelerate hands each process its own view
with ``shard(num_shards=world, index=rank)`` (it does so for such datasets with at least ``world``
shards; the stream reports its rows as shards) and never splits batches on top; everything else is
its own.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable, Iterator, Optional

import datasets
import numpy as np
import torch
from transformers import TrainerCallback

from ..errors import RunFailedError
from .shards import ShardLayout, load_layout
from .transforms import sample_seed, transform_row

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------
# Arithmetic (pure functions)
# ------------------------------------------------------------------------------------------------
def permutation(size: int, *seed_parts: Any) -> np.ndarray:
    """A permutation of ``range(size)`` (int64, shape ``size``) drawn from a generator seeded by ``seed_parts``."""
    return np.random.Generator(np.random.PCG64(sample_seed(*seed_parts))).permutation(size)


def reader_bounds(num_rows: int, reader: int, num_readers: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a pass that reader ``reader`` of ``num_readers`` reads (balanced within one row)."""
    return num_rows * reader // num_readers, num_rows * (reader + 1) // num_readers


def locate(position: int, reader_rows: int, window_rows: int, repeats: int) -> tuple[int, int, int]:
    """Where a reader's ``position``-th sample lies: ``(pass, window, slot in the window)``.

    A pass of a reader emits ``reader_rows × repeats`` samples in windows of ``window_rows × repeats``
    slots (the last window of a pass may be shorter).
    """
    per_pass = reader_rows * repeats
    pass_index, offset = divmod(position, per_pass)
    window, slot = divmod(offset, window_rows * repeats)
    return pass_index, window, slot


def worker_start(skip_batches: int, worker: int, num_workers: int) -> tuple[int, int]:
    """``(logical worker, batches it already produced)`` for a fresh DataLoader resuming at batch ``skip_batches``.

    A DataLoader takes batch ``k`` from worker ``k % num_workers``, so the resumed loader's worker
    ``w`` continues the stream of the original worker ``(skip_batches + w) % num_workers``, which
    had produced ``(skip_batches + w) // num_workers`` batches before it.
    """
    return (skip_batches + worker) % num_workers, (skip_batches + worker) // num_workers


class PassPlan:
    """The block order of one pass and its cumulative row offsets, to map pass rows to blocks.

    Args:
        blocks: ``(shard, start, stop)`` of every block (:meth:`ShardLayout.blocks`).
        pass_index, seed: the pass and the stream seed its permutation is drawn from.
    """

    def __init__(self, blocks: list[tuple[int, int, int]], pass_index: int, seed: int):
        self.blocks = blocks
        self.order = permutation(len(blocks), seed, "pass", pass_index)
        sizes = np.fromiter((blocks[i][2] - blocks[i][1] for i in self.order), dtype=np.int64, count=len(blocks))
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # row of the pass where each block starts

    def segments(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """Rows ``[start, stop)`` of the pass as ``(shard, first row, end row)`` pieces of blocks, in pass order."""
        out = []
        index = int(np.searchsorted(self.offsets, start, side="right")) - 1
        position = start
        while position < stop:
            shard, block_start, block_stop = self.blocks[int(self.order[index])]
            offset = position - int(self.offsets[index])
            take = min(block_stop - block_start - offset, stop - position)
            out.append((shard, block_start + offset, block_start + offset + take))
            position += take
            index += 1
        return out


# ------------------------------------------------------------------------------------------------
# The stream
# ------------------------------------------------------------------------------------------------
class ResumableImageStream(datasets.IterableDataset, torch.utils.data.IterableDataset):
    """Endless stream of ``{"pixel_values", "labels", "seed"}`` samples from raw image records.

    Args:
        source: where the records come from (:class:`~.shards.ParquetShards` or
            :class:`~.shards.IterableDatasetShards`): ``layout()``, ``read(shard, start, stop)``,
            ``fingerprint()``.
        transform: PIL image → tensor, run under per-sample seeded RNGs.
        seed: pass order, window order and augmentation seed.
        shuffle_buffer_size: rows per window (a reader holds at most two windows of raw records).
        repeated_augmentation: times each record is emitted per pass, each copy with its own augmentation.
        max_rows: use only the split's first rows (in shard order).
        cache_dir: where the layout is cached (``stream_layout.json``), e.g. the run's output folder.
    """

    #: The trainer must not replay the batches a resumed run skips: the stream starts at the resume point itself.
    resumes_itself = True

    def __init__(self, source, transform: Callable, seed: int = 0, shuffle_buffer_size: int = 10_000,
                 repeated_augmentation: int = 1, max_rows: Optional[int] = None, cache_dir: Optional[str] = None):
        # datasets.IterableDataset.__init__ is deliberately not called: this class only borrows the
        # type for accelerate's sharding and keeps no HF iteration state of its own.
        self.source, self.transform, self.seed = source, transform, int(seed)
        self.window_rows = max(1, int(shuffle_buffer_size))
        self.repeated_augmentation = max(1, int(repeated_augmentation))
        self.max_rows, self.cache_dir = max_rows, cache_dir
        self.num_processes, self.process_index = 1, 0
        self.skip_batches, self.batch_size = 0, 0
        self._layout: Optional[ShardLayout] = None

    # --- what accelerate and the Trainer ask of a stream ---
    def __getstate__(self):
        # datasets.IterableDataset's own pickling expects attributes this class does not have. A copy of
        # the dict, not the dict itself: copy.copy (shard) must not make the view share the original's.
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__ = state

    @property
    def layout(self) -> ShardLayout:
        """The split's blocks (read from footers, the cache, or counted once on first use)."""
        if self._layout is None:
            self._layout = load_layout(self.source, self.cache_dir).truncated(self.max_rows)
        return self._layout

    @property
    def num_rows(self) -> int:
        return self.layout.num_rows

    @property
    def num_shards(self) -> int:
        # Rows are the unit divided between processes: reporting them as shards makes accelerate call
        # shard() for any number of processes instead of replaying the whole stream on each.
        return max(1, self.num_rows)

    @property
    def n_shards(self) -> int:
        return self.num_shards

    @property
    def column_names(self):
        return ["pixel_values", "labels", "seed"]

    @property
    def records_read(self) -> int:
        """Raw records this process has read (whole row groups for parquet), for measurements."""
        return self.source.records_read

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> "ResumableImageStream":
        """This process's view: it reads its own share of every pass (``contiguous`` has no effect)."""
        if self.num_processes != 1:
            raise RuntimeError("ResumableImageStream.shard: the stream is already divided between processes")
        view = copy.copy(self)
        view.num_processes, view.process_index = int(num_shards), int(index)
        return view

    def set_epoch(self, epoch: int) -> None:
        """No-op: passes are counted inside the stream (the Trainer's epoch stays 0 for a stream)."""

    def fast_forward(self, skip_batches: int, batch_size: int) -> None:
        """Start at this process's batch ``skip_batches`` of ``batch_size`` samples (a resumed run)."""
        self.skip_batches, self.batch_size = int(skip_batches), int(batch_size)

    # --- iteration ---
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        logical, batches_done = worker_start(self.skip_batches, worker, num_workers)
        reader = self.process_index * num_workers + logical
        yield from self.reader_samples(reader, self.num_processes * num_workers, batches_done * self.batch_size)

    def reader_samples(self, reader: int, num_readers: int, start: int = 0) -> Iterator[dict[str, Any]]:
        """Samples of reader ``reader`` of ``num_readers`` from its ``start``-th sample on, endlessly."""
        layout = self.layout
        low, high = reader_bounds(layout.num_rows, reader, num_readers)
        if high <= low:
            return  # more readers than rows: this one has nothing to read
        window_rows, repeats = self.window_rows, self.repeated_augmentation
        windows_per_pass = math.ceil((high - low) / window_rows)
        pass_index, window, slot = locate(start, high - low, window_rows, repeats)
        blocks = layout.blocks()
        plans: dict[int, PassPlan] = {}

        def window_segments(pass_index: int, window: int) -> list[tuple[int, int, int]]:
            if pass_index not in plans:
                if len(plans) > 1:  # at most the current pass and the next one
                    plans.clear()
                plans[pass_index] = PassPlan(blocks, pass_index, self.seed)
            first = low + window * window_rows
            return plans[pass_index].segments(first, min(first + window_rows, high))

        current: list[tuple[Any, Any, int, int]] = []
        for _ in self._read(window_segments(pass_index, window), current):
            pass
        while True:
            following = (pass_index, window + 1) if window + 1 < windows_per_pass else (pass_index + 1, 0)
            upcoming: list[tuple[Any, Any, int, int]] = []
            segments = window_segments(*following)
            reads = self._read(segments, upcoming)
            order = permutation(len(current) * repeats, self.seed, "window", pass_index, reader, num_readers, window)
            every = max(1, (len(order) - slot) // max(1, len(segments)))
            for emitted, slot_index in enumerate(order[slot:].tolist()):
                record, copy_index = divmod(slot_index, repeats)
                image, label, shard, row = current[record]
                seed = sample_seed(self.seed, pass_index, shard, row, copy_index)
                yield transform_row(image, label, self.transform, seed)
                if emitted % every == 0:
                    next(reads, None)  # spread the next window's reads over this window's samples
            for _ in reads:
                pass
            current, slot = upcoming, 0
            pass_index, window = following

    def _read(self, segments: list[tuple[int, int, int]], into: list) -> Iterator[None]:
        """Read ``segments`` one per step into ``into`` as ``(image, label, shard, row)``.

        Raises:
            RunFailedError: a shard holds fewer rows than its layout says (the data changed since the
                layout was recorded): positions would no longer be what a resume computes.
        """
        for shard, start, stop in segments:
            rows = self.source.read(shard, start, stop)
            if len(rows) != stop - start:
                raise RunFailedError(
                    f"stream: rows {start}-{stop} of shard {self.layout.shards[shard]} gave {len(rows)} records, not "
                    f"{stop - start}; the data changed since its layout was recorded (delete stream_layout.json in the "
                    "output folder to measure it again)"
                )
            into.extend((image, label, shard, start + offset) for offset, (image, label) in enumerate(rows))
            yield


# ------------------------------------------------------------------------------------------------
# What a resumed run asks of its training data
# ------------------------------------------------------------------------------------------------
def resumes_itself(dataset: Any) -> bool:
    """Whether ``dataset`` starts at a resume point itself (:meth:`ResumableImageStream.fast_forward`).

    The trainer then replays none of the batches a resumed run skips (``training.data_order.DataOrder``), and the
    epoch it reports is the stream's (:class:`DatasetEpochCallback`).
    """
    return bool(getattr(dataset, "resumes_itself", False))


class DatasetEpochCallback(TrainerCallback):
    """Tell the training dataset which epoch starts, also on a resumed run.

    Augmentation (map-style) and stream order (streaming) depend on the epoch. accelerate forwards
    ``set_epoch`` to the dataset, except through the loader that skips the already-seen batches of a
    resumed epoch, which would replay that epoch with epoch 0's randomness.

    Args:
        get_dataset: returns the current training dataset (the trainer's ``train_dataset``).
    """

    def __init__(self, get_dataset: Callable[[], Any]):
        self.get_dataset = get_dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.get_dataset()
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-9)))

    def on_step_end(self, args, state, control, **kwargs):
        # A stream that resumes itself is not replayed, so the Trainer counts the resumed run's steps
        # from 0 when it computes the epoch. A stream is one epoch of max_steps steps: an uninterrupted
        # run computes (global_step·GA)/(max_steps·GA), which rounds to the same float as this.
        if resumes_itself(self.get_dataset()) and state.max_steps:
            state.epoch = state.global_step / state.max_steps


def steps_for_epochs(num_examples: int, epochs: float, per_device_batch_size: int, world_size: int, grad_accum: int,
                     repeated_augmentation: int = 1) -> int:
    """Optimizer steps covering ``epochs`` epochs of ``num_examples`` images (for streamed data).

    An epoch is ``num_examples`` samples, with or without repeated augmentation, as in DeiT: with
    ``R`` repeats it holds about ``num_examples / R`` distinct images seen ``R`` times each, and
    (like DeiT's ``RASampler`` and :class:`~.sampling.RepeatedAugmentationSampler`) only whole
    global batches, ``⌊num_examples / global batch⌋`` steps. Without repeats a partial last batch
    counts as a step.
    """
    global_batch = per_device_batch_size * world_size * grad_accum
    if repeated_augmentation > 1:
        return max(1, math.ceil(epochs * max(1, num_examples // global_batch)))
    return max(1, math.ceil(epochs * num_examples / global_batch))
