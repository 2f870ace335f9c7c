"""What each model expects as input, and turning one model's batch into another's, on the device.

A teacher trained with other statistics than the student (most ``google/vit-*`` checkpoints use
mean = std = 0.5, timm's and DeiT's ImageNet statistics) or at another resolution must not see the
student's batch as it is. :class:`InputSpec` holds a model's preprocessing, read from what ships
with it (:func:`input_spec_of`): its saved image processor, else timm's ``pretrained_cfg`` for models
behind transformers' timm wrapper. :class:`InputAdapter` maps a normalised batch of one spec to
another: an affine map per channel, then (for logit-only distillation) a bicubic, antialiased resize.
When both specs agree it does nothing at all. A batch's crop (``crop_pct``) and resize filter cannot be
undone on the device: when the teacher was evaluated with others, the adapter names both specs and
:func:`teacher_input_adapter` warns (a teacher scored on another crop than its own can lose accuracy).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigurationError
from .features.tokens import vision_config
from .utils import unwrap_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """A model's input preprocessing.

    Attributes:
        mean, std: per-channel normalisation (``x = (pixels/255 - mean) / std``), or ``None`` if unknown.
        size: ``(height, width)`` the model is fed, or ``None`` if unknown.
        crop_pct: evaluation centre-crop fraction (``size / resize``), when known.
        interpolation: resize filter name (``bicubic``, ``bilinear``, ...), when known.
        source: where the values were read from (for logs).
    """

    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    size: Optional[tuple[int, int]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    source: str = "unknown"

    @property
    def knows_normalisation(self) -> bool:
        return self.mean is not None and self.std is not None

    def describe(self) -> str:
        def fmt(values):
            return "?" if values is None else "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

        size = "?" if self.size is None else f"{self.size[0]}×{self.size[1]}"
        crop = "" if self.crop_pct is None else f", crop_pct {self.crop_pct:g}"
        interpolation = "" if self.interpolation is None else f", {self.interpolation}"
        return f"mean {fmt(self.mean)}, std {fmt(self.std)}, {size}{crop}{interpolation} [{self.source}]"


_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _entry(value: Any, key: str) -> Any:
    """``value[key]`` of a size dict (transformers' ``SizeDict`` or a plain dict), else ``None``."""
    getter = getattr(value, "get", None)
    return getter(key) if callable(getter) else None


def _size_of(size: Any, crop_size: Any = None) -> Optional[tuple[int, int]]:
    for value in (crop_size, size):
        if isinstance(value, int):
            return value, value
        height, width, shortest = _entry(value, "height"), _entry(value, "width"), _entry(value, "shortest_edge")
        if height is not None and width is not None:
            return int(height), int(width)
        if shortest is not None and value is size and crop_size is None:
            return int(shortest), int(shortest)
    return None


def _crop_fraction(processor: Any) -> Optional[float]:
    """The share of the resized image a processor keeps (timm's ``crop_pct``), or ``None`` if it does not say."""
    size, crop_pct = getattr(processor, "size", None), getattr(processor, "crop_pct", None)
    shortest = _entry(size, "shortest_edge")
    if crop_pct is not None and shortest is not None:
        return float(crop_pct) if shortest < 384 else 1.0  # ConvNeXt's processor crops below 384 px only
    crop_size = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and shortest and _entry(crop_size, "height"):
        return float(_entry(crop_size, "height")) / float(shortest)
    if _entry(size, "height") is not None and not getattr(processor, "do_center_crop", False):
        return 1.0  # a plain resize to the model's size keeps the whole image
    return None


def spec_from_processor(processor: Any, source: str = "image processor") -> Optional[InputSpec]:
    """The :class:`InputSpec` of a transformers image processor (timm's wrapper processor included)."""
    data_config = getattr(processor, "data_config", None)
    if isinstance(data_config, dict):  # TimmWrapperImageProcessor: timm's resolved data config
        return spec_from_timm_config(data_config, source)
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", None)
    crop_size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    return InputSpec(
        mean=_triple(mean), std=_triple(std), size=_size_of(getattr(processor, "size", None), crop_size),
        crop_pct=_crop_fraction(processor),
        interpolation=_RESAMPLE_NAMES.get(int(resample)) if resample is not None else None, source=source,
    )


def spec_from_timm_config(config: dict, source: str = "timm pretrained_cfg") -> InputSpec:
    input_size = config.get("input_size") or config.get("test_input_size")
    return InputSpec(
        mean=_triple(config["mean"]) if config.get("mean") is not None else None,
        std=_triple(config["std"]) if config.get("std") is not None else None,
        size=(int(input_size[-2]), int(input_size[-1])) if input_size else None,
        crop_pct=config.get("crop_pct"), interpolation=config.get("interpolation"), source=source,
    )


def _triple(values: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (list, tuple)) else [values]))
    return values * 3 if len(values) == 1 else values


