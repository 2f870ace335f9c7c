"""JPEG bytes: reading an image value's bytes, the header (size, EXIF orientation), and decoding with torchvision.

Workers call :func:`read_bytes` and :func:`jpeg_header` (no pixel decoded); the training process calls
:func:`decode_jpegs` and turns each image upright with :func:`apply_orientation`. ``decode_jpegs`` is
the one place that calls ``torchvision.io`` (bench/README.md: the function to port to TorchCodec).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
import torch


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

