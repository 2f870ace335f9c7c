"""Any teacher for any student: the teacher's label order in the student's terms, and a check that it is any good.

* :func:`teacher_label_order` compares the two ``id2label`` maps by name. The same classes in
  another order give a gather index for the teacher's logits; different label sets are an error
  before training (logit distillation compares class distributions). Default names ("0", "1", …,
  "LABEL_0", …) say nothing about the classes: then only the counts are compared, with a warning.
  ImageNet synset ids (``n01440764``) and their descriptions (``tench, Tinca tinca``, what
  transformers' checkpoints and the Hub's ImageNet use) are the same class.
* :func:`run_teacher` runs the frozen teacher on the student's batch: re-normalised and resized for
  the teacher (:class:`~hf_spectralkd.preprocessing.InputAdapter`), logits reordered.
* :func:`check_teacher` scores the teacher on a few evaluation images before the first step: a
  teacher near chance has the wrong normalisation, label order or weights, and would cost a run.
"""

from __future__ import annotations

import logging
import re
from itertools import islice
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .features import extract_features, feature_forward_kwargs
from .utils import unwrap_model

logger = logging.getLogger(__name__)

_DEFAULT_NAME = re.compile(r"^(label_)?\d+$", re.IGNORECASE)
_SYNSET = re.compile(r"^n\d{8}$")


class TeacherCheckError(ConfigurationError):
    """The teacher scores near chance on the evaluation images before training."""


def label_names(model: nn.Module) -> Optional[list[str]]:
    """The model's class names in output order, or ``None`` when they are only default names."""
    config = getattr(unwrap_model(model), "config", None)
    id2label = getattr(config, "id2label", None) or {}
    if not id2label:
        return None
    names = [str(id2label[key]) for key in sorted(id2label, key=int)]
    if all(_DEFAULT_NAME.match(name.strip()) for name in names):
        return None
    return [_canonical(name) for name in _synsets_to_descriptions(names)]


