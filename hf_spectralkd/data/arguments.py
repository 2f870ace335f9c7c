"""Command-line / config options of the data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

from ..errors import ConfigurationError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEMO_DATASET = "demo:mnist5k"
#: Where images are decoded and augmented (``--data_backend``).
DataBackend = Literal["pil", "torchvision"]
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
    shuffle_buffer_size: int = field(
        default=10_000,
        metadata={
            "help": "Records per shuffle window of a streamed train split: each DataLoader worker reads a window's "
            "row groups (drawn from all shards) and emits them in a random order; it holds up to two windows."
        },
    )
    repeated_augmentation: int = field(
        default=1,
        metadata={
            "help": "Repeated augmentation (DeiT's RASampler): each image is used this many times at nearby positions, "
            "each copy augmented differently; an epoch still counts len(train) samples (so about len/N distinct "
            "images). 1 disables; 3 in the paper configs."
        },
    )
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the train split (debugging)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the eval split."})
    image_size: Optional[int] = field(
        default=None, metadata={"help": "Input resolution; defaults to the student's configured image size."}
    )
    eval_crop_pct: Optional[float] = field(
        default=None,
        metadata={"help": "Center-crop fraction at evaluation. Default: a pretrained student's own (its saved image "
                  "processor), else 0.875 (224 from 256)."},
    )
    interpolation: Optional[str] = field(
        default=None,
        metadata={"help": "Resize interpolation (bicubic, bilinear, ...). Default: a pretrained student's own, else bicubic."},
    )
    auto_augment: Optional[str] = field(
        default="rand-m9-mstd0.5-inc1",
        metadata={"help": "timm auto-augment policy ('none' to disable); with one, colour jitter is off as in DeiT."},
    )
    hflip: float = field(default=0.5, metadata={"help": "Horizontal flip probability in training."})
    scale_min: float = field(default=0.08, metadata={"help": "Lower bound of RandomResizedCrop's area scale."})
    reprob: float = field(default=0.25, metadata={"help": "Random erasing probability ('pixel' mode, one box)."})
    mixup: float = field(default=0.0, metadata={"help": "Mixup alpha; > 0 enables mixup (soft targets). Off in the paper."})
    cutmix: float = field(default=0.0, metadata={"help": "CutMix alpha; > 0 enables CutMix (soft targets). Off in the paper."})
    image_mean: Optional[list[float]] = field(
        default=None,
        metadata={"help": "Normalisation mean of the student's batches. Default: a pretrained student's own (its saved "
                  "image processor), else ImageNet's. The teacher's batches are re-normalised for the teacher."},
    )
    image_std: Optional[list[float]] = field(
        default=None, metadata={"help": "Normalisation std of the student's batches (default: as --image_mean)."}
    )
    data_backend: DataBackend = field(
        default="pil",
        metadata={
            "help": "Where images are decoded and augmented. 'pil': in the DataLoader workers, with Pillow and timm's "
            "transforms (about 250 images/s per core). 'torchvision': workers only read the bytes; the training "
            "process decodes JPEGs with torchvision.io.decode_jpeg on its device (nvJPEG on a GPU) and augments "
            "the batch with tensor ops (bench/README.md lists how it differs from timm's)."
        },
    )

    def __post_init__(self) -> None:
        if self.data_backend not in get_args(DataBackend):
            raise ConfigurationError(
                f"data_backend: expected one of {', '.join(get_args(DataBackend))}, got {self.data_backend!r}"
            )
        for name in ("repeated_augmentation", "shuffle_buffer_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{name}: expected a positive integer, got {value!r}")
        # Unset (None) means the whole split, or the student's own size; 0 would empty a split or the images.
        for name, what in (("max_train_samples", "images"), ("max_eval_samples", "images"), ("train_samples", "images"),
                           ("image_size", "pixels")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name}: expected a positive number of {what} (or leave it unset), got {value!r}")

    @property
    def crop_pct(self) -> float:
        return 0.875 if self.eval_crop_pct is None else self.eval_crop_pct

    @property
    def resize_interpolation(self) -> str:
        return self.interpolation or "bicubic"
