"""Collation: samples → ``{"pixel_values", "labels", "num_skipped", "num_images"}`` batches, for both backends.

Undecodable samples are dropped and counted here; :func:`~.skipped.share_above` judges the counts.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .torchvision_backend import collate_prepared, pixel_batch
from .transforms import mix_batch, no_image_decoded


class ImageClassificationCollator:
    """Stack samples into ``{"pixel_values": B×3×S×S, "labels": B (or B×K), "num_skipped", "num_images"}``.

    Samples whose image failed to decode (``pixel_values is None``) are dropped and counted in
    ``num_skipped``; ``num_images`` is the number of samples the batch was made from, decodable or
    not (the trainer's denominators). With a timm ``Mixup``, the batch is mixed under an RNG seeded
    from its samples' seeds and ``labels`` become ``B×K`` soft targets; an odd batch loses its last
    image first (timm pairs images by flipping the batch), which is not counted as skipped.

    Prepared samples (``--data_backend torchvision``) become ``{"encoded_images", "labels",
    "num_skipped", "num_images"}`` instead: the encoded images are decoded, augmented (and mixed) in
    the training process by :func:`~.torchvision_backend.pixel_batch`.
    """

    def __init__(self, mixup: Optional[Callable] = None):
        self.mixup = mixup

    def __call__(self, samples: Sequence[Optional[dict[str, Any]]]) -> dict[str, Any]:
        if any(s is not None and "prepared" in s for s in samples):
            return collate_prepared(samples, self.mixup)
        valid = [s for s in samples if s is not None and s.get("pixel_values") is not None]
        skipped = len(samples) - len(valid)
        if not valid:
            raise no_image_decoded(len(samples))
        pixel_values = torch.stack([torch.as_tensor(s["pixel_values"]) for s in valid])
        labels = torch.as_tensor([int(s["labels"]) for s in valid], dtype=torch.long)
        if self.mixup is not None:
            pixel_values, labels = mix_batch(self.mixup, pixel_values, labels, [s.get("seed", 0) for s in valid])
        return {"pixel_values": pixel_values, "labels": labels, "num_skipped": skipped, "num_images": len(samples)}


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
