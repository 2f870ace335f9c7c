"""The torchvision backend's dataset transform: :class:`TorchvisionPipeline`, run on both sides of the DataLoader.

In a worker it prepares each record (:meth:`TorchvisionPipeline.prepare`: bytes, header, drawn
augmentation); in the training process :class:`~.batching.PreparedBatch` calls its tensor stages
(:meth:`~TorchvisionPipeline.resize_crop`, :meth:`~TorchvisionPipeline.augment`,
:meth:`~TorchvisionPipeline.normalize`) on the decoded batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ...errors import ConfigurationError
from ..arguments import IMAGENET_MEAN, IMAGENET_STD, DataArguments
from ..transforms import decode_image
from .jpeg import jpeg_header, pil_to_tensor, read_bytes, upright_size
from .params import AugmentParams, draw_params
from .rand_augment import AFFINE_OPS, RAND_INCREASING_OPS, apply_op, parse_rand_augment, to_device

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclass
class PreparedImage:
    """One sample as a worker leaves it.

    Exactly one of ``encoded`` (a JPEG the training process decodes, then turns by ``orientation``)
    and ``pixels`` (``3×H×W`` uint8, upright: decoded in the worker) is set. ``size`` is the upright
    ``(H, W)``; ``params`` the augmentation drawn for it (``None`` in eval mode).
    """

    encoded: Optional[bytes]
    pixels: Optional[torch.Tensor]
    orientation: int
    size: tuple[int, int]
    params: Optional[AugmentParams] = None


class TorchvisionPipeline:
    """timm's DeiT training transform (``train=True``) or evaluation transform as batched tensor ops.

    It is the "transform" of a dataset: :func:`~..transforms.transform_row` hands it each record
    (:meth:`prepare_sample`, in a worker), the collator packs the prepared samples into a
    :class:`~.batching.PreparedBatch`, and :func:`~.batching.pixel_batch` turns that into
    ``pixel_values`` on a device.

    Raises:
        ConfigurationError: an interpolation or auto-augment policy this backend does not implement.
    """

    def __init__(self, args: DataArguments, image_size: int, train: bool):
        interpolation = args.resize_interpolation.lower()
        if interpolation not in _INTERPOLATIONS:
            raise ConfigurationError(
                f"interpolation: '{args.resize_interpolation}' is not available with --data_backend torchvision; "
                f"expected one of {', '.join(_INTERPOLATIONS)}"
            )
        self.policy = parse_rand_augment(args.auto_augment)
        self.train, self.size, self.interpolation = bool(train), int(image_size), interpolation
        self.crop_pct, self.scale_min, self.hflip, self.reprob = args.crop_pct, args.scale_min, args.hflip, args.reprob
        self.mean = tuple(float(v) for v in (args.image_mean or IMAGENET_MEAN))
        self.std = tuple(float(v) for v in (args.image_std or IMAGENET_STD))
        # timm fills the area an affine op uncovers with the normalisation mean in 8 bits.
        self.fill = tuple(min(255, round(255 * v)) for v in self.mean)

    # --- worker side ---
    def prepare_sample(self, value: Any, label: Any, seed: int) -> dict[str, Any]:
        """``{"prepared": PreparedImage or None (undecodable), "labels", "seed", "pipeline"}`` of one record."""
        return {"prepared": self.prepare(value, seed), "labels": label, "seed": seed, "pipeline": self}

    def prepare(self, value: Any, seed: int) -> Optional[PreparedImage]:
        data = read_bytes(value)
        header = jpeg_header(data) if data is not None else None
        if header is not None:
            height, width, orientation = header
            prepared = PreparedImage(data, None, orientation, upright_size(height, width, orientation))
        else:
            image = decode_image(data if data is not None else value)
            if image is None:
                return None
            pixels = pil_to_tensor(image)
            prepared = PreparedImage(None, pixels, 1, (pixels.shape[1], pixels.shape[2]))
        if self.train:
            prepared.params = self.draw(seed, *prepared.size)
        return prepared

    def draw(self, seed: int, height: int, width: int) -> AugmentParams:
        """The training augmentation of a ``height×width`` image, a pure function of ``seed``."""
        return draw_params(seed, height, width, self.size, self.policy, self.scale_min, self.hflip, self.reprob)

    # --- training-process side ---
    def resize_crop(self, image: torch.Tensor, params: Optional[AugmentParams]) -> torch.Tensor:
        """``3×H×W`` uint8 → ``3×S×S`` uint8: the random crop (train) or short-side resize and centre crop (eval)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as F

        mode = InterpolationMode(self.interpolation)
        if params is not None:
            top, left, h, w = params.crop
            return F.resize(image[:, top : top + h, left : left + w], [self.size, self.size], mode, antialias=True)
        # timm's eval transform: the short side to floor(S / crop_pct), then the central S×S
        image = F.resize(image, [math.floor(self.size / self.crop_pct)], mode, antialias=True)
        return F.center_crop(image, [self.size, self.size])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``B×3×S×S`` uint8 → float, in the order of timm's ToTensor + Normalize (bit-identical on equal pixels)."""
        mean = to_device(torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1), batch.device)
        std = to_device(torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1), batch.device)
        return batch.float().div_(255).sub_(mean).div_(std)

    def augment(self, batch: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
        """Flip, RandAugment, normalise and erase a ``B×3×S×S`` uint8 batch; returns float ``B×3×S×S``.

        The per-sample choices go to the device in two transfers; each op then runs once per slot
        on the rows that drew it.
        """
        device = batch.device
        rows: list[int] = [i for i, p in enumerate(params) if p.flip]
        groups: list[tuple[str, int, int]] = []  # (op name, start in rows/values, count)
        values: list[tuple[float, ...]] = []
        for slot in range(self.policy.num_ops if self.policy is not None else 0):
            members: dict[str, list[int]] = {}
            for i, p in enumerate(params):
                index = p.ops[slot][0]
                if index >= 0:
                    name = RAND_INCREASING_OPS[index]
                    members.setdefault("affine" if name in AFFINE_OPS else name, []).append(i)
            for name, members_of in members.items():
                groups.append((name, len(rows), len(members_of)))
                rows += members_of
                values += [_padded(params[i].ops[slot][1]) for i in members_of]
        if not rows:
            return self._normalize_and_erase(batch, params)
        index = to_device(torch.tensor(rows, dtype=torch.long), device)
        arguments = to_device(torch.tensor(values, dtype=torch.float64), device) if values else None
        flips = len(rows) - sum(count for _, _, count in groups)
        if flips:
            flipped = index[:flips]
            batch.index_copy_(0, flipped, batch.index_select(0, flipped).flip(-1))
        for name, start, count in groups:
            where = index[start : start + count]
            args = arguments[start - flips : start - flips + count]
            batch.index_copy_(0, where, apply_op(name, batch.index_select(0, where), args, self.interpolation, self.fill))
        return self._normalize_and_erase(batch, params)

    def _normalize_and_erase(self, batch: torch.Tensor, params: Sequence[AugmentParams]) -> torch.Tensor:
        out = self.normalize(batch)
        for i, p in enumerate(params):
            if p.erase is not None:  # timm's 'pixel' mode: per-pixel standard normal noise in normalised units
                top, left, h, w = p.erase
                generator = torch.Generator(device=out.device).manual_seed(p.noise_seed)
                out[i, :, top : top + h, left : left + w] = torch.randn(
                    (3, h, w), generator=generator, device=out.device, dtype=out.dtype)
        return out


def _padded(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(values) + (0.0,) * (6 - len(values))
