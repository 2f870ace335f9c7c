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
* **Streams resume exactly and cheaply** (:mod:`.streaming`): a streamed split is an endless
  sequence of reshuffled passes, and the batches a resumed run skips are read but not decoded.

Modules: ``arguments`` (options), ``transforms`` (decoding, timm transforms, seeding), ``sources``
(opening datasets, map-style wrapper, collator), ``streaming``, ``demo`` (the offline digits).
"""

from .arguments import (
    DEMO_DATASET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN_TRAIN_SIZES,
    DataArguments,
)
from .sources import (
    DatasetEpochCallback,
    ImageClassificationCollator,
    ImageDatasets,
    RawImageDatasets,
    TransformedImageDataset,
    first_images,
    load_image_datasets,
    open_image_datasets,
    prepare_image_datasets,
    steps_for_epochs,
)
from .streaming import ResumableImageStream
from .transforms import (
    build_eval_transform,
    build_image_processor,
    build_mixup,
    build_train_transform,
    decode_image,
    sample_seed,
    seeded_rngs,
)

__all__ = [
    "DEMO_DATASET",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_TRAIN_SIZES",
    "DataArguments",
    "DatasetEpochCallback",
    "ImageClassificationCollator",
    "ImageDatasets",
    "RawImageDatasets",
    "ResumableImageStream",
    "TransformedImageDataset",
    "build_eval_transform",
    "build_image_processor",
    "build_mixup",
    "build_train_transform",
    "decode_image",
    "first_images",
    "load_image_datasets",
    "open_image_datasets",
    "prepare_image_datasets",
    "sample_seed",
    "seeded_rngs",
    "steps_for_epochs",
]
