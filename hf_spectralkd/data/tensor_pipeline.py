"""Decoding and augmentation on the training device (``--data_backend torchvision``).

With the ``pil`` backend a DataLoader worker decodes each image with Pillow and runs timm's
transforms on it: about 258 ImageNet-like JPEGs per second per core (bench/README.md), so the
8,000 images/s targeted for a DeiT-Tiny ← CaiT-S24 step on an H100 would need ~31 decoding cores.
Here the work is split so that workers only read bytes (5,800 images/s per core, measured):

* **Workers** (:meth:`TensorImagePipeline.prepare_sample`) read the encoded bytes, parse the header
  (format, size, EXIF orientation; no pixel is decoded) and draw the sample's augmentation from a
  ``torch.Generator`` seeded with the sample's seed (the seed the PIL backend uses, so resume and
  repeated augmentation are unchanged). A plain JPEG stays encoded. Anything else (PNG, GIF, CMYK
  JPEGs, a JPEG without its end marker, remote paths) is decoded right there by the library's one
  decoder (:func:`~.transforms.decode_image`): what is skipped as undecodable is exactly what the
  PIL backend skips, and those files are rare in ImageNet (about 20 CMYK JPEGs).
* **The training process** (:func:`pixel_batch`, called by the trainer before ``compute_loss``)
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
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigurationError, TooManyBadImagesError
from .arguments import IMAGENET_MEAN, IMAGENET_STD, DataArguments
from .transforms import decode_image, sample_seed, seeded_rngs

#: The batch key under which the collator hands encoded images to the training process.
ENCODED_IMAGES = "encoded_images"

#: timm's ``_RAND_INCREASING_TRANSFORMS`` (``inc1``), in timm's order: an op's index is its draw.
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
_AFFINE_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
# timm's RandomErasing defaults (create_transform passes only probability, mode and count).
_ERASE_AREA, _ERASE_LOG_ASPECT = (0.02, 1 / 3), (math.log(0.3), math.log(1 / 0.3))
_RRC_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# Worker side: bytes, header, parameters
# ------------------------------------------------------------------------------------------------
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
    params: Optional["AugmentParams"] = None


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


def read_bytes(value: Any) -> Optional[bytes]:
    """The encoded bytes of an image value (``{"bytes", "path"}``, bytes or a local path); ``None`` otherwise."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        try:
            with open(value, "rb") as handle:
                return handle.read()
        except OSError:
            return None
    return None


def jpeg_header(data: bytes) -> Optional[tuple[int, int, int]]:
    """``(height, width, EXIF orientation)`` of a JPEG the torchvision decoder can take, else ``None``.

    Only the header is parsed (about 20 µs). ``None`` for anything else: another format, a CMYK or
    YCCK JPEG, one stored as RGB without the YCbCr transform (Adobe marker with transform 0): colour
    conversions nvJPEG may not do as libjpeg does, or a JPEG whose last scan has no end marker
    after it (truncated: Pillow refuses it, while a decoder might return partial pixels).
    In a scan a 0xFF byte is always followed by 0x00 or a restart marker, so an end marker (FFD9)
    after the last start-of-scan (FFDA) is the file's own.
    """
    from PIL import ExifTags, Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.info.get("adobe_transform") == 0:
                return None
            width, height = image.size
            orientation = image.getexif().get(ExifTags.Base.Orientation)
    except Exception:  # noqa: BLE001 - not an image Pillow can open: the PIL decoder decides below
        return None
    if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
        return None
    return height, width, int(orientation) if orientation else 1


def upright_size(height: int, width: int, orientation: int) -> tuple[int, int]:
    """``(H, W)`` after the EXIF orientation is applied (orientations 5-8 swap the axes)."""
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def apply_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``…×H×W`` image turned as ``PIL.ImageOps.exif_transpose`` turns it for EXIF orientation 1-8."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip((-2, -1))
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)
    if orientation == 7:
        return image.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


