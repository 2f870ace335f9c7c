"""What a trainer scores against: the data's classes (a part of the trainer).

Training never needs this: the recipe loads the student with the data's classes (its head put in
their order by :func:`~hf_spectralkd.labels.match_head_to_labels`), and the teacher's logits are put
in the student's order by :func:`~hf_spectralkd.training.teacher_setup.resolve_teacher`. An evaluation
alone (``args.do_train`` false) trains nothing and keeps each model's own head, so the trainer checks
both models against the data instead, in the same functions:

* :meth:`DataClasses.order_of`: a model predicts as many classes as the data has (else one line naming
  the argument), and the index that puts its logits in the data's order (by class name, as a teacher's);
* :func:`evaluation_only`: the student wrapped in that order, and arguments that distil nothing;
* :func:`score_classifier`: top-1/top-5 of another classifier (the teacher) on the trainer's evaluation split.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigurationError
from ..teacher import TeacherClassifier, teacher_label_order

#: An evaluation alone distils nothing, resumes nothing and pushes nothing.
EVALUATION_ONLY = dict(distillation_type="none", beta=0.0, layer_map="manual", student_layers=None,
                       teacher_layers=None, push_to_hub=False, resume_from_checkpoint=None, eval_with_teacher=False)


@dataclasses.dataclass(frozen=True)
class DataClasses:
    """The classes of the data a run scores on: ``id2label`` (``K`` names) and the data set's name, for messages."""

    id2label: dict[int, str]
    dataset: str = "the data"

    def order_of(self, argument: str, model: nn.Module) -> Optional[torch.Tensor]:
        """Indices ``order`` (``K``) such that ``model``'s ``logits[:, order]`` are in the data's class order
        (``None``: already in it); :class:`ConfigurationError` naming ``argument`` when the counts differ."""
        num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        count = len(self.id2label)
        if num_labels is not None and num_labels != count:
            raise ConfigurationError(
                f"{argument}: the {argument} predicts {num_labels} classes but dataset '{self.dataset}' has {count}; "
                f"evaluate it on the data set it was trained for (or a --{argument} trained on these {count} classes)"
            )
        # The data's names in the shape teacher_label_order compares (a model's config).
        labels_only = SimpleNamespace(config=SimpleNamespace(id2label=self.id2label, num_labels=count))
        return teacher_label_order(labels_only, model)


def evaluation_only(model: nn.Module, args: Any, classes: Optional[DataClasses], summary: Any = None
                    ) -> tuple[nn.Module, Any]:
    """``(model, args)`` as a trainer uses them: unchanged when training; for an evaluation alone, the student
    checked against ``classes`` and wrapped to score in their order, and ``args`` that distil nothing (which
    ``summary``, a :class:`~hf_spectralkd.io.run_summary.RunSummary` given, then records)."""
    if args.do_train:
        return model, args
    order = classes.order_of("student", model) if classes is not None else None
    model = model if order is None else TeacherClassifier(model, None, order)
    if summary is not None:
        summary.distillation_type, summary.beta, summary.layer_map = "none", 0.0, []
    return model, dataclasses.replace(args, **EVALUATION_ONLY)


def score_classifier(trainer: Any, classifier: nn.Module) -> dict[str, float]:
    """Top-1/top-5 (``{"top1", "top5", ...}``) of ``classifier`` on ``trainer``'s evaluation split, batched and
    sharded as the trainer evaluates, by a trainer of the same class that distils nothing."""
    scorer = type(trainer)(model=classifier, args=dataclasses.replace(trainer.args, **EVALUATION_ONLY, report_to=[]),
                           eval_dataset=trainer.eval_dataset, data_collator=trainer.data_collator,
                           processing_class=trainer.processing_class)
    metrics = scorer.evaluate(metric_key_prefix="teacher")
    return {key.removeprefix("teacher_"): value for key, value in metrics.items()}
