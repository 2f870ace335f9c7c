"""Data: image-classification datasets → ``{"pixel_values", "labels"}`` batches.

Sources (:func:`load_image_datasets`): a Hub dataset (``ILSVRC/imagenet-1k``, streamed or not), a
local ``imagefolder`` (``root/<split>/<class>/*.jpg``), local parquet files, or the built-in offline
``demo:mnist5k`` digits. Column names are configurable.

Transforms are timm's: DeiT training augmentation (RandomResizedCrop, flip, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25, bicubic) and resize + center-crop evaluation. Mixup /
CutMix (timm ``Mixup``) are optional and produce soft targets.

Properties the trainer relies on:

* **One decoder, and undecodable images are skipped, not fatal.** Images are decoded here (the
  column is read with ``decode=False``) by ``datasets.Image(mode="RGB")``'s decoder, EXIF orientation
  applied as ``pipeline()`` does; a failure yields an empty sample that the collator drops and counts
  (``num_skipped`` and ``num_images`` in the batch; the trainer logs ``skipped_images`` and
  ``eval_skipped_images`` and stops above ``max_skipped_fraction``).
* **Augmentation is a pure function of (seed, sample identity).** Each sample is augmented under
  RNGs seeded from ``(seed, epoch, index[, copy])`` (map-style) or ``(seed, pass, shard, row, copy)``
  (streaming), never from the process-global RNG state. A resumed run, any worker count and any
  prefetching therefore see exactly the same augmented images as an uninterrupted run.
* **Streams mix, resume and repeat by arithmetic** (:mod:`.streaming`): every pass permutes the row
  groups of all shards, each reader draws from all of them, and a resume reads one window, whatever
  the pass. Repeated augmentation (``repeated_augmentation``) works for both kinds of data.

``data_backend="torchvision"`` (the torchvision backend, :mod:`.torchvision_backend`) moves decoding and
augmentation out of the workers into the training process, on its device: workers hand over encoded
JPEGs and each sample's drawn augmentation, and :func:`pixel_batch` (called by the trainer) builds
``pixel_values``.

Modules: ``arguments`` (options), ``transforms`` (decoding, timm transforms, seeding, mixing a batch),
``splits`` (opening and checking splits), ``label_values`` (label checks), ``loading`` (transforms
attached: map-style wrapper, stream), ``collation`` (the collator), ``skipped`` (when skipped images are
too many), ``shards`` (reading raw records by shard and row), ``streaming`` (the resumable stream and
all resume logic of the data), ``sampling`` (repeated augmentation), ``torchvision_backend`` (the
torchvision backend), ``demo`` (the offline digits).
"""

from .arguments import (
    DEMO_DATASET,
    IMAGENET_MEAN,
    IMAGENET_STD,
    KNOWN_TRAIN_SIZES,
    DataArguments,
)
from .collation import ImageClassificationCollator, first_images
from .loading import ImageDatasets, TransformedImageDataset, load_image_datasets, prepare_image_datasets
from .sampling import RepeatedAugmentationSampler
from .shards import IterableDatasetShards, ParquetShards, ShardLayout
from .skipped import share_above
from .splits import RawImageDatasets, open_image_datasets
from .streaming import DatasetEpochCallback, ResumableImageStream, steps_for_epochs
from .torchvision_backend import ENCODED_IMAGES, TorchvisionPipeline, pixel_batch
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
    "ENCODED_IMAGES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_TRAIN_SIZES",
    "DataArguments",
    "DatasetEpochCallback",
    "ImageClassificationCollator",
    "ImageDatasets",
    "IterableDatasetShards",
    "ParquetShards",
    "RawImageDatasets",
    "RepeatedAugmentationSampler",
    "ResumableImageStream",
    "ShardLayout",
    "TorchvisionPipeline",
    "TransformedImageDataset",
    "build_eval_transform",
    "build_image_processor",
    "build_mixup",
    "build_train_transform",
    "decode_image",
    "first_images",
    "load_image_datasets",
    "open_image_datasets",
    "pixel_batch",
    "prepare_image_datasets",
    "sample_seed",
    "seeded_rngs",
    "share_above",
    "steps_for_epochs",
]
