"""timm's RandAugment (``rand-…-inc1``) as pure tensor functions: the policy, each op's argument, the ops.

Every op takes a ``B×3×H×W`` uint8 batch and per-row arguments and returns a new ``B×3×H×W`` uint8
batch, as Pillow computes it (the ten point ops to the bit, the five affine ops with Pillow's
geometry), so that one op runs once on all the rows of a batch that drew it. The layout follows
timm's ``auto_augment.py``: the op set, the level → argument mapping (:func:`op_values`) and the
ops themselves (:func:`apply_op`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ...errors import ConfigurationError

#: timm's ``_RAND_INCREASING_TRANSFORMS`` (``inc1``), in timm's order: an op's index is its draw.
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
#: The affine ops: one ``grid_sample`` (:func:`affine`) serves all of them.
AFFINE_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A timm ``rand-…-inc1`` policy: ``num_ops`` ops per image, each applied with ``prob``."""

    magnitude: float = 9.0
    magnitude_std: float = 0.5  # inf: uniform in [0, magnitude], as timm does for mstd > 100
    magnitude_max: float = 10.0
    num_ops: int = 2
    prob: float = 0.5


def parse_rand_augment(policy: Optional[str]) -> Optional[RandAugmentPolicy]:
    """The RandAugment policy of an ``--auto_augment`` string, ``None`` for 'none'.

    Raises:
        ConfigurationError: a policy other than timm's RandAugment on the increasing op set.
    """
    if policy is None or policy.lower() == "none":
        return None
    expected = ("expected 'none' or a timm RandAugment policy on the increasing op set, "
                "'rand-m<M>-mstd<S>-inc1' (optionally -n<N>, -p<P>, -mmax<M>)")
    sections = policy.split("-")
    values: dict[str, float] = {}
    for section in sections[1:]:
        match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d+)?)", section)
        if match is None:
            values = {}
            break
        values[match.group(1)] = float(match.group(2))
    if sections[0] != "rand" or not values or values.get("inc") != 1:
        raise ConfigurationError(f"auto_augment: '{policy}' is not available with --data_backend torchvision; {expected}")
    std = values.get("mstd", 0.0)
    return RandAugmentPolicy(magnitude=values.get("m", 10.0), magnitude_std=math.inf if std > 100 else std,
                             magnitude_max=values.get("mmax", 10.0), num_ops=int(values.get("n", 2)),
                             prob=values.get("p", 0.5))


