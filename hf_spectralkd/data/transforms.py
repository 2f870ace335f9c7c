"""Image decoding, timm transforms and deterministic per-sample randomness.

Augmentation draws from the global Python/NumPy/torch generators (timm and torchvision do); each
sample runs under generators seeded from its own identity (:func:`seeded_rngs`), so what a sample
looks like never depends on worker count, prefetching or where a run was resumed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
from typing import Any, Callable, Iterator, Optional, Sequence

import datasets
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from ..errors import TooManyBadImagesError
from .arguments import IMAGENET_MEAN, IMAGENET_STD, DataArguments

logger = logging.getLogger(__name__)
#: The one decoder of every image the library reads (training, evaluation, analysis).
_RGB_DECODER = datasets.Image(mode="RGB")


def build_train_transform(args: DataArguments, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """timm DeiT training transform: PIL RGB image → ``3×S×S`` float tensor."""
    from timm.data import create_transform

    auto_augment = None if (args.auto_augment or "none").lower() == "none" else args.auto_augment
    transform = create_transform(
        input_size=image_size,
        is_training=True,
        scale=(args.scale_min, 1.0),
        hflip=args.hflip,
        auto_augment=auto_augment,
        color_jitter=0.0 if auto_augment is None else 0.4,  # timm ignores jitter when a policy is set
        interpolation=args.resize_interpolation,
        re_prob=args.reprob,
        re_mode="pixel",
        re_count=1,
        mean=tuple(args.image_mean or IMAGENET_MEAN),
        std=tuple(args.image_std or IMAGENET_STD),
    )
    return _with_pillow13_posterize(transform)


def _posterize_keeping_zero_bits(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, defined for 0 bits as well (a black image, as Pillow < 13 produced)."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _with_pillow13_posterize(transform: Callable) -> Callable:
    """Make timm's RandAugment safe with Pillow >= 13.

    ``rand-m9-mstd0.5-inc1`` draws magnitudes up to 10, where timm's increasing posterize keeps
    ``4 - int(10/10·4) = 0`` bits; Pillow 13 rejects 0 bits with a ValueError that would stop
    training at a random step. The op is swapped, in this transform only, for one that keeps the old
    result (a black image).
    """
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_keeping_zero_bits
    return transform


def build_eval_transform(args: DataArguments, image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to ``S / crop_pct`` and center-crop ``S`` (224 ← 256 by default)."""
    from timm.data import create_transform

    return create_transform(
        input_size=image_size,
        is_training=False,
        interpolation=args.resize_interpolation,
        crop_pct=args.crop_pct,
        mean=tuple(args.image_mean or IMAGENET_MEAN),
        std=tuple(args.image_std or IMAGENET_STD),
    )


def build_mixup(args: DataArguments, num_classes: int, label_smoothing: float):
    """timm ``Mixup`` when mixup or cutmix is on, else ``None``. Its targets already hold the smoothing."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=label_smoothing, num_classes=num_classes)


def build_image_processor(args: DataArguments, image_size: int):
    """The image processor saved with the student, matching :func:`build_eval_transform`.

    With a center crop (``eval_crop_pct < 1``) this is ``ConvNextImageProcessor``'s shortest-edge
    resize to ``S / crop_pct`` then an ``S×S`` crop, as timm evaluates; without one, a plain
    ``S×S`` resize. Either way ``pipeline("image-classification", model=student_dir)`` preprocesses
    images as evaluation did.
    """
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    resample = getattr(Image.Resampling, args.resize_interpolation.upper(), Image.Resampling.BICUBIC)
    mean, std = list(args.image_mean or IMAGENET_MEAN), list(args.image_std or IMAGENET_STD)
    if args.crop_pct < 1.0 and image_size < 384:
        return ConvNextImageProcessor(
            size={"shortest_edge": image_size}, crop_pct=args.crop_pct, resample=resample, image_mean=mean, image_std=std
        )
    return ViTImageProcessor(size={"height": image_size, "width": image_size}, resample=resample, image_mean=mean, image_std=std)


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


def upright_rgb(image: Image.Image) -> Image.Image:
    """The EXIF orientation applied, then RGB: what ``datasets.Image(mode="RGB")`` and ``load_image`` do to a PIL image."""
    if image.getexif().get(ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


class _TokenForAnyRepository(dict):
    """``token_per_repo_id`` for ``datasets``' decoder: one token for every Hub repository."""

    def __init__(self, token: str):
        super().__init__()
        self.token = token

    def get(self, key, default=None):
        return self.token


def decode_image(value: Any, token: Optional[str] = None) -> Optional[Image.Image]:
    """An upright RGB PIL image, decoded exactly as ``datasets.Image(mode="RGB").decode_example`` decodes.

    ``value`` is a ``datasets.Image(decode=False)`` value (``{"bytes", "path"}``), a path or URL
    (local, ``hf://``, ``https://``; Hub files are read with ``token``, by default ``HF_TOKEN`` or
    the cached login), bytes, or a PIL image. The EXIF orientation is applied and the image
    converted to RGB, as transformers' ``load_image`` does in ``pipeline()``, so training,
    evaluation, analysis and inference see the same pixels.

    Returns ``None`` when the image cannot be decoded (truncated, not an image, missing file).
    """
    try:
        if isinstance(value, Image.Image):
            return upright_rgb(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = {"bytes": bytes(value), "path": None}
        elif isinstance(value, (str, os.PathLike)):
            value = {"bytes": None, "path": os.fspath(value)}
        return _RGB_DECODER.decode_example(value, token_per_repo_id=_TokenForAnyRepository(token) if token else None)
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this image"
        logger.debug("skipping undecodable image: %s", error)
        return None


def transform_row(image_value: Any, label: Any, transform: Callable, seed: int) -> dict[str, Any]:
    """Decode and augment one record under RNGs seeded with ``seed``; ``pixel_values`` is ``None`` if undecodable.

    A :class:`~.torchvision_backend.TorchvisionPipeline` (``--data_backend torchvision``) only prepares
    the record here: the training process decodes and augments it.
    """
    prepare = getattr(transform, "prepare_sample", None)
    if prepare is not None:
        return prepare(image_value, label, seed)
    image = decode_image(image_value)
    if image is None:
        return {"pixel_values": None, "labels": label, "seed": seed}
    with seeded_rngs(seed):
        pixel_values = transform(image)
    return {"pixel_values": pixel_values, "labels": label, "seed": seed}


def mix_batch(mixup: Callable, pixel_values: torch.Tensor, labels: torch.Tensor, seeds: Sequence[int]):
    """timm's ``Mixup`` of a batch under RNGs seeded from all its samples' ``seeds``: ``(pixel_values, B×K labels)``.

    An odd batch loses its last image first (timm pairs images by flipping the batch and needs an even size);
    the seed still comes from every sample, so both backends mix a batch alike.
    """
    if len(labels) % 2:
        pixel_values, labels = pixel_values[:-1], labels[:-1]
    with seeded_rngs(sample_seed(*seeds)):
        return mixup(pixel_values, labels.to(pixel_values.device))


def no_image_decoded(count: int) -> TooManyBadImagesError:
    """The error for a batch of ``count`` samples none of which could be decoded."""
    return TooManyBadImagesError(
        f"image_column: every image of a batch of {count} failed to decode; check that the dataset's "
        "image column holds images (--image_column)"
    )
