"""Worker → device batching of the torchvision backend, and the one entry point the trainer calls.

:func:`collate_prepared` packs the prepared samples of a batch into a :class:`PreparedBatch` (the
encoded JPEGs as one tensor); :func:`pixel_batch` turns it into ``pixel_values`` on the training
device: decoded, upright, cropped, augmented, normalised and (optionally) mixed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..transforms import decode_image, mix_batch, no_image_decoded
from .jpeg import apply_orientation, decode_jpegs, pil_to_tensor, upright_size
from .pipeline import PreparedImage, TorchvisionPipeline

#: The batch key under which the collator hands encoded images to the training process.
ENCODED_IMAGES = "encoded_images"


class PreparedBatch:
    """The images of a batch as the workers prepared them, and what turns them into pixels.

    The encoded JPEGs travel as one uint8 tensor (one shared-memory block out of a worker instead
    of one per image). It has no ``to`` method on purpose: accelerate and the Trainer move tensors
    to the device, and ``decode_jpeg`` wants its input on the CPU whatever the device.
    """

    def __init__(self, pipeline: TorchvisionPipeline, images: Sequence[PreparedImage], seeds: Sequence[int],
                 mixup: Optional[Callable] = None):
        spans, chunks, offset = [], [], 0
        for image in images:
            if image.encoded is not None:
                spans.append((offset, len(image.encoded)))
                chunks.append(image.encoded)
                offset += len(image.encoded)
            else:
                spans.append(None)
        self.data = torch.empty(offset, dtype=torch.uint8)
        view = self.data.numpy()
        for (start, length), chunk in zip((s for s in spans if s is not None), chunks):
            view[start : start + length] = np.frombuffer(chunk, dtype=np.uint8)
        self.spans = spans
        self.pixels = [image.pixels for image in images]
        self.orientations = [image.orientation for image in images]
        self.sizes = [image.size for image in images]
        self.params = [image.params for image in images]
        self.pipeline, self.seeds, self.mixup = pipeline, list(seeds), mixup

    def __len__(self) -> int:
        return len(self.spans)

    def numel(self) -> int:
        """Elements of the pixel batch it becomes (``Trainer.floating_point_ops`` counts them)."""
        return len(self) * 3 * self.pipeline.size * self.pipeline.size

    def decode(self, device: torch.device) -> list[Optional[torch.Tensor]]:
        """Every image upright as ``3×H×W`` uint8 on ``device``; ``None`` where it cannot be decoded."""
        out: list[Optional[torch.Tensor]] = [None] * len(self)
        rows = [i for i, span in enumerate(self.spans) if span is not None]
        encoded = [self.data[self.spans[i][0] : self.spans[i][0] + self.spans[i][1]] for i in rows]
        for row, data, image in zip(rows, encoded, decode_jpegs(encoded, device)):
            stored = upright_size(*self.sizes[row], self.orientations[row])  # swapping the axes undoes itself
            if image is None or tuple(image.shape) != (3, *stored):
                # The PIL decoder decides what the JPEG decoder refused: the PIL backend's pixels, or a skip.
                fallback = decode_image(data.numpy().tobytes())
                out[row] = pil_to_tensor(fallback).to(device) if fallback is not None else None
            else:
                out[row] = apply_orientation(image, self.orientations[row])
        for row, pixels in enumerate(self.pixels):
            if pixels is not None:
                out[row] = pixels.to(device, non_blocking=True)
        return out

    def build(self, device: Any) -> tuple[Optional[torch.Tensor], list[bool]]:
        """``(pixel_values B'×3×S×S float on device, decoded)``: the B' decodable images, in order, transformed.

        ``decoded[i]`` says whether image ``i`` could be decoded; the pixels are ``None`` when none could.
        """
        device = torch.device(device)
        images = self.decode(device)
        decoded = [image is not None for image in images]
        kept = [(image, params) for image, params in zip(images, self.params) if image is not None]
        if not kept:
            return None, decoded
        pipeline = self.pipeline
        batch = torch.stack([pipeline.resize_crop(image, params) for image, params in kept])
        if pipeline.train:
            return pipeline.augment(batch, [params for _, params in kept]), decoded
        return pipeline.normalize(batch), decoded


def collate_prepared(samples: Sequence[Optional[dict[str, Any]]], mixup: Optional[Callable]) -> dict[str, Any]:
    """The collator's batch of prepared samples: ``{ENCODED_IMAGES, "labels", "num_skipped", "num_images"}``.

    Samples a worker could not read or decode are dropped here and counted in ``num_skipped``;
    :func:`pixel_batch` adds those that fail to decode later.
    """
    valid = [s for s in samples if s is not None and s.get("prepared") is not None]
    if not valid:
        raise no_image_decoded(len(samples))
    pipeline = valid[0]["pipeline"]
    if any(s["pipeline"] is not pipeline for s in valid):
        raise ValueError("collate_prepared: a batch mixes samples of different datasets' pipelines")
    images = PreparedBatch(pipeline, [s["prepared"] for s in valid], [s.get("seed", 0) for s in valid], mixup)
    labels = torch.as_tensor([int(s["labels"]) for s in valid], dtype=torch.long)
    return {ENCODED_IMAGES: images, "labels": labels, "num_skipped": len(samples) - len(valid), "num_images": len(samples)}


def pixel_batch(batch: Any, device: Any) -> Any:
    """``batch`` with ``pixel_values`` built on ``device`` when it holds encoded images; any other batch unchanged.

    Undecodable images are dropped with their labels and counted in ``num_skipped`` (as the PIL
    collator counts them); a timm ``Mixup`` is applied after decoding, under an RNG seeded from the
    decoded samples' seeds, exactly as the PIL collator applies it.

    Raises:
        TooManyBadImagesError: no image of the batch could be decoded.
    """
    if not isinstance(batch, Mapping) or ENCODED_IMAGES not in batch:
        return batch
    images: PreparedBatch = batch[ENCODED_IMAGES]
    pixel_values, decoded = images.build(device)
    if pixel_values is None:
        raise no_image_decoded(batch["num_images"])
    keep = torch.tensor(decoded, dtype=torch.bool)
    labels = batch["labels"][keep]
    out = {key: value for key, value in batch.items() if key != ENCODED_IMAGES}
    out["num_skipped"] = int(batch["num_skipped"]) + decoded.count(False)
    if images.mixup is not None:
        seeds = [seed for seed, ok in zip(images.seeds, decoded) if ok]  # as the PIL collator: every decoded sample
        pixel_values, labels = mix_batch(images.mixup, pixel_values, labels, seeds)
    out["pixel_values"], out["labels"] = pixel_values, labels
    return out
