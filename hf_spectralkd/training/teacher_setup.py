"""The teacher of a run: which model, on which inputs, with which class order, placed how.

:func:`resolve_teacher` is where a run decides whether it has a teacher (required by a logit or
feature loss, refused with one line when missing), loads one given by id or folder, builds the input
adapter from the student's batches to what the teacher expects (:mod:`~hf_spectralkd.preprocessing`)
and the order that puts the teacher's logits in the student's classes (:mod:`~hf_spectralkd.teacher`).
:func:`place_teacher` prepares the frozen teacher for the launch mode (docs/design.md#teacher-placement):

* single device / DDP: ``accelerator.prepare_model(teacher, evaluation_mode=True)`` (device
  placement and the trainer's autocast, no DDP wrapper);
* DeepSpeed: its own inference engine, ZeRO-3 sharded when training is ZeRO-3, otherwise stage 0
  (a replica), as TRL does.
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
from ..models import LoadedModel, load_model
from ..preprocessing import (
    InputAdapter,
    InputSpec,
    configured_size,
    input_spec_of,
    spec_from_processor,
    teacher_input_adapter,
)
from ..teacher import teacher_label_order

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
                    processing_class: Any) -> ResolvedTeacher:
    """The teacher ``args`` needs (see the module docstring); raises ``ConfigurationError`` before any training."""
    if not args.needs_teacher:
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
    if args.uses_features:
        model_family(teacher_model)
    label_order = teacher_label_order(student, teacher_model) if args.uses_teacher_logits else None
    teacher_inputs = teacher_inputs or input_spec_of(teacher_model, info.source if info else None, args.teacher_revision,
                                                     mean=args.teacher_image_mean, std=args.teacher_image_std)
    student_inputs = student_inputs or spec_from_processor(processing_class)
    adapter = teacher_input_adapter(student_inputs, teacher_inputs, configured_size(student))
    return ResolvedTeacher(teacher_model, info, adapter, label_order)


def place_teacher(teacher: nn.Module, accelerator: Any, deepspeed: bool) -> nn.Module:
    """The frozen, eval-mode teacher prepared for the launch mode (see the module docstring), not compiled:
    ``--teacher_compile`` compiles its region (``training/compilation.py``)."""
    teacher.eval().requires_grad_(False)
    if deepspeed:
        return _deepspeed_teacher(teacher, accelerator)
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
