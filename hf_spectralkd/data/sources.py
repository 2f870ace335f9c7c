"""Datasets to train and evaluate on: Hub ids, local imagefolder/parquet and the offline demo digits."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from transformers import TrainerCallback

from ..errors import ConfigurationError
from .arguments import DEMO_DATASET, KNOWN_TRAIN_SIZES, DataArguments
from .streaming import FAST_FORWARD, ResumableImageStream
from .transforms import (
    build_eval_transform,
    build_image_processor,
    build_mixup,
    build_train_transform,
    sample_seed,
    seeded_rngs,
    transform_row,
)

logger = logging.getLogger(__name__)


class TransformedImageDataset(torch.utils.data.Dataset):
    """Map-style view of a ``datasets.Dataset`` yielding ``{"pixel_values", "labels", "seed"}``.

    ``set_epoch`` (called each epoch by the trainer, resumed epochs included) changes the
    augmentation of every sample; the epoch lives in shared memory so persistent workers see it too.
    """

    def __init__(self, dataset, transform: Callable, image_column: str, label_column: str, seed: int = 0):
        import datasets

        self.dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.transform, self.image_column, self.label_column, self.seed = transform, image_column, label_column, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        seed = sample_seed(self.seed, int(self._epoch), int(index))
        return transform_row(row[self.image_column], row[self.label_column], self.transform, seed)


class ImageClassificationCollator:
    """Stack samples into ``{"pixel_values": B×3×S×S, "labels": B (or B×K), "num_skipped": int}``.

    Samples whose image failed to decode (``pixel_values is None``) are dropped and counted. With a
    timm ``Mixup``, the batch is mixed under an RNG seeded from its samples' seeds and ``labels``
    become ``B×K`` soft targets.
    """

    def __init__(self, mixup: Optional[Callable] = None):
        self.mixup = mixup

    def __call__(self, samples: Sequence[Optional[dict[str, Any]]]) -> dict[str, Any]:
        if samples and all(s is not None and s.get(FAST_FORWARD) for s in samples):
            # a batch a resumed run skips without decoding (ResumableImageStream.fast_forward)
            return {"pixel_values": torch.empty(0), "labels": torch.empty(0, dtype=torch.long), "num_skipped": 0}
        valid = [s for s in samples if s is not None and s.get("pixel_values") is not None]
        skipped = len(samples) - len(valid)
        if not valid:
            raise RuntimeError(
                f"every image of a batch of {len(samples)} failed to decode; check the dataset's image column"
            )
        pixel_values = torch.stack([torch.as_tensor(s["pixel_values"]) for s in valid])
        labels = torch.as_tensor([int(s["labels"]) for s in valid], dtype=torch.long)
        if self.mixup is not None:
            if len(valid) % 2:
                # timm's Mixup pairs images by flipping the batch and needs an even size.
                pixel_values, labels = pixel_values[:-1], labels[:-1]
                skipped += 1
            batch_seed = sample_seed(*(s.get("seed", 0) for s in valid))
            with seeded_rngs(batch_seed):
                pixel_values, labels = self.mixup(pixel_values, labels)
        return {"pixel_values": pixel_values, "labels": labels, "num_skipped": skipped}


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


def first_images(dataset, count: int) -> Optional[torch.Tensor]:
    """The first ``count`` images of a dataset of samples, stacked as ``N×3×H×W`` (no mixup), or ``None``.

    The fixed batch of analyses (spectral profiles, ``layer_map="auto"``): on an evaluation set its
    transform is deterministic, so the same images every time.
    """
    if dataset is None or count <= 0:
        return None
    loader = torch.utils.data.DataLoader(dataset, batch_size=count, collate_fn=ImageClassificationCollator())
    return next(iter(loader))["pixel_values"]


@dataclass
class ImageDatasets:
    """What :func:`load_image_datasets` returns."""

    train: Any  # TransformedImageDataset, or ResumableImageStream when streaming
    eval: Optional[TransformedImageDataset]
    id2label: dict[int, str]
    train_size: Optional[int]  # number of training images when known
    streaming: bool
    source: str
    collator: ImageClassificationCollator = field(default_factory=ImageClassificationCollator)
    image_processor: Any = None  # the processor matching the evaluation transform, saved with the student


def _local_parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet")) if root.is_dir() else ([root] if root.suffix == ".parquet" else [])


def _split_of(path: Path, splits: Sequence[str]) -> Optional[str]:
    parts = [p.lower() for p in path.parts]
    for split in splits:
        if any(part == split or part.startswith(split + "-") or part.startswith(split + "_") for part in parts):
            return split
    return None


def _load_raw(args: DataArguments, split: str, streaming: bool, token: Optional[str] = None):
    """One split of the source as a ``datasets`` (Iterable)Dataset."""
    import datasets

    if args.dataset == DEMO_DATASET:
        from .demo import load_mnist_demo

        raw = load_mnist_demo()
        if split not in raw:
            raise ConfigurationError(f"eval_split/train_split: '{split}' is not a split of {DEMO_DATASET} (train, test)")
        ds = raw[split]
        return ds.to_iterable_dataset(num_shards=4) if streaming else ds
    root = Path(os.path.expanduser(args.dataset))
    if root.exists():
        parquet = _local_parquet_files(root)
        if parquet:
            by_split: dict[str, list[str]] = {}
            for file in parquet:
                by_split.setdefault(_split_of(file.relative_to(root) if root.is_dir() else file, ["train", "validation", "val", "test"]) or "train", []).append(str(file))
            if "val" in by_split and "validation" not in by_split:
                by_split["validation"] = by_split.pop("val")
            if split not in by_split:
                raise KeyError(split)
            return datasets.load_dataset("parquet", data_files={split: by_split[split]}, split=split, streaming=streaming)
        return datasets.load_dataset("imagefolder", data_dir=str(root), split=split, streaming=streaming)
    return datasets.load_dataset(
        args.dataset, args.dataset_config, split=split, streaming=streaming, revision=args.dataset_revision, token=token
    )


def _available_splits(args: DataArguments) -> Optional[list[str]]:
    try:
        import datasets

        if args.dataset == DEMO_DATASET:
            return ["train", "test"]
        root = Path(os.path.expanduser(args.dataset))
        if root.exists() and not _local_parquet_files(root):
            return sorted(p.name for p in root.iterdir() if p.is_dir())
        return list(datasets.get_dataset_split_names(args.dataset, args.dataset_config))
    except Exception:  # noqa: BLE001 - only used to improve an error message
        return None


def _check_columns(ds, args: DataArguments) -> None:
    columns = list(ds.column_names or (ds.features or {}).keys())
    for argument, column in (("image_column", args.image_column), ("label_column", args.label_column)):
        if columns and column not in columns:
            raise ConfigurationError(
                f"{argument}: column '{column}' is not in dataset '{args.dataset}'; its columns are {columns} "
                f"(pass --{argument} with the right name)"
            )


def _label_names(ds, args: DataArguments) -> dict[int, str]:
    import datasets

    feature = (ds.features or {}).get(args.label_column)
    if isinstance(feature, datasets.ClassLabel):
        return dict(enumerate(feature.names))
    if isinstance(ds, datasets.Dataset):
        values = sorted(set(int(v) for v in ds[args.label_column]))
        return {i: str(i) for i in range(values[-1] + 1)}
    raise ConfigurationError(
        f"label_column: '{args.label_column}' of the streamed dataset '{args.dataset}' has no class names "
        "(not a ClassLabel); stream a dataset whose label column is a ClassLabel, or load it without --streaming"
    )


@dataclass
class RawImageDatasets:
    """The untransformed splits and class names (step one of loading; see :func:`open_image_datasets`)."""

    train: Any
    eval: Any
    id2label: dict[int, str]
    args: DataArguments
    eval_split: Optional[str] = None  # where the eval images come from, e.g. "validation" or "train[held-out 10%]"


def open_image_datasets(args: DataArguments, seed: int = 0, token: Optional[str] = None) -> RawImageDatasets:
    """Open the train and eval splits and read the class names, without decoding any image.

    Raises:
        ValueError: unknown dataset or split, missing image/label column, no class names.
    """
    import datasets

    try:
        train_raw = _load_raw(args, args.train_split, args.streaming, token)
    except (FileNotFoundError, KeyError, ValueError, datasets.exceptions.DatasetNotFoundError, OSError) as error:
        splits = _available_splits(args)
        if splits is not None and args.train_split not in splits:
            raise ConfigurationError(f"train_split: '{args.train_split}' is not a split of '{args.dataset}'; splits: {splits}") from error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigurationError(
            f"dataset: cannot load '{args.dataset}': {reason}. Expected a Hub dataset id (set HF_TOKEN for gated "
            f"ones such as ILSVRC/imagenet-1k), a local imagefolder or parquet folder, or '{DEMO_DATASET}'"
        ) from error
    _check_columns(train_raw, args)
    id2label = _label_names(train_raw, args)

    eval_raw, eval_split = None, args.eval_split
    if args.eval_split:
        try:
            eval_raw = _load_raw(args, args.eval_split, False, token)
        except (FileNotFoundError, KeyError, ValueError, OSError):
            eval_raw = None
        if eval_raw is not None:
            _check_columns(eval_raw, args)
    if eval_raw is None and not args.streaming and args.validation_fraction > 0:
        parts = train_raw.train_test_split(test_size=args.validation_fraction, seed=seed)
        train_raw, eval_raw = parts["train"], parts["test"]
        eval_split = f"{args.train_split}[held-out {args.validation_fraction:.0%}]"
        logger.info("no '%s' split: held out %d training images for evaluation", args.eval_split, len(eval_raw))

    if args.max_train_samples is not None:
        if args.streaming:
            train_raw = train_raw.take(args.max_train_samples)
        else:
            train_raw = train_raw.select(range(min(args.max_train_samples, len(train_raw))))
    if eval_raw is not None and args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(args.max_eval_samples, len(eval_raw))))
    return RawImageDatasets(train_raw, eval_raw, id2label, args, eval_split if eval_raw is not None else None)


def prepare_image_datasets(
    raw: RawImageDatasets, image_size: int, seed: int = 0, label_smoothing: float = 0.1
) -> ImageDatasets:
    """Attach the train/eval transforms and build the collator (step two of loading)."""
    args = raw.args
    train_transform = build_train_transform(args, image_size)
    eval_transform = build_eval_transform(args, image_size)
    if args.streaming:
        train_size = args.train_samples or _streamed_size(raw.train, args)
        if args.max_train_samples is not None:
            train_size = min(train_size, args.max_train_samples) if train_size else args.max_train_samples
        train = ResumableImageStream(
            raw.train, train_transform, args.image_column, args.label_column, seed, args.shuffle_buffer_size
        )
    else:
        train_size = len(raw.train)
        train = TransformedImageDataset(raw.train, train_transform, args.image_column, args.label_column, seed)
    evaluation = None
    if raw.eval is not None:
        evaluation = TransformedImageDataset(raw.eval, eval_transform, args.image_column, args.label_column, seed)
    collator = ImageClassificationCollator(build_mixup(args, len(raw.id2label), label_smoothing))
    return ImageDatasets(train, evaluation, raw.id2label, train_size, args.streaming, args.dataset, collator,
                         build_image_processor(args, image_size))


def load_image_datasets(
    args: DataArguments, image_size: int, seed: int = 0, label_smoothing: float = 0.1, token: Optional[str] = None
) -> ImageDatasets:
    """:func:`open_image_datasets` then :func:`prepare_image_datasets`."""
    return prepare_image_datasets(open_image_datasets(args, seed, token), image_size, seed, label_smoothing)


def _streamed_size(ds, args: DataArguments) -> Optional[int]:
    splits = getattr(getattr(ds, "info", None), "splits", None)
    if splits and args.train_split in splits and splits[args.train_split].num_examples:
        return int(splits[args.train_split].num_examples)
    return KNOWN_TRAIN_SIZES.get(args.dataset)


def steps_for_epochs(num_examples: int, epochs: float, per_device_batch_size: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps covering ``epochs`` passes over ``num_examples`` images (for streamed data)."""
    global_batch = per_device_batch_size * world_size * grad_accum
    return max(1, math.ceil(epochs * num_examples / global_batch))