def _canonical(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _synsets_to_descriptions(names: list[str]) -> list[str]:
    if not all(_SYNSET.match(name) for name in names):
        return names
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    descriptions = {info.index_to_label_name(i): info.index_to_description(i) for i in range(info.num_classes())}
    return [descriptions.get(name, name) for name in names]


def _num_labels(model: nn.Module) -> Optional[int]:
    return getattr(getattr(unwrap_model(model), "config", None), "num_labels", None)


def teacher_label_order(student: nn.Module, teacher: nn.Module) -> Optional[torch.Tensor]:
    """Indices ``order`` (``K``) such that ``teacher_logits[:, order]`` are in the student's class order.

    Returns ``None`` when the orders already agree (or nothing says otherwise).

    Raises:
        ConfigurationError: different numbers of classes, or named label sets that differ.
    """
    n_student, n_teacher = _num_labels(student), _num_labels(teacher)
    if n_student is not None and n_teacher is not None and n_student != n_teacher:
        raise ConfigurationError(
            f"teacher and student have different numbers of classes: teacher {n_teacher}, student {n_student}; "
            "logit distillation needs the same label set (build the student with the teacher's id2label, or use "
            "distillation_type='none' for feature-only distillation)"
        )
    student_names, teacher_names = label_names(student), label_names(teacher)
    if student_names is None or teacher_names is None:
        logger.warning(
            "the %s has only default class names (0, 1, … or LABEL_0, …): the label orders of teacher and student "
            "cannot be compared, only their counts (%s); the teacher check before training catches a wrong order",
            "student" if student_names is None else "teacher", n_student,
        )
        return None
    if student_names == teacher_names:
        return None
    position = {name: index for index, name in enumerate(teacher_names)}
    if len(position) != len(teacher_names) or set(position) != set(student_names):
        missing = [name for name in student_names if name not in position][:3]
        raise ConfigurationError(
            f"teacher and student have different label sets: the teacher has no class {missing or '…'} of the "
            "student's; logit distillation needs the same classes (use the teacher's id2label for the student and "
            "data, or --distillation_type none for feature-only distillation)"
        )
    logger.info("teacher classes are in another order than the student's: its logits are reordered by name")
    return torch.tensor([position[name] for name in student_names], dtype=torch.long)


def run_teacher(
    teacher: nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[int] = (),
    inputs: Optional[nn.Module] = None,
    label_order: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Teacher logits ``B×K`` (student's class order) and the maps of ``layers``, under ``no_grad``.

    Only the logits and the requested maps outlive the call: the other block outputs an HF model
    returns are dropped before the caller runs the student.
    """
    with torch.no_grad():
        if inputs is not None:
            pixel_values = inputs(pixel_values)
        outputs = teacher(pixel_values=pixel_values, **feature_forward_kwargs(teacher, layers))
        logits = outputs.logits
        if label_order is not None:
            logits = logits.index_select(-1, label_order.to(logits.device))
        maps = extract_features(teacher, outputs, layers) if layers else []
        del outputs
    return logits, maps


def check_teacher(
    teacher: nn.Module, samples: Any, count: int, device: torch.device, batch_size: int,
    inputs: Optional[nn.Module] = None, label_order: Optional[torch.Tensor] = None,
) -> tuple[float, int]:
    """Top-1 of the teacher on the first ``count`` samples of ``samples`` (a dataset of samples).

    Returns ``(top1, images scored)``.
    """
    from .data import ImageClassificationCollator, pixel_batch

    collate = ImageClassificationCollator()  # no mixup: hard labels
    correct = scored = 0
    if isinstance(samples, torch.utils.data.IterableDataset):
        rows = list(islice(iter(samples), count))
    else:
        rows = [samples[i] for i in range(min(count, len(samples)))]
    for start in range(0, len(rows), batch_size):
        batch = pixel_batch(collate(rows[start : start + batch_size]), device)  # encoded images: decoded on the device
        logits, _ = run_teacher(teacher, batch["pixel_values"].to(device), (), inputs, label_order)
        correct += int((logits.argmax(-1).cpu() == batch["labels"].cpu()).sum())
        scored += len(batch["labels"])
    return (correct / scored if scored else float("nan")), scored


class TeacherClassifier(nn.Module):
    """The teacher as an image classifier of the student's data: adapted inputs, logits in the student's order.

    Used to evaluate the teacher on the student's evaluation split with the Trainer (sharded over
    processes like any evaluation); ``config`` is the teacher's.
    """

    def __init__(self, teacher: nn.Module, inputs: Optional[nn.Module] = None, label_order: Optional[torch.Tensor] = None):
        super().__init__()
        self.teacher, self.inputs = teacher, inputs
        self.config = unwrap_model(teacher).config
        self.register_buffer("label_order", label_order, persistent=False)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None, **_: Any):
        # ``labels`` is in the signature so that the Trainer passes them on and computes metrics.
        from transformers.modeling_outputs import ImageClassifierOutput

        logits, _ = run_teacher(self.teacher, pixel_values, (), self.inputs, self.label_order)
        return ImageClassifierOutput(logits=logits)


def teacher_check_threshold(num_classes: int) -> float:
    """Twice chance; capped at 75 % so that a two-class teacher is not asked to be perfect."""
    return min(2.0 / max(num_classes, 1), 0.75)


def stop_if_near_chance(top1: float, scored: int, num_classes: int, inputs: Optional[nn.Module] = None) -> None:
    """Log the teacher check's result and raise :class:`TeacherCheckError` below :func:`teacher_check_threshold`."""
    threshold = teacher_check_threshold(num_classes)
    logger.info("teacher check: %.1f %% top-1 on the first %d evaluation images (chance %.1f %%)",
                100 * top1, scored, 100 / num_classes)
    if top1 < threshold:
        adaptation = inputs.describe() if inputs is not None else "none"
        raise TeacherCheckError(
            f"teacher_check_images: the teacher scores {100 * top1:.1f} % top-1 on the first {scored} evaluation "
            f"images, below {100 * threshold:.1f} % (twice chance): its inputs or labels do not match the data. "
            f"Check its normalisation (input adaptation: {adaptation}; set --teacher_image_mean/--teacher_image_std), "
            "its label order (its id2label against the dataset's class names) and that the checkpoint is the one "
            "you meant; --teacher_check_images 0 skips this check"
        )
