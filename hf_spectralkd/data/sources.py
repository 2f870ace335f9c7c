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

from ..errors import ConfigurationError, TooManyBadImagesError
from ..integrity import first_line
from .arguments import DEMO_DATASET, KNOWN_TRAIN_SIZES, DataArguments
from .label_values import check_eval_labels, imagefolder_layout_problem, split_class_names, warn_empty_class_folders
from .shards import IterableDatasetShards, ParquetShards, check_parquet_files
from .streaming import ResumableImageStream
from .tensor_pipeline import TensorImagePipeline, collate_prepared, pixel_batch
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

    With a :class:`~.tensor_pipeline.TensorImagePipeline` as ``transform`` (``--data_backend
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


class ImageClassificationCollator:
    """Stack samples into ``{"pixel_values": B×3×S×S, "labels": B (or B×K), "num_skipped", "num_images"}``.

    Samples whose image failed to decode (``pixel_values is None``) are dropped and counted in
    ``num_skipped``; ``num_images`` is the number of samples the batch was made from, decodable or
    not (the trainer's denominators). With a timm ``Mixup``, the batch is mixed under an RNG seeded
    from its samples' seeds and ``labels`` become ``B×K`` soft targets; an odd batch loses its last
    image first (timm pairs images by flipping the batch), which is not counted as skipped.

    Prepared samples (``--data_backend torchvision``) become ``{"encoded_images", "labels",
    "num_skipped", "num_images"}`` instead: the encoded images are decoded, augmented (and mixed) in
    the training process by :func:`~.tensor_pipeline.pixel_batch`.
    """

    def __init__(self, mixup: Optional[Callable] = None):
        self.mixup = mixup

    def __call__(self, samples: Sequence[Optional[dict[str, Any]]]) -> dict[str, Any]:
        if any(s is not None and "prepared" in s for s in samples):
            return collate_prepared(samples, self.mixup)
        valid = [s for s in samples if s is not None and s.get("pixel_values") is not None]
        skipped = len(samples) - len(valid)
        if not valid:
            raise TooManyBadImagesError(
                f"image_column: every image of a batch of {len(samples)} failed to decode; check that the dataset's "
                "image column holds images (--image_column)"
            )
        pixel_values = torch.stack([torch.as_tensor(s["pixel_values"]) for s in valid])
        labels = torch.as_tensor([int(s["labels"]) for s in valid], dtype=torch.long)
        if self.mixup is not None:
            if len(valid) % 2:
                # timm's Mixup pairs images by flipping the batch and needs an even size.
                pixel_values, labels = pixel_values[:-1], labels[:-1]
            batch_seed = sample_seed(*(s.get("seed", 0) for s in valid))
            with seeded_rngs(batch_seed):
                pixel_values, labels = self.mixup(pixel_values, labels)
        return {"pixel_values": pixel_values, "labels": labels, "num_skipped": skipped, "num_images": len(samples)}


def share_above(count: int, total: int, limit: float, whole_split: bool, z: float = 3.09) -> bool:
    """Whether more than ``limit`` of a split's images fail, given ``count`` failures among ``total`` read.

    On a whole split (an evaluation) the observed share is the answer. On part of one (training
    so far) it is only an estimate, and a few early failures in a small sample would otherwise stop
    a sound run: the answer is then yes only when the lower end of the Wilson interval, at 99.9 %
    one-sided confidence (``z`` = 3.09), is above ``limit``.
    """
    if total <= 0 or count <= 0:
        return False
    share = count / total
    if whole_split:
        return share > limit
    z2 = z * z
    center = share + z2 / (2 * total)
    spread = z * math.sqrt(share * (1 - share) / total + z2 / (4 * total * total))
    return (center - spread) / (1 + z2 / total) > limit


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
        if getattr(self.get_dataset(), "resumes_itself", False) and state.max_steps:
            state.epoch = state.global_step / state.max_steps


def first_images(dataset, count: int) -> Optional[torch.Tensor]:
    """The first ``count`` images of a dataset of samples, stacked as ``N×3×H×W`` (no mixup), or ``None``.

    The fixed batch of analyses (spectral profiles, ``layer_map="auto"``): on an evaluation set its
    transform is deterministic, so the same images every time. Encoded images (``--data_backend
    torchvision``) are decoded on the CPU.
    """
    if dataset is None or count <= 0:
        return None
    loader = torch.utils.data.DataLoader(dataset, batch_size=count, collate_fn=ImageClassificationCollator())
    return pixel_batch(next(iter(loader)), "cpu")["pixel_values"]


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


def _local_parquet_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.parquet")) if root.is_dir() else ([root] if root.suffix == ".parquet" else [])


def _split_of(path: Path, splits: Sequence[str]) -> Optional[str]:
    parts = [p.lower() for p in path.parts]
    for split in splits:
        if any(part == split or part.startswith(split + "-") or part.startswith(split + "_") for part in parts):
            return split
    return None


def _load_raw(args: DataArguments, split: str, streaming: bool, token: Optional[str] = None):
    """One split of the source as a ``datasets`` (Iterable)Dataset, and its parquet files when it is stored as parquet.

    Returns ``(dataset, files)``; ``files`` is ``None`` for other formats (image folders, tars, the demo).
    """
    import datasets

    if args.dataset == DEMO_DATASET:
        from .demo import load_mnist_demo

        raw = load_mnist_demo()
        if split not in raw:
            raise ConfigurationError(f"eval_split/train_split: '{split}' is not a split of {DEMO_DATASET} (train, test)")
        ds = raw[split]
        return (ds.to_iterable_dataset(num_shards=4) if streaming else ds), None
    root = Path(os.path.expanduser(args.dataset))
    saved = _saved_splits(root)
    if saved is not None:
        if split not in saved:
            raise KeyError(split)
        ds = saved[split]
        return (ds.to_iterable_dataset(num_shards=min(4, max(1, len(ds)))) if streaming else ds), None
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
            check_parquet_files(by_split[split], split)
            ds = datasets.load_dataset("parquet", data_files={split: by_split[split]}, split=split, streaming=streaming)
            return ds, by_split[split]
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), split=split, streaming=streaming)
        return with_unreadable_links(ds, root, split, args), None
    if not streaming:
        return datasets.load_dataset(args.dataset, args.dataset_config, split=split, revision=args.dataset_revision,
                                     token=token), None
    # load_dataset(streaming=True) is these two calls; the builder also knows the parquet files.
    builder = datasets.load_dataset_builder(args.dataset, args.dataset_config, revision=args.dataset_revision, token=token)
    return builder.as_streaming_dataset(split=split), parquet_files_of(builder, split)


