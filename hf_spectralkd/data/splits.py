"""Opening a split: Hub ids, local imagefolder, parquet and ``save_to_disk`` folders, and the offline demo digits.

:func:`open_image_datasets` opens the train and eval splits (or only the eval split) undecoded, checks
their columns, parquet files and label values (:mod:`.label_values`) and reads the class names: every
bad input is a one-line :class:`~..errors.ConfigurationError` before any image is decoded.
:func:`open_split` opens one split for analyses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ConfigurationError
from ..io.integrity import first_line
from .arguments import DEMO_DATASET, DataArguments
from .label_values import check_eval_labels, imagefolder_layout_problem, split_class_names, warn_empty_class_folders
from .shards import check_parquet_files

logger = logging.getLogger(__name__)


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
