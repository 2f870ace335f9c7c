"""The torchvision backend (``--data_backend torchvision``): decoding and augmentation on the training device.

With the ``pil`` backend a DataLoader worker decodes each image with Pillow and runs timm's
transforms on it: about 258 ImageNet-like JPEGs per second per core (bench/README.md), so the
8,000 images/s targeted for a DeiT-Tiny ← CaiT-S24 step on an H100 would need ~31 decoding cores.
Here the work is split so that workers only read bytes (5,800 images/s per core, measured):

* **Workers** (:meth:`~.pipeline.TorchvisionPipeline.prepare_sample`) read the encoded bytes, parse the header
  (format, size, EXIF orientation; no pixel is decoded) and draw the sample's augmentation from a
  ``torch.Generator`` seeded with the sample's seed (the seed the PIL backend uses, so resume and
  repeated augmentation are unchanged). A plain JPEG stays encoded. Anything else (PNG, GIF, CMYK
  JPEGs, a JPEG without its end marker, remote paths) is decoded right there by the library's one
  decoder (:func:`~..transforms.decode_image`): what is skipped as undecodable is exactly what the
  PIL backend skips, and those files are rare in ImageNet (about 20 CMYK JPEGs).
* **The training process** (:func:`~.batching.pixel_batch`, called by the trainer before ``compute_loss``)
  decodes the batch's JPEGs with ``torchvision.io.decode_jpeg`` on the device
  (one batched nvJPEG call on CUDA, libjpeg-turbo on CPU), applies the EXIF orientation, crops and
  resizes each image, then flips, RandAugments, normalises and erases the whole batch with tensor
  operations grouped by op (one sampling pass for all the affine ops of a slot).

The augmentation is timm's DeiT recipe (RandomResizedCrop, flip, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing in 'pixel' mode); the ten point ops of RandAugment compute
what Pillow computes, to the bit, and the five affine ops Pillow's geometry (tested against timm's
ops). How the backend differs from the PIL pipeline (the random draws, resizing, the affine ops'
interpolation, decoding on CUDA, the erasing noise) is listed in bench/README.md ("Differences from
timm's PIL pipeline").

Modules, by concern: ``jpeg`` (bytes, header, EXIF orientation, ``torchvision.io`` decoding),
``rand_augment`` (the policy and the ops as pure tensor functions), ``params`` (drawing a sample's
augmentation), ``pipeline`` (:class:`TorchvisionPipeline`, the datasets' transform), ``batching``
(worker → device batches, :func:`pixel_batch`).
"""

from .batching import ENCODED_IMAGES, PreparedBatch, collate_prepared, pixel_batch
from .jpeg import apply_orientation, decode_jpegs, jpeg_header, pil_to_tensor, read_bytes, upright_size
from .params import AugmentParams, draw_params, random_resized_crop
from .pipeline import PreparedImage, TorchvisionPipeline
from .rand_augment import (
    AFFINE_OPS,
    POINT_OPS,
    RAND_INCREASING_OPS,
    RandAugmentPolicy,
    apply_op,
    op_values,
    parse_rand_augment,
)

__all__ = [
    "AFFINE_OPS",
    "ENCODED_IMAGES",
    "POINT_OPS",
    "RAND_INCREASING_OPS",
    "AugmentParams",
    "PreparedBatch",
    "PreparedImage",
    "RandAugmentPolicy",
    "TorchvisionPipeline",
    "apply_op",
    "apply_orientation",
    "collate_prepared",
    "decode_jpegs",
    "draw_params",
    "jpeg_header",
    "op_values",
    "parse_rand_augment",
    "pil_to_tensor",
    "pixel_batch",
    "random_resized_crop",
    "read_bytes",
    "upright_size",
]
