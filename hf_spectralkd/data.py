"""Data: image-classification datasets → ``{"pixel_values", "labels"}`` batches.

Sources (:func:`load_image_datasets`): a Hub dataset (``ILSVRC/imagenet-1k``, streamed or not), a
local ``imagefolder`` (``root/<split>/<class>/*.jpg``), local parquet files, or the built-in offline
``demo:mnist5k`` digits. Column names are configurable.

Transforms are timm's: DeiT training augmentation (RandomResizedCrop, flip, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic) and resize + center-crop evaluation. Mixup /
CutMix (timm ``Mixup``) are optional and produce soft targets.

Two properties the trainer relies on:

* **Undecodable images are skipped, not fatal.** Images are decoded here (the column is read with
  ``decode=False``); a failure yields an empty sample that the collator drops and counts
  (``num_skipped`` in the batch, logged as ``skipped_images``).
* **Augmentation is a pure function of (seed, sample identity).** Each sample is augmented under
  RNGs seeded from ``(seed, epoch, index)`` (map-style) or ``(seed, content hash, stream position)``
  (streaming), never from the process-global RNG state. A resumed run, any worker count and any
  prefetching therefore see exactly the same augmented images as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_DATASET = "demo:mnist5k"
#: Number of training images of well-known streamed datasets, used to turn epochs into max_steps.
KNOWN_TRAIN_SIZES = {"ILSVRC/imagenet-1k": 1_281_167, "imagenet-1k": 1_281_167, "timm/imagenet-1k-wds": 1_281_167}


@dataclass
class DataArguments:
    """Where the images come from and how they are augmented (the recipe's data options)."""

    dataset: str = field(
        default=DEMO_DATASET,
        metadata={
            "help": "Hub dataset id (e.g. ILSVRC/imagenet-1k, gated: set HF_TOKEN), a local imagefolder "
            "(root/<split>/<class>/*.jpg), a folder of parquet files, or 'demo:mnist5k' (offline digits)."
        },
    )
    dataset_config: Optional[str] = field(default=None, metadata={"help": "Dataset configuration name on the Hub."})
    dataset_revision: Optional[str] = field(default=None, metadata={"help": "Dataset branch, tag or commit on the Hub."})
    train_split: str = field(default="train", metadata={"help": "Split used for training."})
    eval_split: Optional[str] = field(
        default="validation",
        metadata={"help": "Split used for evaluation; when missing, --validation_fraction of train is held out."},
    )
    validation_fraction: float = field(
        default=0.1, metadata={"help": "Share of the train split held out for evaluation when there is no eval split."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding integer class labels."})
    streaming: bool = field(
        default=False,
        metadata={"help": "Stream the train split (no full download). Requires --max_steps or a known dataset size."},
    )
    train_samples: Optional[int] = field(
        default=None,
        metadata={"help": "Number of training images of a streamed dataset, to derive max_steps from epochs."},
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed train split."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the train split (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the eval split."})
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Input resolution; defaults to the student's configured image size."}
    )
    eval_crop_pct: float = field(default=0.875, metadata={"help": "Center-crop fraction at evaluation (224/256)."})
    interpolation: str = field(default="bicubic", metadata={"help": "Resize interpolation: bicubic, bilinear, ..."})
    auto_augment: Optional[str] = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm auto-augment policy ('none' to disable); with one, colour jitter is off as in DeiT."},
    )
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability in training."})
    scale_min: float = field(default=0.08, metadata={"help": "Lower bound of RandomResizedCrop's area scale."})
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability ('pixel' mode, one box)."})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha; > 0 enables mixup (soft targets). Off in the paper."})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha; > 0 enables CutMix (soft targets). Off in the paper."})
    image_mean: Optional[list[float]] = field(default=None, metadata={"help": "Normalisation mean (default ImageNet)."})
    image_std: Optional[list[float]] = field(default=None, metadata={"help": "Normalisation std (default ImageNet)."})


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------
def build_train_transform(args: DataArguments, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """timm DeiT training transform: PIL RGB image → ``3×S×S`` float tensor."""
    from timm.data import create_transform

    auto_augment = None if (args.auto_augment or "none").lower() == "none" else args.auto_augment
    return create_transform(
        input_size=image_size,
        is_training=True,
        scale=(args.scale_min, 1.0),
        hflip=args.hflip,
        auto_augment=auto_augment,
        color_jitter=0.0 if auto_augment is None else 0.4,  # timm ignores jitter when a policy is set
        interpolation=args.interpolation,
        re_prob=args.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(args.image_mean or IMAGENET_MEAN),
        std=tuple(args.image_std or IMAGENET_STD),
    )


def build_eval_transform(args: DataArguments, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``S / crop_pct`` and center-crop ``S`` (224 ← 256 by default)."""
    from timm.data import create_transform

    return create_transform(
        input_size=image_size,
        is_training=False,
        interpolation=args.interpolation,
        crop_pct=args.eval_crop_pct,
        mean=tuple(args.image_mean or IMAGENET_MEAN),
        std=tuple(args.image_std or IMAGENET_STD),
    )


def build_mixup(args: DataArguments, num_classes: int, label_smoothing: float):
    """timm ``Mixup`` when mixup or cutmix is on, else ``None``. Its targets already hold the smoothing."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------
# Deterministic per-sample randomness
# --------------------------------------------------------------------------------------------------
def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from any hashable parts (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python, NumPy and torch (CPU) RNGs for a block, then restore their previous states.

    timm and torchvision transforms draw from these global generators; restoring keeps the
    training process's own random stream (dropout, samplers) untouched.
    """
    # The CPU generator is used directly: torch.manual_seed would also queue a CUDA reseed (and
    # record a stack trace for it) on every sample, which costs ~1 ms.
    generator = torch.default_generator
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), generator.get_state()
    random.seed(seed)
    np.random.seed(seed % (2**32))
    generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        generator.set_state(torch_state)


def decode_image(value: Any) -> Optional[Image.Image]:
    """An RGB PIL image from a ``datasets.Image(decode=False)`` value, a path, bytes or PIL image.

    Returns ``None`` when the image cannot be decoded (truncated, not an image, missing file).
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            raw, path = value.get("bytes"), value.get("path")
            image = Image.open(io.BytesIO(raw)) if raw is not None else Image.open(path)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            image = Image.open(value)
        image.load()  # force the full decode here, inside the try
        return image.convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this image"
        logger.debug("skipping undecodable image: %s", error)
        return None


def _content_key(value: Any) -> str:
    if isinstance(value, dict):
        raw = value.get("bytes")
        if raw is not None:
            return hashlib.blake2b(raw, digest_size=8).hexdigest()
        return str(value.get("path"))
    return str(value)


# --------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------
class TransformedImageDataset(torch.utils.data.Dataset):
    """Map-style view of a ``datasets.Dataset`` yielding ``{"pixel_values", "labels", "seed"}``.

    ``set_epoch`` (called by accelerate's data loader each epoch) changes the augmentation of every
    sample; the epoch lives in shared memory so persistent workers see it too.
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
        return _transform_row(row[self.image_column], row[self.label_column], self.transform, seed)


def _transform_row(image_value: Any, label: Any, transform: Callable, seed: int) -> dict[str, Any]:
    image = decode_image(image_value)
    if image is None:
        return {"pixel_values": None, "labels": label, "seed": seed}
    with seeded_rngs(seed):
        pixel_values = transform(image)
    return {"pixel_values": pixel_values, "labels": label, "seed": seed}


def stream_transform(dataset, transform: Callable, image_column: str, label_column: str, seed: int = 0):
    """Lazily decode and augment a ``datasets.IterableDataset`` (runs inside the DataLoader workers).

    The per-sample seed mixes the image's content hash with its position in the (per-epoch
    reshuffled) stream, so augmentations change every epoch and replay identically on resume.
    """
    import datasets

    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def apply(row: dict[str, Any], position: int) -> dict[str, Any]:
        sample_key = sample_seed(seed, _content_key(row[image_column]), position)
        return _transform_row(row[image_column], row[label_column], transform, sample_key)

    columns = list(dataset.column_names or [image_column, label_column])
    return dataset.map(apply, with_indices=True, remove_columns=columns)


class ImageClassificationCollator:
    """Stack samples into ``{"pixel_values": B×3×S×S, "labels": B (or B×K), "num_skipped": int}``.

    Samples whose image failed to decode (``pixel_values is None``) are dropped and counted. With a
    timm ``Mixup``, the batch is mixed under an RNG seeded from its samples' seeds and ``labels``
    become ``B×K`` soft targets.
    """

    def __init__(self, mixup: Optional[Callable] = None):
        self.mixup = mixup

    def __call__(self, samples: Sequence[Optional[dict[str, Any]]]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
@dataclass
class ImageDatasets:
    """What :func:`load_image_datasets` returns."""

    train: Any  # TransformedImageDataset or a transformed datasets.IterableDataset
    eval: Optional[TransformedImageDataset]
    id2label: dict[int, str]
    train_size: Optional[int]  # number of training images when known
    streaming: bool
    source: str
    collator: ImageClassificationCollator = field(default_factory=ImageClassificationCollator)


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
            raise ValueError(f"eval_split/train_split: '{split}' is not a split of {DEMO_DATASET} (train, test)")
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
            raise ValueError(
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
    raise ValueError(
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
            raise ValueError(f"train_split: '{args.train_split}' is not a split of '{args.dataset}'; splits: {splits}") from error
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"dataset: cannot load '{args.dataset}': {reason}. Expected a Hub dataset id (set HF_TOKEN for gated "
            f"ones such as ILSVRC/imagenet-1k), a local imagefolder or parquet folder, or '{DEMO_DATASET}'"
        ) from error
    _check_columns(train_raw, args)
    id2label = _label_names(train_raw, args)

    eval_raw = None
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
        logger.info("no '%s' split: held out %d training images for evaluation", args.eval_split, len(eval_raw))

    if args.max_train_samples is not None:
        if args.streaming:
            train_raw = train_raw.take(args.max_train_samples)
        else:
            train_raw = train_raw.select(range(min(args.max_train_samples, len(train_raw))))
    if eval_raw is not None and args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(args.max_eval_samples, len(eval_raw))))
    return RawImageDatasets(train_raw, eval_raw, id2label, args)


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
        shuffled = raw.train.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size)
        train = stream_transform(shuffled, train_transform, args.image_column, args.label_column, seed)
    else:
        train_size = len(raw.train)
        train = TransformedImageDataset(raw.train, train_transform, args.image_column, args.label_column, seed)
    evaluation = None
    if raw.eval is not None:
        evaluation = TransformedImageDataset(raw.eval, eval_transform, args.image_column, args.label_column, seed)
    collator = ImageClassificationCollator(build_mixup(args, len(raw.id2label), label_smoothing))
    return ImageDatasets(train, evaluation, raw.id2label, train_size, args.streaming, args.dataset, collator)


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


def build_image_processor(args: DataArguments, image_size: int):
    """The image processor saved with the student, matching :func:`build_eval_transform`.

    With a center crop (``eval_crop_pct < 1``) this is ``ConvNextImageProcessor``'s shortest-edge
    resize to ``S / crop_pct`` then an ``S×S`` crop, as timm evaluates; without one, a plain
    ``S×S`` resize. Either way ``pipeline("image-classification", model=student_dir)`` preprocesses
    images as evaluation did.
    """
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    resample = getattr(Image.Resampling, args.interpolation.upper(), Image.Resampling.BICUBIC)
    mean, std = list(args.image_mean or IMAGENET_MEAN), list(args.image_std or IMAGENET_STD)
    if args.eval_crop_pct < 1.0 and image_size < 384:
        return ConvNextImageProcessor(
            size={"shortest_edge": image_size}, crop_pct=args.eval_crop_pct, resample=resample, image_mean=mean, image_std=std
        )
    return ViTImageProcessor(size={"height": image_size, "width": image_size}, resample=resample, image_mean=mean, image_std=std)
