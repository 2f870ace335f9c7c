"""An endless, exactly resumable training stream over a ``datasets.IterableDataset``.

The Trainer knows no length for a stream, so it counts a whole streamed run as one "epoch" and, on
resume, replays the stream from its start to skip the batches already trained on. Two things go
wrong with a plain HF stream that is simply re-iterated when exhausted:

* after the first pass the Trainer's skip no longer matches where the run was (the replayed first
  pass ends early), so a resumed run trains on other data than the interrupted one;
* replaying means decoding and augmenting every skipped image again.

:class:`ResumableImageStream` makes the stream one endless sequence of passes, pass ``p`` shuffled
with ``seed + p`` (new shard order and buffer order every pass), and numbers the examples each
DataLoader worker reads. Given the number of batches a resumed run will skip
(:meth:`ResumableImageStream.fast_forward`, called by the trainer), every worker knows how many of
its first examples fall into skipped batches and yields cheap placeholders for them instead of
decoding: the replay reads raw records only, and the first trained batch is exactly the one the
interrupted run would have seen next.

It subclasses ``datasets.IterableDataset`` only so that accelerate shards it across processes by
files (``shard(num_shards=world, index=rank)``) as it does HF streams; everything else is its own.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterator

import datasets
import torch

from .transforms import content_key, sample_seed, transform_row

logger = logging.getLogger(__name__)

FAST_FORWARD = "fast_forward"


class ResumableImageStream(datasets.IterableDataset, torch.utils.data.IterableDataset):
    """Endless stream of ``{"pixel_values", "labels", "seed"}`` samples from raw image records.

    Args:
        raw: the streamed split (``datasets.IterableDataset``) with an image and a label column.
        transform: PIL image → tensor, run under per-sample seeded RNGs.
        seed: shuffling and augmentation seed.
        shuffle_buffer_size: examples held by the shuffle buffer of each pass.
    """

    def __init__(self, raw, transform: Callable, image_column: str, label_column: str, seed: int = 0,
                 shuffle_buffer_size: int = 10_000):
        # datasets.IterableDataset.__init__ is deliberately not called: this class only borrows the
        # type for accelerate's sharding and keeps no HF iteration state of its own.
        self.raw = raw.cast_column(image_column, datasets.Image(decode=False))
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.seed, self.shuffle_buffer_size = seed, shuffle_buffer_size
        self.skip_batches, self.batch_size = 0, 0

    # --- what accelerate and the Trainer ask of a stream ---
    def __getstate__(self):
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__ = state

    @property
    def num_shards(self) -> int:
        return self.raw.num_shards

    @property
    def n_shards(self) -> int:
        return self.raw.num_shards

    @property
    def column_names(self):
        return ["pixel_values", "labels", "seed"]

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> "ResumableImageStream":
        shard = copy.copy(self)
        shard.raw = self.raw.shard(num_shards=num_shards, index=index, contiguous=contiguous)
        return shard

    def set_epoch(self, epoch: int) -> None:
        """No-op: passes are counted inside the stream (the Trainer's epoch stays 0 for a stream)."""

    def fast_forward(self, skip_batches: int, batch_size: int) -> None:
        """Declare that the consumer will discard the first ``skip_batches`` batches of ``batch_size``."""
        self.skip_batches, self.batch_size = int(skip_batches), int(batch_size)

    # --- iteration ---
    def _examples_to_skip(self, worker: int, num_workers: int) -> int:
        # The DataLoader takes batch k from worker k % num_workers, each batch being batch_size
        # consecutive examples of that worker's own stream.
        if self.skip_batches <= worker:
            return 0
        batches = (self.skip_batches - worker + num_workers - 1) // num_workers
        return batches * self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        to_skip = self._examples_to_skip(worker, num_workers)
        position, current_pass = 0, 0
        while True:
            seen = False
            # A fresh shuffled view per pass (no shared epoch counter between workers).
            for row in self.raw.shuffle(seed=self.seed + current_pass, buffer_size=self.shuffle_buffer_size):
                seen = True
                image, label = row[self.image_column], row[self.label_column]
                if position < to_skip:
                    yield {"pixel_values": None, "labels": label, "seed": 0, FAST_FORWARD: True}
                else:
                    yield transform_row(image, label, self.transform, sample_seed(self.seed, content_key(image), position))
                position += 1
            if not seen:
                return  # this worker has no shard
            current_pass += 1