def configured_size(model: nn.Module) -> Optional[tuple[int, int]]:
    """The input size a model is built for (its config, or its timm patch embedding).

    CLIP-like classifiers (CLIP, SigLIP, MetaCLIP 2) state it in ``config.vision_config``: their position
    embeddings fix it, so a teacher of theirs must be fed batches resized to it.
    """
    model = unwrap_model(model)
    timm_model = getattr(model, "timm_model", None)
    if timm_model is not None:
        img_size = getattr(getattr(timm_model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            return (int(img_size[0]), int(img_size[-1])) if isinstance(img_size, (tuple, list)) else (int(img_size),) * 2
        cfg = getattr(timm_model, "pretrained_cfg", {}) or {}
        return tuple(int(v) for v in cfg["input_size"][-2:]) if cfg.get("input_size") else None
    size = getattr(vision_config(model), "image_size", None) if hasattr(model, "config") else None
    if size is None:
        return None
    return (int(size[0]), int(size[-1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def student_image_size(model: nn.Module, image_size: Optional[int]) -> int:
    """The side of the square images the student is fed: ``image_size`` (``--image_size``) or its configured size.

    Raises :class:`~hf_spectralkd.errors.ConfigurationError` when ``image_size`` is not the configured size: the
    students' position embeddings are built for that grid and the models refuse other inputs.
    """
    size = configured_size(model)
    if size is None:
        if image_size is not None:
            return image_size
        from .features import describe_taps, has_taps

        if has_taps(model):  # a tapped model without a stated size: its patch embedding says it
            return describe_taps(model).image_size[0]
        raise ConfigurationError("image_size: the student's config states no input size; pass --image_size")
    if image_size is None:
        return size[0]
    if image_size == size[0] == size[1]:
        return image_size
    config = getattr(unwrap_model(model), "config", None)
    patch = getattr(config, "patch_size", None)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    built = f"{size[0]}×{size[1]}"
    if isinstance(patch, int) and image_size % patch:
        reason = f"does not divide into the student's {patch}-pixel patches (it is built for {built} images)"
    else:
        reason = f"differs from the {built} images the student is built for (its position embeddings have that grid)"
    raise ConfigurationError(
        f"image_size: {image_size} {reason}; leave --image_size unset to use {size[0]}, or give a student built for "
        f"{image_size} (image_size in its config)"
    )


def input_spec_of(
    model: nn.Module, name_or_path: Optional[str] = None, revision: Optional[str] = None, token: Optional[str] = None,
    mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
) -> InputSpec:
    """What ``model`` expects: explicit ``mean``/``std`` first, then the image processor saved with it
    (``name_or_path``: a folder or Hub id), then timm's ``pretrained_cfg``. The size is always the
    model's configured input size. Normalisation stays ``None`` when nothing says it."""
    size = configured_size(model)
    spec: Optional[InputSpec] = None
    if name_or_path:
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path, revision=revision, token=token)
            spec = spec_from_processor(processor, source=f"image processor of {_short(name_or_path)}")
        except Exception as error:  # noqa: BLE001 - no processor saved: fall back to the model itself
            logger.debug("no image processor with %s: %s", name_or_path, error)
    timm_model = getattr(unwrap_model(model), "timm_model", None)
    if spec is None and timm_model is not None and getattr(timm_model, "pretrained_cfg", None):
        spec = spec_from_timm_config(dict(timm_model.pretrained_cfg))
    spec = spec or InputSpec()
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both the image mean and the image std")
        spec = InputSpec(_triple(mean), _triple(std), spec.size, spec.crop_pct, spec.interpolation, "given")
    return InputSpec(spec.mean, spec.std, size or spec.size, spec.crop_pct, spec.interpolation, spec.source)


def _short(name_or_path: str) -> str:
    from .io.run_summary import public_name

    return public_name(name_or_path) or name_or_path


class InputAdapter(nn.Module):
    """Map a batch normalised for ``source`` into what ``target`` expects: ``B×3×H×W → B×3×H'×W'``.

    ``x_target = x·(std_s/std_t) + (mean_s - mean_t)/std_t`` per channel (the same pixels, re-normalised),
    then a bicubic, antialiased resize to ``target.size`` when the batch has another size (the teacher's
    feature maps are then on another grid, which the loss aligns: :mod:`.grids`). An unknown
    normalisation on either side means no affine map. Nothing is computed when nothing differs.
    """

    def __init__(self, source: InputSpec, target: InputSpec):
        super().__init__()
        self.source, self.target = source, target
        self.affine = (
            source.knows_normalisation and target.knows_normalisation
            and not all(math.isclose(a, b, abs_tol=1e-7) for a, b in zip(source.mean + source.std, target.mean + target.std))
        )
        if self.affine:
            s_mean, s_std = torch.tensor(source.mean), torch.tensor(source.std)
            t_mean, t_std = torch.tensor(target.mean), torch.tensor(target.std)
            self.register_buffer("scale", (s_std / t_std).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("shift", ((s_mean - t_mean) / t_std).view(1, -1, 1, 1), persistent=False)

    @property
    def unadapted(self) -> list[str]:
        """What differs and cannot be adapted on the device (the crop, the resize filter), as ``X (student) vs Y (teacher)``."""
        differences = []
        source, target = self.source, self.target
        if source.crop_pct is not None and target.crop_pct is not None and not math.isclose(
                source.crop_pct, target.crop_pct, abs_tol=1e-3):
            differences.append(f"crop_pct {source.crop_pct:g} (student) vs {target.crop_pct:g} (teacher)")
        if source.interpolation and target.interpolation and source.interpolation != target.interpolation:
            differences.append(f"interpolation {source.interpolation} (student) vs {target.interpolation} (teacher)")
        return differences

    @property
    def is_identity(self) -> bool:
        """True when no batch of the source's size would be changed: the caller can skip the adapter."""
        return not self.affine and (self.target.size is None or self.target.size == self.source.size)

    def needs_resize(self, height: int, width: int) -> bool:
        return self.target.size is not None and (height, width) != tuple(self.target.size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values
        if self.affine:
            x = torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))
        if self.needs_resize(*x.shape[-2:]):
            x = F.interpolate(x, size=tuple(self.target.size), mode="bicubic", align_corners=False, antialias=True)
        return x

    def describe(self) -> str:
        parts = []
        if self.affine:
            parts.append(f"re-normalised from {self.source.describe()} to {self.target.describe()}")
        if self.target.size is not None and self.source.size is not None and self.source.size != self.target.size:
            parts.append(f"resized {self.source.size[0]}×{self.source.size[1]} → {self.target.size[0]}×{self.target.size[1]} "
                         "(bicubic, antialiased)")
        if self.unadapted:
            parts.append(f"not adapted: {', '.join(self.unadapted)}")
        return "; ".join(parts) if parts else "none (the teacher expects the student's inputs)"


def teacher_input_adapter(
    student_spec: Optional[InputSpec], teacher_spec: InputSpec, student_size: Optional[tuple[int, int]] = None
) -> Optional[InputAdapter]:
    """The map from the student's batches to the teacher's inputs, or ``None`` when they agree.

    ``student_size`` fills in the batch size when ``student_spec`` does not say it (the student's
    configured input size). Logs what is applied; warns when one side's normalisation is unknown, and
    with both specs when the crop or the resize filter differ (:attr:`InputAdapter.unadapted`; the
    adapter is then returned even if it changes nothing, so that the teacher check names them).
    """
    student_spec = student_spec or InputSpec()
    if student_spec.size is None and student_size is not None:
        student_spec = dataclasses.replace(student_spec, size=student_size)
    if student_spec.knows_normalisation != teacher_spec.knows_normalisation:
        logger.warning(
            "the %s's input normalisation is unknown: the teacher sees the student's batches as they are (give "
            "teacher_image_mean/std, or a processing_class for the student, if they differ)",
            "teacher" if not teacher_spec.knows_normalisation else "student",
        )
    adapter = InputAdapter(student_spec, teacher_spec)
    logger.info("teacher inputs: %s", adapter.describe())
    if adapter.unadapted:
        logger.warning(
            "the teacher was evaluated with other preprocessing than the student's evaluation batches: %s. A batch cannot "
            "be re-cropped or re-filtered on the device, so the teacher check and the teacher's evaluation score it on "
            "the student's crop, possibly below its own accuracy (student: %s; teacher: %s); --eval_crop_pct and "
            "--interpolation set the student's", "; ".join(adapter.unadapted), student_spec.describe(), teacher_spec.describe(),
        )
    return None if adapter.is_identity and not adapter.unadapted else adapter
