"""The datasets a run trains and evaluates on: raw splits with their transforms attached.

:func:`load_image_datasets` is :func:`~.splits.open_image_datasets` (raw splits, checked) then
:func:`prepare_image_datasets`: a map-style split becomes a :class:`TransformedImageDataset`, a
streamed train split a :class:`~.streaming.ResumableImageStream`; the transforms are timm's (``pil``
backend) or a :class:`~.torchvision_backend.TorchvisionPipeline` (``torchvision`` backend).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .arguments import KNOWN_TRAIN_SIZES, DataArguments
from .collation import ImageClassificationCollator
from .shards import IterableDatasetShards, ParquetShards
from .splits import RawImageDatasets, open_image_datasets
from .streaming import ResumableImageStream
from .torchvision_backend import TorchvisionPipeline
from .transforms import (
    build_eval_transform,
    build_image_processor,
    build_mixup,
    build_train_transform,
    sample_seed,
    transform_row,
)


class TransformedImageDataset(torch.utils.data.Dataset):
    """Map-style view of a ``datasets.Dataset`` yielding ``{"pixel_values", "labels", "seed"}``.

    With a :class:`~.torchvision_backend.TorchvisionPipeline` as ``transform`` (``--data_backend
    torchvision``) a sample holds the prepared, still encoded image under ``"prepared"`` instead.

    ``set_epoch`` (called each epoch by the trainer, resumed epochs included) changes the
    augmentation of every sample; the epoch lives in shared memory so persistent workers see it too.
    An item is an index, or an ``(index, copy)`` pair from
    :class:`~.sampling.RepeatedAugmentationSampler`: each copy of an image gets its own augmentation.

    Args:
        repeated_augmentation: copies of each image per epoch the trainer's sampler should draw (1: off).
    """

    def __init__(self, dataset, transform: Callable, image_column: str, label_column: str, seed: int = 0,
                 repeated_augmentation: int = 1):
        import datasets

        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.transform, self.image_column, self.label_column, self.seed = transform, image_column, label_column, seed
        self.repeated_augmentation = max(1, int(repeated_augmentation))
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> dict[str, Any]:
        index, copy = (int(item[0]), int(item[1])) if isinstance(item, (tuple, list)) else (int(item), 0)
        row = self.dataset[index]
        # copy 0 keeps the seed of a run without repeated augmentation
        parts = (self.seed, self.epoch, index) if copy == 0 else (self.seed, self.epoch, index, copy)
        return transform_row(row[self.image_column], row[self.label_column], self.transform, sample_seed(*parts))


@dataclass
class ImageDatasets:
    """What :func:`load_image_datasets` returns."""

    train: Any  # TransformedImageDataset, ResumableImageStream when streaming, None in an evaluation-only run
    eval: Optional[TransformedImageDataset]
    id2label: dict[int, str]
    train_size: Optional[int]  # number of training images when known
    streaming: bool
    source: str
    collator: ImageClassificationCollator = field(default_factory=ImageClassificationCollator)
    image_processor: Any = None  # the processor matching the evaluation transform, saved with the student


def prepare_image_datasets(
    raw: RawImageDatasets, image_size: int, seed: int = 0, label_smoothing: float = 0.1, cache_dir: Optional[str] = None
) -> ImageDatasets:
    """Attach the train/eval transforms and build the collator (step two of loading).

    A streamed train split becomes a :class:`~.streaming.ResumableImageStream`; its layout (rows per
    block) is read from parquet footers here, or, for other formats, counted once when training
    starts; ``cache_dir`` (the run's output folder) keeps it as ``stream_layout.json``.
    """
    args = raw.args
    if args.data_backend == "torchvision":
        train_transform = TorchvisionPipeline(args, image_size, train=True)
        eval_transform = TorchvisionPipeline(args, image_size, train=False)
    else:
        train_transform = build_train_transform(args, image_size)
        eval_transform = build_eval_transform(args, image_size)
    train, train_size = None, None
    if raw.train is None:
        pass  # evaluation only
    elif args.streaming:
        if raw.train_files:
            source = ParquetShards(raw.train_files, args.image_column, args.label_column)
        else:
            name = "/".join(str(part) for part in (args.dataset, args.dataset_config, args.train_split, args.dataset_revision) if part)
            source = IterableDatasetShards(raw.train, args.image_column, args.label_column, name)
        train = ResumableImageStream(source, train_transform, seed, args.shuffle_buffer_size, args.repeated_augmentation,
                                     max_rows=args.max_train_samples, cache_dir=cache_dir)
        train_size = args.train_samples or (train.num_rows if raw.train_files else _streamed_size(raw.train, args))
        if args.max_train_samples is not None:
            train_size = min(train_size, args.max_train_samples) if train_size else args.max_train_samples
    else:
        train_size = len(raw.train)
        train = TransformedImageDataset(raw.train, train_transform, args.image_column, args.label_column, seed,
                                        args.repeated_augmentation)
    evaluation = None
    if raw.eval is not None:
        evaluation = TransformedImageDataset(raw.eval, eval_transform, args.image_column, args.label_column, seed)
    collator = ImageClassificationCollator(build_mixup(args, len(raw.id2label), label_smoothing))
    return ImageDatasets(train, evaluation, raw.id2label, train_size, args.streaming, args.dataset, collator,
                         build_image_processor(args, image_size))


def load_image_datasets(
    args: DataArguments, image_size: int, seed: int = 0, label_smoothing: float = 0.1, token: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> ImageDatasets:
    """:func:`open_image_datasets` then :func:`prepare_image_datasets`."""
    return prepare_image_datasets(open_image_datasets(args, seed, token), image_size, seed, label_smoothing, cache_dir)


def _streamed_size(ds, args: DataArguments) -> Optional[int]:
    splits = getattr(getattr(ds, "info", None), "splits", None)
    if splits and args.train_split in splits and splits[args.train_split].num_examples:
        return int(splits[args.train_split].num_examples)
    return KNOWN_TRAIN_SIZES.get(args.dataset)
