"""The teacher of a run: which model, on which inputs, with which class order, placed how.

:func:`resolve_teacher` is where a run decides whether it has a teacher (required by a logit or
feature loss, refused with one line when missing), loads one given by id or folder, builds the input
adapter from the student's batches to what the teacher expects (:mod:`~hf_spectralkd.preprocessing`)
and the order that puts the teacher's logits in the student's classes (:mod:`~hf_spectralkd.teacher`).
:func:`place_teacher` prepares the frozen teacher for the launch mode (docs/design.md#teacher-placement):

* single device / DDP: ``accelerator.prepare_model(teacher, evaluation_mode=True)`` (device
  placement and the trainer's autocast, no DDP wrapper);
* DeepSpeed: its own inference engine, ZeRO-3 sharded when training is ZeRO-3, otherwise stage 0
  (a replica), as TRL does;
* FSDP2: sharded block by block with ``fully_shard`` (:mod:`.teacher_sharding`) in the student's precision,
  and kept out of accelerate's list of models.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConfigurationError
from ..features import describe_taps, model_family
from ..io.model_loading import LoadedModel, load_model
from ..preprocessing import (
    InputAdapter,
    InputSpec,
    configured_size,
    input_spec_of,
    spec_from_processor,
    teacher_input_adapter,
)
from ..teacher import check_teacher, stop_if_near_chance, teacher_label_order
from .scoring import DataClasses
from .teacher_sharding import shard_teacher_like_student

logger = logging.getLogger(__name__)


@dataclass
class ResolvedTeacher:
    """A run's teacher: ``model`` (``None`` without one), how it was loaded, its input adapter and class order."""

    model: Optional[nn.Module] = None
    info: Optional[LoadedModel] = None
    adapter: Optional[InputAdapter] = None
    label_order: Optional[torch.Tensor] = None


def resolve_teacher(teacher_model: Union[nn.Module, str, None], student: nn.Module, args: Any, teacher_kwargs: dict,
                    student_inputs: Optional[InputSpec], teacher_inputs: Optional[InputSpec],
                    processing_class: Any, classes: Optional[DataClasses] = None) -> ResolvedTeacher:
    """The teacher ``args`` needs, or the one an evaluation scores (see the module docstring); raises
    ``ConfigurationError`` before any training or evaluation."""
    scored_only = not args.do_train  # an evaluation: the teacher is scored, never distilled from
    if scored_only and teacher_model is None:
        return ResolvedTeacher()
    if not args.needs_teacher and not scored_only:
        if teacher_model is not None:
            logger.warning("teacher_model is ignored: distillation_type='none' and no feature loss (beta=0 or no layers)")
        return ResolvedTeacher()
    if teacher_model is None:
        raise ConfigurationError(
            f"teacher_model is required for distillation_type='{args.distillation_type}' (alpha={args.alpha}) "
            f"and beta={args.beta} with layers {args.teacher_layers}; pass a model, Hub id or folder, or set "
            "distillation_type='none' and beta=0 to train without one"
        )
    info = None
    if isinstance(teacher_model, str):
        info = load_model(teacher_model, argument="teacher_model", revision=args.teacher_revision,
                          trust_remote_code=args.trust_remote_code, **teacher_kwargs)
        teacher_model = info.model
    if not isinstance(teacher_model, nn.Module):
        raise TypeError(f"teacher_model must be an nn.Module, a Hub id or a folder, got {type(teacher_model).__name__}")
    if args.uses_features and not scored_only:
        model_family(teacher_model)
    if scored_only and classes is not None:
        label_order = classes.order_of("teacher", teacher_model)
    else:
        label_order = teacher_label_order(student, teacher_model) if args.uses_teacher_logits or scored_only else None
    teacher_inputs = teacher_inputs or input_spec_of(teacher_model, info.source if info else None, args.teacher_revision,
                                                     mean=args.teacher_image_mean, std=args.teacher_image_std)
    student_inputs = student_inputs or spec_from_processor(processing_class)
    adapter = teacher_input_adapter(student_inputs, teacher_inputs, configured_size(student))
    return ResolvedTeacher(teacher_model, info, adapter, label_order)


def check_teacher_before_training(trainer: Any) -> Optional[float]:
    """``trainer.check_teacher()``: the teacher's top-1 on ``args.teacher_check_images`` evaluation images (``None``
    when there is nothing to check), recorded in the summary; :class:`TeacherCheckError` near chance."""
    args = trainer.args
    if (args.teacher_check_images <= 0 or trainer.teacher is None or not args.uses_teacher_logits
            or trainer.eval_dataset is None or isinstance(trainer.eval_dataset, dict)):
        return None
    top1, scored, classes = check_teacher(
        trainer.teacher, trainer.eval_dataset, args.teacher_check_images, args.device, args.per_device_eval_batch_size,
        trainer.teacher_inputs, trainer.teacher_label_order, seed=args.seed,
    )
    trainer.summary.teacher_check_accuracy = top1
    num_labels = getattr(trainer.model.config, "num_labels", None) or 1
    stop_if_near_chance(top1, scored, num_labels, trainer.teacher_inputs, classes)
    return top1


def place_teacher(teacher: nn.Module, accelerator: Any, deepspeed: bool) -> nn.Module:
    """The frozen, eval-mode teacher prepared for the launch mode (see the module docstring), not compiled:
    ``--teacher_compile`` compiles its region (``training/compilation.py``)."""
    teacher.eval().requires_grad_(False)
    if deepspeed:
        return _deepspeed_teacher(teacher, accelerator)
    if accelerator.is_fsdp2:
        # Not through prepare_model: under FSDP it would add only autocast (the student's mixed-precision policy,
        # given to the teacher, casts already) and list the teacher among accelerate's models, whose FSDP
        # clip_grad_norm_ compares each one's parameter list with the student's: a teacher with as many
        # parameter tensors as the student makes that comparison raise.
        return shard_teacher_like_student(teacher, accelerator)
    teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    # With --torch_compile, prepare_model compiles every model it is given, in the student's mode; the teacher
    # keeps only its device placement and autocast (set on the module's forward before compiling).
    return getattr(teacher, "_orig_mod", teacher)


def _deepspeed_teacher(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """Frozen teacher engine: ZeRO-3 sharded under ZeRO-3 training, else a stage-0 replica (TRL's recipe)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) == 3:
        hidden = max(describe_taps(teacher).channels)
        zero.update(
            reduce_bucket_size=hidden * hidden,
            stage3_param_persistence_threshold=10 * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
        )
    else:
        zero["stage"] = 0
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
