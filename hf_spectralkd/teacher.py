"""Any teacher for any student: the teacher's label order in the student's terms, and a check that it is any good.

* :func:`teacher_label_order` compares the two ``id2label`` maps by name (:mod:`.labels`: synsets,
  descriptions, repeated names). The same classes in another order give a gather index for the
  teacher's logits; different label sets are an error before training (logit distillation compares
  class distributions). Default names ("0", "1", …, "LABEL_0", …) say nothing about the classes:
  then only the counts are compared, with a warning.
* :func:`run_teacher` runs the frozen teacher on the student's batch: re-normalised and resized for
  the teacher (:class:`~hf_spectralkd.preprocessing.InputAdapter`), logits reordered.
* :func:`check_teacher` scores the teacher on a few evaluation images before the first step: a
  teacher near chance has the wrong normalisation, label order or weights, and would cost a run.
  The images are a seeded sample stratified by class (:func:`check_sample`): the first images of an
  imagefolder or a class-sorted split are all of one class, which a constant predictor gets right.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .features import extract_features, feature_forward_kwargs
from .labels import class_names, match_labels
from .utils import unwrap_model

logger = logging.getLogger(__name__)


class TeacherCheckError(ConfigurationError):
    """The teacher scores near chance on the evaluation images before training."""


def _num_labels(model: nn.Module) -> Optional[int]:
    return getattr(getattr(unwrap_model(model), "config", None), "num_labels", None)


def teacher_label_order(student: nn.Module, teacher: nn.Module) -> Optional[torch.Tensor]:
    """Indices ``order`` (``K``) such that ``teacher_logits[:, order]`` are in the student's class order.

    Returns ``None`` when the orders already agree (or nothing says otherwise). Names are matched by
    :func:`~hf_spectralkd.labels.match_labels` (synsets, descriptions, repeated names).

    Raises:
        ConfigurationError: different numbers of classes, named label sets that differ, or names that
            repeat when the orders differ.
    """
    n_student, n_teacher = _num_labels(student), _num_labels(teacher)
    if n_student is not None and n_teacher is not None and n_student != n_teacher:
        raise ConfigurationError(
            f"teacher and student have different numbers of classes: teacher {n_teacher}, student {n_student}; "
            "logit distillation needs the same label set (build the student with the teacher's id2label, or use "
            "distillation_type='none' for feature-only distillation)"
        )
    student_names, teacher_names = class_names(student), class_names(teacher)
    if student_names is None or teacher_names is None:
        logger.warning(
            "the %s has only default class names (0, 1, … or LABEL_0, …): the label orders of teacher and student "
            "cannot be compared, only their counts (%s); the teacher check before training catches a wrong order",
            "student" if student_names is None else "teacher", n_student,
        )
        return None
    match = match_labels(student_names, teacher_names, "student", "teacher")
    if match.is_identity:
        return None
    if match.missing:
        raise ConfigurationError(
            f"teacher and student have different label sets: the teacher has no class {list(match.missing)[:3]} of the "
            "student's; logit distillation needs the same classes (use the teacher's id2label for the student and "
            "data, or --distillation_type none for feature-only distillation)"
        )
    logger.info("teacher classes are in another order than the student's: its logits are reordered by name")
    return torch.tensor(match.source_index, dtype=torch.long)


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


def _labels_of(samples: Any) -> Optional[list[int]]:
    """The class of every sample of a map-style dataset, read without decoding an image, or ``None``."""
    from .data import TransformedImageDataset

    if isinstance(samples, TransformedImageDataset):
        return [int(label) for label in samples.dataset[samples.label_column]]
    labels = getattr(samples, "labels", None)
    if labels is not None and len(labels) == len(samples):
        return [int(label) for label in labels]
    return None


def check_sample(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """``min(count, N)`` indices of ``labels`` (``N``), drawn round-robin over the classes in a seeded order,
    each class's images in a seeded order: as many classes as ``count`` allows, about equally often."""
    generator = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    classes = [sorted(by_class)[i] for i in torch.randperm(len(by_class), generator=generator).tolist()]
    queues = [[by_class[c][i] for i in torch.randperm(len(by_class[c]), generator=generator).tolist()] for c in classes]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(count, len(labels)):
        chosen += [queue[depth] for queue in queues if depth < len(queue)][: count - len(chosen)]
        depth += 1
    return chosen


def check_teacher(
    teacher: nn.Module, samples: Any, count: int, device: torch.device, batch_size: int,
    inputs: Optional[nn.Module] = None, label_order: Optional[torch.Tensor] = None, seed: int = 0,
) -> tuple[float, int, int]:
    """Top-1 of the teacher on ``count`` samples of ``samples`` (a dataset of samples), stratified by class.

    A map-style dataset whose labels can be read without decoding (the recipe's evaluation split) gives
    :func:`check_sample`'s indices; another map-style dataset a seeded uniform sample; a stream its
    first ``count`` samples. Returns ``(top1, images scored, classes among them)``.
    """
    from .data import ImageClassificationCollator, pixel_batch

    collate = ImageClassificationCollator()  # no mixup: hard labels
    correct = scored = 0
    classes: set[int] = set()
    if isinstance(samples, torch.utils.data.IterableDataset):
        rows = list(islice(iter(samples), count))
    else:
        labels = _labels_of(samples)
        if labels is not None:
            indices = check_sample(labels, count, seed)
        else:
            generator = torch.Generator().manual_seed(seed)
            indices = torch.randperm(len(samples), generator=generator)[:count].tolist()
        rows = [samples[i] for i in indices]
    for start in range(0, len(rows), batch_size):
        batch = pixel_batch(collate(rows[start : start + batch_size]), device)  # encoded images: decoded on the device
        logits, _ = run_teacher(teacher, batch["pixel_values"].to(device), (), inputs, label_order)
        correct += int((logits.argmax(-1).cpu() == batch["labels"].cpu()).sum())
        scored += len(batch["labels"])
        classes.update(batch["labels"].cpu().tolist())
    return (correct / scored if scored else float("nan")), scored, len(classes)


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


def stop_if_near_chance(
    top1: float, scored: int, num_classes: int, inputs: Optional[nn.Module] = None, classes: Optional[int] = None
) -> None:
    """Log the teacher check's result and raise :class:`TeacherCheckError` below :func:`teacher_check_threshold`.

    ``classes``: how many classes the scored images cover (a check on one class cannot tell a constant
    predictor from a good teacher: warned).
    """
    threshold = teacher_check_threshold(num_classes)
    covered = f" of {classes} classes" if classes is not None else ""
    logger.info("teacher check: %.1f %% top-1 on %d evaluation images%s (chance %.1f %%)",
                100 * top1, scored, covered, 100 / num_classes)
    if classes is not None and classes < min(2, num_classes):
        logger.warning("teacher check: the %d images scored are all of one class, so a teacher that always answers "
                       "it would pass; give more --teacher_check_images or an evaluation split with more classes", scored)
    if top1 < threshold:
        adaptation = inputs.describe() if inputs is not None else "none"
        raise TeacherCheckError(
            f"teacher_check_images: the teacher scores {100 * top1:.1f} % top-1 on {scored} evaluation images{covered}, "
            f"below {100 * threshold:.1f} % (twice chance): its inputs or labels do not match the data. "
            f"Check its normalisation and preprocessing (input adaptation: {adaptation}; set --teacher_image_mean/"
            "--teacher_image_std), "
            "its label order (its id2label against the dataset's class names) and that the checkpoint is the one "
            "you meant; --teacher_check_images 0 skips this check"
        )
