"""Each sample's training augmentation, drawn in a worker as a pure function of the sample's seed.

:func:`draw_params` reads a fixed number of uniforms from a ``torch.Generator`` seeded with the
sample's seed, in a fixed order (crop, flip, RandAugment slots, erasing), so the same seed gives the
same :class:`AugmentParams` in any worker, on any resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .rand_augment import RAND_INCREASING_OPS, RandAugmentPolicy, op_values

# timm's RandomErasing defaults (create_transform passes only probability, mode and count).
_ERASE_AREA, _ERASE_LOG_ASPECT = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))
_RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


@dataclass(frozen=True)
class AugmentParams:
    """One sample's training augmentation, drawn in a worker.

    ``crop``: ``(top, left, height, width)`` in the upright image. ``ops``: per RandAugment slot,
    ``(op index, values)`` with index -1 for a slot not applied; ``values`` is the op's argument
    (first entry), or for an affine op Pillow's 6 affine coefficients (:func:`op_values`). ``erase``: ``(top, left,
    height, width)`` of the erased box or ``None``; ``noise_seed`` seeds its noise on the device.
    """

    crop: tuple[int, int, int, int]
    flip: bool
    ops: tuple[tuple[int, tuple[float, ...]], ...]
    erase: Optional[tuple[int, int, int, int]]
    noise_seed: int


class _Uniforms:
    """A sample's uniforms in [0, 1), consumed in a fixed order: each decision reads its own slots."""

    def __init__(self, seed: int, count: int):
        generator = torch.Generator().manual_seed(int(seed))
        # One draw of all of them (~5 µs) instead of one call per decision (~3 µs each).
        self.values = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
        self.generator, self.position = generator, 0

    def take(self, count: int) -> list[float]:
        out = self.values[self.position : self.position + count]
        self.position += count
        return out


def _randint(u: float, low: int, high: int) -> int:
    """``random.randint(low, high)`` (both ends included) from one uniform."""
    return low + min(int(u * (high - low + 1)), high - low)


def random_resized_crop(u: list[float], height: int, width: int, scale_min: float) -> tuple[int, int, int, int]:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` on 22 uniforms: ``(top, left, h, w)``.

    Scale ``(scale_min, 1)``, ratio ``(3/4, 4/3)`` drawn log-uniformly, 10 attempts, then the
    central crop of the closest ratio. A crop is never empty (timm's can be on a 1-pixel image).
    """
    area = height * width
    for attempt in range(10):
        target = area * (scale_min + (1.0 - scale_min) * u[2 * attempt])
        aspect = math.exp(_RRC_LOG_RATIO[0] + (_RRC_LOG_RATIO[1] - _RRC_LOG_RATIO[0]) * u[2 * attempt + 1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(u[20], 0, height - h), _randint(u[21], 0, width - w), h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif ratio > 4 / 3:
        w, h = int(round(height * (4 / 3))), height
    else:
        w, h = width, height
    h, w = max(1, min(h, height)), max(1, min(w, width))
    return (height - h) // 2, (width - w) // 2, h, w


def draw_params(seed: int, height: int, width: int, size: int, policy: Optional[RandAugmentPolicy], scale_min: float,
                hflip: float, reprob: float) -> AugmentParams:
    """The training augmentation of a ``height×width`` image cropped to ``size×size``, a pure function of ``seed``.

    ``policy``: the RandAugment policy (``None``: no RandAugment); ``scale_min``: the crop's smallest
    share of the area; ``hflip``, ``reprob``: probabilities of the flip and of random erasing.
    """
    slots = policy.num_ops if policy is not None else 0
    u = _Uniforms(seed, 22 + 1 + 5 * slots + 23)
    crop = random_resized_crop(u.take(22), height, width, scale_min)
    flip = u.take(1)[0] < hflip  # torchvision's RandomHorizontalFlip: rand < p
    ops = []
    for _ in range(slots):
        choice, apply, u1, u2, negate = u.take(5)
        index = min(int(choice * len(RAND_INCREASING_OPS)), len(RAND_INCREASING_OPS) - 1)
        if policy.prob < 1.0 and apply > policy.prob:  # timm: skipped when random() > prob
            ops.append((-1, (0.0,)))
            continue
        if policy.magnitude_std == math.inf:
            magnitude = u1 * policy.magnitude
        elif policy.magnitude_std > 0:  # random.gauss(m, std) by Box-Muller
            magnitude = policy.magnitude + policy.magnitude_std * math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2 * math.pi * u2)
        else:
            magnitude = policy.magnitude
        magnitude = max(0.0, min(magnitude, policy.magnitude_max))
        ops.append((index, op_values(RAND_INCREASING_OPS[index], magnitude, negate > 0.5, size)))
    erase = None
    draws = u.take(23)
    if reprob > 0 and draws[0] <= reprob:  # timm: skipped when random() > probability
        area = size * size
        for attempt in range(10):
            target = area * (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * draws[1 + 2 * attempt])
            aspect = math.exp(_ERASE_LOG_ASPECT[0] + (_ERASE_LOG_ASPECT[1] - _ERASE_LOG_ASPECT[0]) * draws[2 + 2 * attempt])
            h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w < size and 0 < h < size:
                erase = (_randint(draws[21], 0, size - h), _randint(draws[22], 0, size - w), h, w)
                break
    noise_seed = int(torch.randint(1 << 62, (1,), generator=u.generator))
    return AugmentParams(crop, bool(flip), tuple(ops), erase, noise_seed)
