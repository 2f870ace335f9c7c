"""One typed record of a run, from which ``results.json`` and the model card are both rendered.

:class:`RunSummary` holds what a reader of either needs: the teacher (by Hub id and resolved
revision, or by folder name), the student, sizes, data, the layer map, the loss weights, the
schedule and the results. The trainer keeps one (``trainer.summary``) and refreshes its results
from the Trainer state at every save; the recipe fills in what only it knows (the teacher's
accuracy, the profile similarity, the wall time) and writes ``results.json`` from the same object.

Nothing here publishes a local path: :func:`public_name` turns a local folder or file into its
folder name, while Hub ids, built-in architecture names and ``demo:`` datasets stay as they are.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ..utils import num_parameters, unwrap_model


def public_name(value: Optional[str]) -> Optional[str]:
    """A name safe to publish: a local path becomes its folder name (``config.json`` → its folder)."""
    if not value:
        return value
    text = str(value)
    path = Path(os.path.expanduser(text))
    looks_local = path.exists() or os.path.isabs(text) or text.startswith(("./", "../", "~", "."))
    if not looks_local:
        return text  # a Hub id, a built-in architecture or a demo dataset
    if path.is_file() or path.suffix in (".json", ".yaml", ".yml"):
        path = path.parent
    return path.resolve().name or text


def _precision(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def _schedule_name(args) -> str:
    if args.lr_schedule == "deit":
        return "deit"
    return str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))


@dataclass
class RunSummary:
    """What was distilled from what, how, and with which result. Field names are ``results.json``'s keys."""

    # --- models ---
    student: Optional[str]
    student_kind: str  # "pretrained" (weights loaded) or "scratch"
    student_architecture: str
    student_parameters: int
    num_classes: Optional[int]
    student_model_type: Optional[str] = None  # config.model_type: the card's usage notes depend on it
    teacher: Optional[str] = None
    teacher_revision: Optional[str] = None
    teacher_architecture: Optional[str] = None
    teacher_parameters: Optional[int] = None
    license: Optional[str] = None
    # --- data ---
    dataset: Optional[str] = None
    eval_split: Optional[str] = None
    # --- objective ---
    distillation_type: str = "soft"
    alpha: float = 0.9
    beta: float = 0.2
    temperature: float = 1.0
    feature_loss: str = "fft"
    label_smoothing: float = 0.1
    layer_map: list[dict[str, Any]] = field(default_factory=list)
    # --- schedule ---
    num_train_epochs: Optional[float] = None
    max_steps: Optional[int] = None
    per_device_train_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    learning_rate: Optional[float] = None  # the rate used (after --scale_lr)
    base_learning_rate: Optional[float] = None  # --learning_rate before --scale_lr, when scaled
    lr_schedule: Optional[str] = None
    weight_decay: Optional[float] = None
    precision: Optional[str] = None
    compilation: Optional[str] = None  # what torch.compile compiled (training/compilation.py), None: eager
    seed: Optional[int] = None
    # --- results ---
    teacher_check_accuracy: Optional[float] = None  # top-1 on a class-stratified sample of evaluation images, before training
    teacher_accuracy: Optional[float] = None
    teacher_top5: Optional[float] = None
    student_accuracy: Optional[float] = None
    student_top5: Optional[float] = None
    # 95 % percentile-bootstrap intervals over the evaluation images, [low, high] (hf_spectralkd.metrics)
    student_top1_ci: Optional[list[float]] = None
    student_top5_ci: Optional[list[float]] = None
    best_student_accuracy: Optional[float] = None
    global_steps: Optional[int] = None
    epochs: Optional[float] = None
    train_runtime_s: Optional[float] = None
    skipped_images: int = 0  # training images that could not be decoded (whole run, all processes)
    train_images: Optional[int] = None  # training images read, decodable or not (the denominator of skipped_images)
    eval_images: Optional[int] = None  # images the last evaluation scored (the accuracies' denominator)
    eval_skipped_images: Optional[int] = None  # images of the eval split that could not be decoded, not scored
    profile_similarity: Optional[dict[str, float]] = None
    wall_time_s: Optional[float] = None

    @classmethod
    def describe(
        cls,
        args,
        student,
        teacher=None,
        layer_map: Sequence = (),
        *,
        student_source: Optional[str] = None,
        student_kind: str = "scratch",
        teacher_source: Optional[str] = None,
        teacher_revision: Optional[str] = None,
        dataset: Optional[str] = None,
        eval_split: Optional[str] = None,
        license: Optional[str] = None,
    ) -> "RunSummary":
        """The static part of a run: models, data, objective and schedule (results empty)."""
        student_model = unwrap_model(student)
        teacher_model = unwrap_model(teacher) if teacher is not None else None
        if teacher_model is not None and teacher_source is None:
            teacher_source = getattr(getattr(teacher_model, "config", None), "_name_or_path", None) or "custom teacher"
        if student_source is None:
            student_source = getattr(getattr(student_model, "config", None), "_name_or_path", None) or None
        return cls(
            student=public_name(student_source),
            student_kind=student_kind,
            student_architecture=type(student_model).__name__,
            student_parameters=num_parameters(student_model),
            num_classes=getattr(getattr(student_model, "config", None), "num_labels", None),
            student_model_type=getattr(getattr(student_model, "config", None), "model_type", None),
            teacher=public_name(teacher_source) if teacher_model is not None else None,
            teacher_revision=teacher_revision if teacher_model is not None else None,
            teacher_architecture=type(teacher_model).__name__ if teacher_model is not None else None,
            teacher_parameters=num_parameters(teacher_model) if teacher_model is not None else None,
            license=license,
            dataset=public_name(dataset),
            eval_split=eval_split,
            distillation_type=args.distillation_type,
            alpha=args.alpha,
            beta=args.beta,
            temperature=args.temperature,
            feature_loss=args.feature_loss,
            label_smoothing=args.label_smoothing_factor,
            layer_map=layer_map_record(layer_map),
            num_train_epochs=args.num_train_epochs,
            max_steps=args.max_steps,
            per_device_train_batch_size=args.per_device_train_batch_size,
            global_batch_size=args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps,
            learning_rate=args.learning_rate,
            base_learning_rate=args.base_learning_rate if args.scale_lr else None,
            lr_schedule=_schedule_name(args),
            weight_decay=args.weight_decay,
            precision=_precision(args),
            seed=args.seed,
        )

    @property
    def distilled(self) -> bool:
        return self.teacher is not None

    def record_evaluation(self, metrics: dict[str, float]) -> None:
        """The student's accuracies, their intervals and image counts from one evaluation's ``eval_*`` metrics."""
        self.student_accuracy, self.student_top5 = metrics.get("eval_top1"), metrics.get("eval_top5")
        self.student_top1_ci, self.student_top5_ci = (
            [metrics[f"eval_{name}_ci_low"], metrics[f"eval_{name}_ci_high"]] if f"eval_{name}_ci_low" in metrics else None
            for name in ("top1", "top5"))
        self.eval_images = metrics.get("eval_images", self.eval_images)
        self.eval_skipped_images = metrics.get("eval_skipped_images", self.eval_skipped_images)

    def record_training_state(self, state) -> None:
        """Steps, epochs and the student's accuracies so far, from a ``TrainerState``."""
        evaluations = [entry for entry in state.log_history if "eval_top1" in entry]
        if evaluations:
            self.record_evaluation(evaluations[-1])
            self.best_student_accuracy = max(entry["eval_top1"] for entry in evaluations)
        trained = [entry for entry in state.log_history if "train_images" in entry]
        if trained:  # the totals at the last log; record_image_counts gives the final ones
            self.train_images = max(self.train_images or 0, trained[-1]["train_images"])
            self.skipped_images = max(self.skipped_images, trained[-1]["skipped_images"])
        self.global_steps = state.global_step
        self.epochs = state.epoch
        if state.max_steps:
            self.max_steps = state.max_steps

    def record_image_counts(self, train_images: int, skipped_images: int) -> None:
        """The training image totals of the whole run (``trainer.training_image_counts()``)."""
        self.train_images, self.skipped_images = int(train_images), int(skipped_images)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write_json(self, path: str) -> None:
        """Write ``results.json`` atomically (a crash never leaves half a file)."""
        write_json_atomic(path, self.to_dict())


def write_json_atomic(path: str, payload: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp, path)


def layer_map_record(layer_map: Sequence) -> list[dict[str, Any]]:
    """The layer pairs as the summary records them (student/teacher index and feature-map shapes)."""
    return [{"student": p.student, "teacher": p.teacher, "student_shape": list(p.student_shape),
             "teacher_shape": list(p.teacher_shape)} for p in layer_map]