def op_values(name: str, magnitude: float, negate: bool, size: int) -> tuple[float, ...]:
    """timm's level → argument mapping of an op (``_LEVEL_DENOM`` 10) on a ``size×size`` image.

    Point ops: ``(argument,)``; affine ops: Pillow's ``(a, b, c, d, e, f)``, the output pixel
    ``(x, y)`` showing the input at ``(a·x' + b·y' + c, d·x' + e·y' + f)``, ``x' = x + 0.5``.
    """
    level = magnitude / 10.0
    sign = -1.0 if negate else 1.0
    if name == "PosterizeIncreasing":
        return (4 - int(level * 4),)  # bits kept: 4 down to 0
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(level * 256)),)  # threshold
    if name == "SolarizeAdd":
        return (min(128, int(level * 110)),)  # added below 128
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
        return (max(0.1, 1.0 + sign * level * 0.9),)
    if name == "Rotate":
        angle = -math.radians(sign * level * 30.0)  # Pillow's Image.rotate: counter-clockwise about the centre
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        centre = size / 2.0
        matrix = (a, b, a * -centre + b * -centre + centre, -b, a, -b * -centre + a * -centre + centre)
    elif name == "ShearX":
        matrix = (1.0, sign * level * 0.3, 0.0, 0.0, 1.0, 0.0)
    elif name == "ShearY":
        matrix = (1.0, 0.0, 0.0, sign * level * 0.3, 1.0, 0.0)
    elif name == "TranslateXRel":
        matrix = (1.0, 0.0, sign * level * 0.45 * size, 0.0, 1.0, 0.0)
    elif name == "TranslateYRel":
        matrix = (1.0, 0.0, 0.0, 0.0, 1.0, sign * level * 0.45 * size)
    else:  # AutoContrast, Equalize, Invert
        return (0.0,)
    return matrix


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on ``device`` without a stream synchronisation (pinned, asynchronous on CUDA)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ------------------------------------------------------------------------------------------------
# RandAugment ops on B×3×H×W uint8, per-row arguments (B,), as Pillow computes them
# ------------------------------------------------------------------------------------------------
def _per_row(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def _lut(images: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup: ``table`` is ``B×3×256`` (any integer dtype, 0-255)."""
    b, c, h, w = images.shape
    out = torch.gather(table.to(torch.uint8), 2, images.reshape(b, c, h * w).long())
    return out.view(b, c, h, w)


def _histogram(images: torch.Tensor) -> torch.Tensor:
    """``B×3×256`` counts of each channel's values (bincount: exact and deterministic on CUDA)."""
    b, c = images.shape[:2]
    offsets = torch.arange(b * c, device=images.device).view(b * c, 1) * 256
    flat = (images.reshape(b * c, -1).long() + offsets).view(-1)
    return torch.bincount(flat, minlength=b * c * 256).view(b, c, 256)


def auto_contrast(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` (cutoff 0): each channel stretched to 0-255 by its own min and max."""
    low = images.amin(dim=(2, 3)).double()
    high = images.amax(dim=(2, 3)).double()
    # tensor / tensor: PyTorch turns `number / tensor` into a reciprocal product, which rounds
    # differently from Pillow's double division (54 of the 255 possible ranges, measured).
    scale = torch.full_like(low, 255.0) / (high - low).clamp(min=1)
    offset = -low * scale
    levels = torch.arange(256, device=images.device, dtype=torch.float64)
    # Pillow: int(ix * scale + offset) in float64, two roundings (kept as two operations)
    table = (levels * scale.unsqueeze(-1)).add_(offset.unsqueeze(-1)).trunc_().clamp_(0, 255)
    table = torch.where((high > low).unsqueeze(-1), table, levels)
    return _lut(images, table.long())


def equalize(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize``: Pillow's integer lookup table per channel."""
    hist = _histogram(images)
    nonzero = hist > 0
    last = 255 - nonzero.flip(-1).int().argmax(-1, keepdim=True)  # the last non-empty bin
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each level
    table = (step // 2 + before) // step.clamp(min=1)
    identity = torch.arange(256, device=images.device).expand_as(table)
    keep = (nonzero.sum(-1, keepdim=True) <= 1) | (step == 0)
    return _lut(images, torch.where(keep, identity, table).clamp_(0, 255))


def invert(images: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return images.bitwise_not()


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` high bits (0 bits: black, as Pillow < 13 and the PIL backend give)."""
    shift = (8 - bits.long()).clamp(0, 8)
    mask = (torch.full_like(shift, 255) << shift) & 255
    return images & _per_row(mask.to(torch.uint8))


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize``: values at or above the threshold inverted."""
    return torch.where(images.int() >= _per_row(threshold.int()), images.bitwise_not(), images)


def solarize_add(images: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    """timm's ``solarize_add``: ``add`` added to values below 128, capped at 255."""
    added = (images.int() + _per_row(add.int())).clamp_(max=255).to(torch.uint8)
    return torch.where(images < 128, added, images)


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)``: ``d + f·(x − d)`` clipped to 0-255 and truncated, as Pillow does."""
    d = degenerate.float()
    return d.add_(_per_row(factor.float()) * (images.float() - d)).clamp_(0, 255).trunc_().to(torch.uint8)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB → L (ITU-R 601-2 in 16-bit fixed point, rounded), ``B×1×H×W`` int32."""
    r, g, b = images.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the image's grey version."""
    return blend(grayscale(images).expand_as(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with the rounded mean grey level."""
    grey = grayscale(images)
    total = grey.sum(dim=(1, 2, 3), dtype=torch.int64).double()
    # ImageStat's mean, int(sum / count + 0.5); tensor / tensor (CUDA divides by a number through its reciprocal)
    mean = torch.floor(total / torch.full_like(total, grey[0].numel()) + 0.5)
    return blend(_per_row(mean).expand_as(images), images, factor)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return blend(torch.zeros_like(images), images, factor)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with Pillow's SMOOTH filter (3×3, centre 5, /13; border kept).

    The filter is summed in integers: Pillow's float sum rounds to the nearest integer of S / 13,
    which is never a tie, so ``(2·S + 13) // 26`` is the same value on every device (no cuDNN
    algorithm choice to change its last bits).
    """
    x = images.int()
    h, w = x.shape[-2:]
    total = 4 * x[:, :, 1:-1, 1:-1]  # the centre's weight is 5: 4 here, 1 in the 3×3 sum
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            total = total + x[:, :, dy : h - 2 + dy, dx : w - 2 + dx]
    degenerate = images.clone()
    degenerate[:, :, 1:-1, 1:-1] = torch.div(2 * total + 13, 26, rounding_mode="floor").to(torch.uint8)
    return blend(degenerate, images, factor)


def affine(images: torch.Tensor, matrix: torch.Tensor, interpolation: str, fill: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.transform(size, AFFINE, matrix, resample, fillcolor)`` per row, with ``grid_sample``.

    ``matrix``: ``B×6`` coefficients ``(a, b, c, d, e, f)``: output pixel ``(x, y)`` shows the input
    at ``(a·(x+½) + b·(y+½) + c, d·(x+½) + e·(y+½) + f)``; ``fill``: ``1×3×1×1``. Pillow's geometry:
    a source point outside the image gives ``fill`` (decided on float64 coordinates), one inside is
    interpolated with the edge pixels repeated, and the result is truncated to 8 bits. Measured on
    photographs against Pillow: nearest identical but for exact ties (Pillow accumulates coordinates
    pixel by pixel), bilinear within one level (99 % identical), bicubic 0.1-0.9 levels off on average
    (up to 19 at sharp edges): PyTorch's cubic has a = -0.75, Pillow's transform a = -1. Pillow's
    cubic computed exactly took ~100 kernels and 6× the time of this one ``grid_sample``.
    """
    b, c, h, w = images.shape
    m = matrix.double().view(b, 6, 1, 1)
    ys = torch.arange(h, device=images.device, dtype=torch.float64).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=images.device, dtype=torch.float64).view(1, 1, w) + 0.5
    x_in = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # B×H×W, in pixels
    y_in = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = ((x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)).unsqueeze(1)
    grid = torch.stack([x_in * (2.0 / w) - 1, y_in * (2.0 / h) - 1], dim=-1).float()  # align_corners=False units
    out = torch.nn.functional.grid_sample(images.float(), grid, mode=interpolation, padding_mode="border", align_corners=False)
    return torch.where(inside, out.clamp_(0, 255).trunc_(), fill).to(torch.uint8)


def apply_op(name: str, images: torch.Tensor, values: torch.Tensor, interpolation: str = "bicubic",
             fill: Sequence[int] = (128, 128, 128)) -> torch.Tensor:
    """RandAugment op ``name`` (one of :data:`RAND_INCREASING_OPS`, or "affine" for any of the affine ones).

    ``images``: ``B×3×H×W`` uint8; ``values``: ``B×k`` per-row values of :func:`op_values` (the
    argument first; the 6 affine coefficients for an affine op). Returns ``B×3×H×W`` uint8.
    """
    if name == "affine" or name in AFFINE_OPS:
        fill_values = to_device(torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1), images.device)
        return affine(images, values, interpolation, fill_values)
    return POINT_OPS[name](images, values[:, 0])


POINT_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "AutoContrast": auto_contrast,
    "Equalize": equalize,
    "Invert": invert,
    "PosterizeIncreasing": posterize,
    "SolarizeIncreasing": solarize,
    "SolarizeAdd": solarize_add,
    "ColorIncreasing": color,
    "ContrastIncreasing": contrast,
    "BrightnessIncreasing": brightness,
    "SharpnessIncreasing": sharpness,
}

