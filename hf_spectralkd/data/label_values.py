"""The label values of a split: its class names, and one check of every label when the split is opened.

Unchecked, a wrong label fails deep inside training (``IndexError: Target 999 is out of bounds`` in
the loss, ``-1`` from an unlabelled test split) or not at all: a stray ``999`` among labels 0..9
builds a 1,000-class student, ``1.5`` becomes class 1. A map-style split is read column-only (the
labels, never the images) once when it is opened: 0.04 s for ImageNet's 1,281,167 integer labels (0.01 s
as a ClassLabel) on one CPU core. A stream cannot be read ahead, so only the type of its label column is
checked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

#: Rows a message names before "and N more".
SHOWN_ROWS = 5


def _where(column: str, split: str) -> str:
    return f"label_column: '{column}' of split '{split}'"


def _rows(mask: np.ndarray, values: Optional[np.ndarray] = None) -> str:
    """``row 3: 999, row 8: -1 and 4 more`` for the rows where ``mask`` is set."""
    rows = np.flatnonzero(mask)
    shown = ", ".join(f"row {r}" + ("" if values is None else f": {values[r]:g}") for r in rows[:SHOWN_ROWS])
    return shown + (f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else "")


def label_values(ds, column: str, split: str) -> np.ndarray:
    """Every label of a map-style split as ``int64`` (N,), after refusing missing, text and fractional labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    labels = ds.with_format("arrow")[column]  # only this column is read
    kind, where = labels.type, _where(column, split)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        examples = ", ".join(repr(v) for v in pc.unique(labels).to_pylist()[:3])
        raise ConfigurationError(
            f"{where} holds text ({examples}, ...), not class ids; encode it first, e.g. "
            f"ds = ds.class_encode_column('{column}') (ids follow the sorted names), and save that dataset"
        )
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind)):
        raise ConfigurationError(f"{where} holds {kind} values, not integer class ids")
    missing = pc.is_null(labels, nan_is_null=True).to_numpy(zero_copy_only=False)
    if missing.any():
        raise ConfigurationError(
            f"{where} has no label in {int(missing.sum())} of {len(missing)} rows ({_rows(missing)}); give those "
            "images their class id or drop them (ds.filter)"
        )
    values = labels.to_numpy()
    if pa.types.is_floating(kind):
        fractional = values != np.floor(values)
        if fractional.any():
            raise ConfigurationError(
                f"{where} holds class ids that are not whole numbers ({_rows(fractional, values)}); class ids are 0..K-1"
            )
    return values.astype(np.int64)


def check_range(values: np.ndarray, num_classes: int, column: str, split: str, what: str) -> None:
    """Refuse labels outside ``0..num_classes-1``, naming the rows; ``what`` says where the classes come from."""
    bad = (values < 0) | (values >= num_classes)
    if not bad.any():
        return
    hint = " (-1 marks an unlabelled image in datasets, as in test splits)" if (values[bad] == -1).any() else ""
    raise ConfigurationError(
        f"{_where(column, split)} has {int(bad.sum())} label(s) outside the {num_classes} classes 0..{num_classes - 1} "
        f"of {what}: {_rows(bad, values)}{hint}; fix or drop those rows, or choose a labelled split"
    )


def split_class_names(ds, column: str, split: str, dataset: str) -> dict[int, str]:
    """The class names of the training split ``ds``, its labels checked (all of them when it is map-style).

    A ``ClassLabel`` names the classes; plain integers make classes ``0..max``, refused when more of those
    would have no image than have one (one stray large id, not a real class count). A class without a
    training image is a warning naming it.
    """
    import datasets

    feature = (ds.features or {}).get(column)
    if not isinstance(ds, datasets.Dataset):
        if isinstance(feature, datasets.ClassLabel):
            return dict(enumerate(feature.names))
        raise ConfigurationError(
            f"label_column: '{column}' of the streamed dataset '{dataset}' has no class names "
            "(not a ClassLabel); stream a dataset whose label column is a ClassLabel, or load it without --streaming"
        )
    values = label_values(ds, column, split)
    if isinstance(feature, datasets.ClassLabel):
        id2label = dict(enumerate(feature.names))
        check_range(values, len(id2label), column, split, "its ClassLabel")
    else:
        check_range(values, max(int(values.max(initial=0)) + 1, 1), column, split, "the split")  # negative ids
        present = np.unique(values)
        num_classes = int(values.max(initial=0)) + 1
        # Without names every id up to the largest is a class; more empty ids than used ones is a stray label
        # (999 among 0..9 would build a 1,000-class student), not a dataset that lacks most of its classes.
        if num_classes - len(present) > len(present):
            stray = values >= len(present)
            raise ConfigurationError(
                f"{_where(column, split)} has integer labels without class names: ids up to {num_classes - 1} make a "
                f"{num_classes}-class student, but only {len(present)} ids occur; stray labels? {_rows(stray, values)}. "
                "Fix those rows, or make the column a ClassLabel that names the classes"
            )
        id2label = {i: str(i) for i in range(num_classes)}
    counts = np.bincount(values, minlength=len(id2label))
    empty = [f"'{id2label[i]}'" for i in np.flatnonzero(counts == 0)]
    if empty:
        logger.warning("%d class(es) have no image in split '%s': %s%s; the student will not learn them", len(empty),
                       split, ", ".join(empty[:10]), " ..." if len(empty) > 10 else "")
    return id2label


def check_eval_labels(ds, column: str, split: str, num_classes: int) -> None:
    """The labels of an evaluation split (map-style): present, whole and within the trained classes."""
    import datasets

    if isinstance(ds, datasets.Dataset):
        check_range(label_values(ds, column, split), num_classes, column, split, "the training split")


# ------------------------------------------------------------------------------------------------
# Local image folders: datasets' imagefolder labels images only in its one layout
# ------------------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list[Path]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    suffixes = set(ImageFolder.EXTENSIONS)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def imagefolder_layout_problem(root: Path, split: str) -> Optional[str]:
    """Why datasets' imagefolder gave ``root`` no label column, or ``None`` when the layout is not the cause.

    It labels images only when every one sits exactly one folder below the split (``root/<split>/<class>/x.jpg``)
    and there are at least two class folders.
    """
    folder = root / split if (root / split).is_dir() else root
    files = _image_files(folder)
    misplaced = [p for p in files if len(p.relative_to(folder).parts) != 2]
    if misplaced:
        return (f"'{misplaced[0].relative_to(root)}' is not directly inside a class folder of '{folder.name}' (an "
                f"imagefolder is root/<split>/<class>/<image>, every image at that depth, or datasets labels none); "
                "move such images into their class folder")
    classes = sorted({p.parent.name for p in files})
    if len(classes) == 1:
        return (f"'{folder.name}' has a single class folder ('{classes[0]}'), and datasets' imagefolder labels images "
                "only when there are at least two")
    return None


def warn_empty_class_folders(root: Path, split: str, id2label: dict[int, Any]) -> None:
    """A class folder of ``root/split`` without any image is no class at all for datasets: say so."""
    folder = root / split
    if not folder.is_dir():
        return
    names = set(map(str, id2label.values()))
    empty = [d.name for d in sorted(folder.iterdir()) if d.is_dir() and d.name not in names and not _image_files(d)]
    if empty:
        logger.warning("class folder(s) %s of '%s' hold no image: the student will not learn %s", empty, folder,
                       "that class" if len(empty) == 1 else "those classes")