def pil_to_tensor(image) -> torch.Tensor:
    """An RGB PIL image as a ``3×H×W`` uint8 tensor."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


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


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------
class TensorImagePipeline:
    """timm's DeiT training transform (``train=True``) or evaluation transform as batched tensor ops.

    It is the "transform" of a dataset: :func:`~.transforms.transform_row` hands it each record
    (:meth:`prepare_sample`, in a worker), the collator packs the prepared samples into a
    :class:`PreparedBatch`, and :func:`pixel_batch` turns that into ``pixel_values`` on a device.

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
        policy = self.policy
        slots = policy.num_ops if policy is not None else 0
        u = _Uniforms(seed, 22 + 1 + 5 * slots + 23)
        crop = random_resized_crop(u.take(22), height, width, self.scale_min)
        flip = u.take(1)[0] < self.hflip  # torchvision's RandomHorizontalFlip: rand < p
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
            ops.append((index, op_values(RAND_INCREASING_OPS[index], magnitude, negate > 0.5, self.size)))
        erase = None
        draws = u.take(23)
        if self.reprob > 0 and draws[0] <= self.reprob:  # timm: skipped when random() > probability
            area = self.size * self.size
            for attempt in range(10):
                target = area * (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * draws[1 + 2 * attempt])
                aspect = math.exp(_ERASE_LOG_ASPECT[0] + (_ERASE_LOG_ASPECT[1] - _ERASE_LOG_ASPECT[0]) * draws[2 + 2 * attempt])
                h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
                if 0 < w < self.size and 0 < h < self.size:
                    erase = (_randint(draws[21], 0, self.size - h), _randint(draws[22], 0, self.size - w), h, w)
                    break
        noise_seed = int(torch.randint(1 << 62, (1,), generator=u.generator))
        return AugmentParams(crop, bool(flip), tuple(ops), erase, noise_seed)

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
        mean = _to_device(torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1), batch.device)
        std = _to_device(torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1), batch.device)
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
                    members.setdefault("affine" if name in _AFFINE_OPS else name, []).append(i)
            for name, members_of in members.items():
                groups.append((name, len(rows), len(members_of)))
                rows += members_of
                values += [_padded(params[i].ops[slot][1]) for i in members_of]
        if not rows:
            return self._normalize_and_erase(batch, params)
        index = _to_device(torch.tensor(rows, dtype=torch.long), device)
        arguments = _to_device(torch.tensor(values, dtype=torch.float64), device) if values else None
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


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
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
    if name == "affine" or name in _AFFINE_OPS:
        fill_values = _to_device(torch.tensor(fill, dtype=torch.float32).view(1, 3, 1, 1), images.device)
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


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
class PreparedBatch:
    """The images of a batch as the workers prepared them, and what turns them into pixels.

    The encoded JPEGs travel as one uint8 tensor (one shared-memory block out of a worker instead
    of one per image). It has no ``to`` method on purpose: accelerate and the Trainer move tensors
    to the device, and ``decode_jpeg`` wants its input on the CPU whatever the device.
    """

    def __init__(self, pipeline: TensorImagePipeline, images: Sequence[PreparedImage], seeds: Sequence[int],
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


def decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[Optional[torch.Tensor]]:
    """``torchvision.io.decode_jpeg`` of a list (RGB): one batched nvJPEG call on CUDA; ``None`` per failure.

    A batch that fails as a whole is decoded image by image, so one bad file costs only itself.
    """
    if not encoded:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here).
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[Optional[torch.Tensor]] = []
            for data in encoded:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def collate_prepared(samples: Sequence[Optional[dict[str, Any]]], mixup: Optional[Callable]) -> dict[str, Any]:
    """The collator's batch of prepared samples: ``{ENCODED_IMAGES, "labels", "num_skipped", "num_images"}``.

    Samples a worker could not read or decode are dropped here and counted in ``num_skipped``;
    :func:`pixel_batch` adds those that fail to decode later.
    """
    valid = [s for s in samples if s is not None and s.get("prepared") is not None]
    if not valid:
        raise TooManyBadImagesError(
            f"image_column: every image of a batch of {len(samples)} failed to decode; check that the dataset's "
            "image column holds images (--image_column)"
        )
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
        raise TooManyBadImagesError(
            f"image_column: every image of a batch of {batch['num_images']} failed to decode; check that the "
            "dataset's image column holds images (--image_column)"
        )
    keep = torch.tensor(decoded, dtype=torch.bool)
    labels = batch["labels"][keep]
    out = {key: value for key, value in batch.items() if key != ENCODED_IMAGES}
    out["num_skipped"] = int(batch["num_skipped"]) + decoded.count(False)
    if images.mixup is not None:
        if len(labels) % 2:
            # timm's Mixup pairs images by flipping the batch and needs an even size.
            pixel_values, labels = pixel_values[:-1], labels[:-1]
        seeds = [seed for seed, ok in zip(images.seeds, decoded) if ok]  # as the PIL collator: every decoded sample
        with seeded_rngs(sample_seed(*seeds)):
            pixel_values, labels = images.mixup(pixel_values, labels.to(pixel_values.device))
    out["pixel_values"], out["labels"] = pixel_values, labels
    return out


class DecodeOnDeviceMixin:
    """Trainer mixin: batches of encoded images become ``pixel_values`` on ``args.device`` before ``compute_loss``.

    ``Trainer.training_step`` and ``prediction_step`` both pass a batch through ``_prepare_inputs``
    first, so training, evaluation and the teacher's evaluation all decode here; other batches
    pass unchanged.
    """

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return super()._prepare_inputs(pixel_batch(inputs, self.args.device))

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        # The Trainer counts FLOPs on the batch as the DataLoader gave it: count the pixels it decodes to.
        encoded = inputs.get(ENCODED_IMAGES) if isinstance(inputs, Mapping) else None
        return super().floating_point_ops({"pixel_values": encoded} if encoded is not None else inputs)
