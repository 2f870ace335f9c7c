"""Images for analysis: a folder of image files or a ``datasets`` split, sampled and preprocessed."""

from __future__ import annotations

import logging
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from ..data import DataArguments, decode_image
from ..data.splits import open_split
from ..errors import ConfigurationError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def balanced_order(labels: Sequence[int]) -> list[int]:
    """Indices visiting classes round-robin (each class in its original order): class-balanced prefixes."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    queues = [by_class[label] for label in sorted(by_class)]
    order, depth = [], 0
    while len(order) < len(labels):
        for queue in queues:
            if depth < len(queue):
                order.append(queue[depth])
        depth += 1
    return order


def _is_plain_image_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())


def images_from_folder(root: Path, num_images: int, sample: str) -> tuple[list[Image.Image], list[str]]:
    """Image files under ``root`` (any nesting), sorted; ``balanced`` rotates over sub-folders.

    A folder with ``train``/``validation``/``test`` sub-folders is read as an imagefolder dataset instead.
    """
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if sample == "balanced":
        groups = [str(f.parent.relative_to(root)) for f in files]
        names = sorted(set(groups))
        files = [files[i] for i in balanced_order([names.index(g) for g in groups])]
    return decode_first(((str(file.relative_to(root)), str(file)) for file in files), num_images, f"in {root}")


#: With --sample balanced on a stream, the labels of this many rows per wanted image are looked at.
BALANCED_LOOKAHEAD = 20


def images_from_dataset(args: DataArguments, split: str, num_images: int, sample: str) -> tuple[list[Image.Image], list[str]]:
    """Images of one split of a Hub/local dataset (``balanced``: round-robin over labels).

    A stream is read only as far as needed: ``first`` stops at the ``num_images``-th decodable image,
    ``balanced`` reads ``20 × num_images`` records (undecoded) to choose among. Only the chosen
    images are decoded.
    """
    raw = open_split(args, split)
    if args.streaming:
        if sample == "first":
            candidates = ((index, row[args.image_column]) for index, row in enumerate(raw))
        else:
            wanted = num_images * BALANCED_LOOKAHEAD
            rows = list(tqdm(islice(raw, wanted), total=wanted, desc="reading labels", unit="record", leave=False))
            order = balanced_order([row[args.label_column] for row in rows])
            candidates = ((index, rows[index][args.image_column]) for index in order)
    else:
        order = balanced_order(raw[args.label_column]) if sample == "balanced" else range(len(raw))
        candidates = ((index, raw[index][args.image_column]) for index in list(order)[: num_images * 2])
    return decode_first(((f"{split}[{index}]", value) for index, value in candidates), num_images, f"of {args.dataset}")


def decode_first(candidates: Iterable[tuple[str, Any]], num_images: int, where: str) -> tuple[list[Image.Image], list[str]]:
    """The first ``num_images`` candidates ``(identifier, path or image value)`` that decode, and their identifiers.

    Undecodable ones are skipped with a warning. A progress bar counts the decoded images: a streamed Hub
    dataset is read (and a balanced sample decoded) record by record, which can take minutes.
    """
    images, used = [], []
    with tqdm(total=num_images, desc="reading images", unit="image", leave=False) as bar:
        for identifier, value in candidates:
            image = decode_image(value)
            if image is None:
                logger.warning("skipping undecodable image %s %s", identifier, where)
                continue
            images.append(image)
            used.append(identifier)
            bar.update()
            if len(images) == num_images:
                break
    return images, used


def is_hub_id(dataset: str) -> bool:
    """Not a local path nor the demo: a dataset on the Hub, which analyses stream."""
    return not Path(dataset).expanduser().exists() and not dataset.startswith("demo:")


def load_images(
    dataset: str, split: str, num_images: int, sample: str = "balanced", image_column: str = "image",
    label_column: str = "label", streaming: bool = False,
) -> tuple[list[Image.Image], list[str]]:
    """``num_images`` RGB images and their identifiers from a folder or a dataset (Hub ids are always streamed)."""
    if num_images <= 0:
        raise ConfigurationError(f"num_images: must be positive, got {num_images}")
    if sample not in ("balanced", "first"):
        raise ConfigurationError(f"sample: expected 'balanced' or 'first', got {sample!r}")
    root = Path(dataset).expanduser()
    has_splits = root.is_dir() and any((root / name).is_dir() for name in (split, "train", "validation", "test"))
    if root.exists() and not has_splits and _is_plain_image_folder(root) and not any(root.rglob("*.parquet")):
        images, used = images_from_folder(root, num_images, sample)
    else:
        data_args = DataArguments(dataset=dataset, image_column=image_column, label_column=label_column,
                                  streaming=streaming or is_hub_id(dataset))
        images, used = images_from_dataset(data_args, split, num_images, sample)
    if not images:
        raise ConfigurationError(f"dataset: no decodable image found in '{dataset}'")
    return images, used


def preprocess(images: list[Image.Image], model: nn.Module, model_path: Optional[str], revision: Optional[str] = None) -> torch.Tensor:
    """``N×3×H×W`` pixel values with the model's own image processor, or a timm evaluation transform.

    A processor saved with the model (as run_distill.py does) is preferred because it holds the
    normalisation the model was trained with.
    """
    from transformers import AutoImageProcessor

    if model_path:
        try:
            processor = AutoImageProcessor.from_pretrained(model_path, revision=revision)
            return processor(images=images, return_tensors="pt")["pixel_values"]
        except (OSError, ValueError, KeyError) as error:
            logger.info("no image processor with %s (%s); using ImageNet evaluation preprocessing", model_path, error)
    from ..data import build_eval_transform
    from ..features import describe_taps

    size = describe_taps(model).image_size[0]
    transform = build_eval_transform(DataArguments(), size)
    return torch.stack([transform(image) for image in images])