#: Folder names ``datasets`` reads as each split of an imagefolder.
_SPLIT_FOLDERS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
                  "test": ("test", "testing", "eval", "evaluation")}


def _unreadable_links(root: Path) -> list[Path]:
    """Image files under ``root`` that are symbolic links to nothing readable (a moved target, a loop, a folder).

    Scanned with ``os.scandir``, whose entries know whether they are links without a ``stat``: only links cost one.
    """
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    extensions = {ext.lower() for ext in ImageFolder.EXTENSIONS}
    found, folders = [], [str(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    if os.path.splitext(entry.name)[1].lower() in extensions and not os.path.isfile(entry.path):
                        found.append(Path(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
    return sorted(found)


def with_unreadable_links(ds, root: Path, split: str, args: DataArguments):
    """``ds`` (an imagefolder split) plus a record for each of its image files that is a link to nothing readable.

    ``datasets`` leaves such files out of the split without a word (they are no files to its listing); as records
    they fail to decode like any damaged image, so they are skipped *and counted* (``skipped_images``, and the
    ``--max_skipped_fraction`` limit) instead of silently shrinking the data.
    """
    import datasets

    links = _unreadable_links(root)
    names = _SPLIT_FOLDERS.get(split, (split,))
    mine = []
    for link in links:
        parts = [part.lower() for part in link.relative_to(root).parts[:-1]]
        in_split = any(part in names for part in parts)
        no_split_folder = not any(part in folders for part in parts for folders in _SPLIT_FOLDERS.values())
        if in_split or (split == "train" and no_split_folder):
            mine.append(link)
    if not mine:
        return ds
    label = (ds.features or {}).get(args.label_column)
    classes = label.names if isinstance(label, datasets.ClassLabel) else None
    rows = {args.image_column: [], args.label_column: []}
    for link in mine:
        if classes is not None and link.parent.name in classes:
            rows[args.image_column].append({"bytes": None, "path": str(link)})
            rows[args.label_column].append(classes.index(link.parent.name))
    logger.warning("%d image file(s) of split '%s' are links to nothing readable (e.g. %s → %s); they are counted as "
                   "skipped images", len(mine), split, mine[0], os.readlink(mine[0]))
    if not rows[args.label_column] or set(ds.features) != set(rows):
        return ds
    extra = datasets.Dataset.from_dict(rows, features=ds.features)
    if isinstance(ds, datasets.IterableDataset):
        extra = extra.to_iterable_dataset()
    return datasets.concatenate_datasets([ds, extra])


def _is_saved(root: Path) -> bool:
    """Whether ``root`` was written by ``save_to_disk`` (a DatasetDict or a Dataset)."""
    return (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()


def _saved_splits(root: Path) -> Optional[dict[str, Any]]:
    """The splits of a folder written by ``save_to_disk``, or ``None`` for any other path.

    A ``DatasetDict`` (``dataset_dict.json``) has named splits; a lone ``Dataset`` (``state.json``) is
    the split it was saved from (``ds.split``), or ``train`` when it was built without one.
    """
    if not _is_saved(root):
        return None
    import datasets

    saved = datasets.load_from_disk(str(root))
    if isinstance(saved, datasets.DatasetDict):
        return dict(saved)
    return {str(saved.split or "train"): saved}


def parquet_files_of(builder, split: str) -> Optional[list[str]]:
    """The data files of ``split`` when ``builder`` reads parquet (Hub datasets stored as parquet, e.g. ImageNet-1k).

    They are the resolved ``hf://datasets/<id>@<commit>/...`` URLs ``datasets`` itself streams.
    """
    from datasets.packaged_modules.parquet.parquet import Parquet

    if not isinstance(builder, Parquet) or not builder.config.data_files:
        return None
    for name, files in builder.config.data_files.items():
        if str(name) == split:
            return [str(f) for f in files] if all(str(f).endswith(".parquet") for f in files) else None
    return None


def _available_splits(args: DataArguments) -> Optional[list[str]]:
    try:
        import datasets

        if args.dataset == DEMO_DATASET:
            return ["train", "test"]
        root = Path(os.path.expanduser(args.dataset))
        saved = _saved_splits(root)
        if saved is not None:
            return list(saved)
        if root.exists() and not _local_parquet_files(root):
            return sorted(p.name for p in root.iterdir() if p.is_dir())
        return list(datasets.get_dataset_split_names(args.dataset, args.dataset_config))
    except Exception:  # noqa: BLE001 - only used to improve an error message
        return None


def _local_imagefolder(args: DataArguments) -> Optional[Path]:
    """The folder of a local imagefolder dataset (not parquet, not save_to_disk), or ``None``."""
    root = Path(os.path.expanduser(args.dataset))
    if args.dataset == DEMO_DATASET or not root.is_dir() or _is_saved(root) or _local_parquet_files(root):
        return None
    return root


def _check_columns(ds, args: DataArguments, split: str) -> None:
    columns = list(ds.column_names or (ds.features or {}).keys())
    for argument, column in (("image_column", args.image_column), ("label_column", args.label_column)):
        if columns and column not in columns:
            folder = _local_imagefolder(args) if argument == "label_column" and column == "label" else None
            layout = imagefolder_layout_problem(folder, split) if folder else None
            if layout:
                raise ConfigurationError(f"label_column: the imagefolder '{args.dataset}' gives no labels: {layout}")
            raise ConfigurationError(
                f"{argument}: column '{column}' is not in dataset '{args.dataset}'; its columns are {columns} "
                f"(pass --{argument} with the right name)"
            )


def open_split(args: DataArguments, split: str, token: Optional[str] = None):
    """One split as a ``datasets`` (Iterable)Dataset with its image column undecoded (for analyses).

    Streamed when ``args.streaming``: nothing is downloaded beyond the records iterated.

    Raises:
        ConfigurationError: unknown dataset or split, missing image/label column.
    """
    import datasets

    raw, _ = _open_checked(args, split, "split", token)
    return raw.cast_column(args.image_column, datasets.Image(decode=False))


def _open_checked(args: DataArguments, split: str, argument: str, token: Optional[str], streaming: Optional[bool] = None):
    """``_load_raw`` of ``split`` (streamed as ``args.streaming`` unless ``streaming`` says) with its columns
    checked; a failure names ``argument`` (an unknown split, listing the splits there are) or the dataset."""
    import datasets

    try:
        raw, files = _load_raw(args, split, args.streaming if streaming is None else streaming, token)
    except ConfigurationError:  # already names what is wrong (a damaged or empty parquet file)
        raise
    except (FileNotFoundError, KeyError, ValueError, datasets.exceptions.DatasetNotFoundError, OSError) as error:
        splits = _available_splits(args)
        if splits is not None and split not in splits:
            raise ConfigurationError(f"{argument}: '{split}' is not a split of '{args.dataset}'; splits: {splits}") from error
        raise ConfigurationError(
            f"dataset: cannot load '{args.dataset}': {first_line(error).rstrip('.')}. Expected a Hub dataset id (set "
            f"HF_TOKEN for gated ones such as ILSVRC/imagenet-1k), a local imagefolder, parquet or save_to_disk folder, "
            f"or '{DEMO_DATASET}'"
        ) from error
    _check_columns(raw, args, split)
    return raw, files


def _class_names(ds, args: DataArguments, split: str) -> dict[int, str]:
    """The split's class names, every label checked once here (:mod:`.label_values`)."""
    id2label = split_class_names(ds, args.label_column, split, args.dataset)
    # Only sub-folders of root/<split> not named as classes are looked into (an imagefolder's empty class
    # folders; parquet and save_to_disk splits hold files): no walk over a large image tree.
    warn_empty_class_folders(Path(os.path.expanduser(args.dataset)), split, id2label)
    return id2label


@dataclass
class RawImageDatasets:
    """The untransformed splits and class names (step one of loading; see :func:`open_image_datasets`)."""

    train: Any  # None in an evaluation-only run
    eval: Any
    id2label: dict[int, str]
    args: DataArguments
    eval_split: Optional[str] = None  # where the eval images come from, e.g. "validation" or "train[held-out 10%]"
    train_files: Optional[list[str]] = None  # the train split's parquet files, when it is stored as parquet


def open_image_datasets(args: DataArguments, seed: int = 0, token: Optional[str] = None, train: bool = True) -> RawImageDatasets:
    """Open the train and eval splits and read the class names, without decoding any image.

    ``train=False`` (an evaluation-only run) opens only the eval split, which must then exist; the class
    names are its own.

    Raises:
        ValueError: unknown dataset or split, missing image/label column, no class names.
    """
    if not train:
        return _open_eval_only(args, token)
    train_raw, train_files = _open_checked(args, args.train_split, "train_split", token)
    id2label = _class_names(train_raw, args, args.train_split)

    eval_raw, eval_split = None, args.eval_split
    if args.eval_split:
        try:
            eval_raw, _ = _load_raw(args, args.eval_split, False, token)
        except ConfigurationError:  # the split exists but is damaged or empty: never fall back silently
            raise
        except (FileNotFoundError, KeyError, ValueError, OSError):  # no such split: a held-out part of train below
            eval_raw = None
        if eval_raw is not None:
            _check_columns(eval_raw, args, args.eval_split)
            check_eval_labels(eval_raw, args.label_column, args.eval_split, len(id2label))
    if eval_raw is None and not args.streaming and args.validation_fraction > 0:
        parts = train_raw.train_test_split(test_size=args.validation_fraction, seed=seed)
        train_raw, eval_raw = parts["train"], parts["test"]
        eval_split = f"{args.train_split}[held-out {args.validation_fraction:.0%}]"
        logger.info("no '%s' split: held out %d training images for evaluation", args.eval_split, len(eval_raw))

    if args.max_train_samples is not None and not args.streaming:  # a stream keeps its first rows (prepare_image_datasets)
        train_raw = train_raw.select(range(min(args.max_train_samples, len(train_raw))))
    if eval_raw is not None and args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(args.max_eval_samples, len(eval_raw))))
    return RawImageDatasets(train_raw, eval_raw, id2label, args, eval_split if eval_raw is not None else None, train_files)


def _open_eval_only(args: DataArguments, token: Optional[str]) -> RawImageDatasets:
    if not args.eval_split:
        raise ConfigurationError("eval_split: an evaluation-only run (--do_train false) needs --eval_split, the split to score")
    eval_raw, _ = _open_checked(args, args.eval_split, "eval_split", token, streaming=False)
    id2label = _class_names(eval_raw, args, args.eval_split)
    if args.max_eval_samples is not None:
        eval_raw = eval_raw.select(range(min(args.max_eval_samples, len(eval_raw))))
    return RawImageDatasets(None, eval_raw, id2label, args, args.eval_split)


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
        train_transform = TensorImagePipeline(args, image_size, train=True)
        eval_transform = TensorImagePipeline(args, image_size, train=False)
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
