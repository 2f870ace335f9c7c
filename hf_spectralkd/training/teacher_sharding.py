"""The frozen teacher sharded with FSDP2 when the student trains under FSDP2.

accelerate's FSDP2 path prepares one model together with its optimizer, and
``prepare_model(teacher, evaluation_mode=True)`` neither shards nor moves a model under FSDP: a
teacher left to it would stay whole, on the CPU, on every process. :func:`shard_teacher` shards it
here with torch's ``fully_shard``: each of its repeated blocks (:func:`teacher_blocks`) is one FSDP
unit and the root holds the rest (embeddings of families that do not list them, final norm, head).
Each process then keeps about ``1/N`` of the teacher's parameters; a forward gathers one unit at a
time and frees it again after the unit has run (``reshard_after_forward=True`` on every unit, the
root included: the teacher has no backward pass that would reuse the gathered parameters).

The teacher stays in eval mode without gradients and is never given to the optimizer or saved:
the Trainer only knows the student.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn

logger = logging.getLogger(__name__)


def teacher_blocks(model: nn.Module) -> list[nn.Module]:
    """The units a teacher is sharded by, outermost first.

    The modules whose class transformers lists in ``model._no_split_modules`` (ViT/DeiT: embeddings and
    layers; Swin: stages) when there are at least two of them; otherwise (a timm model behind
    ``TimmWrapperForImageClassification``, whose list names only the whole backbone) the encoder layers:
    the children of the longest ``ModuleList``/``Sequential`` whose children all share one class.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    listed = [module for module in model.modules() if module is not model and type(module).__name__ in names]
    if len(listed) >= 2:
        return listed
    stacks = [module for module in model.modules() if isinstance(module, (nn.ModuleList, nn.Sequential))
              and len(module) >= 2 and len({type(child) for child in module}) == 1]
    return list(max(stacks, key=len)) if stacks else []


def shard_teacher(teacher: nn.Module, mesh: Optional[Any] = None, mp_policy: Optional[Any] = None) -> nn.Module:
    """Shard the frozen ``teacher`` in place over ``mesh`` (default: all processes) and return it.

    ``mp_policy``: the student's ``MixedPrecisionPolicy`` (accelerate's), so both gather their
    parameters in the same precision; default full precision.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    teacher.eval().requires_grad_(False)
    options = {"mesh": mesh, "reshard_after_forward": True, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    # Innermost first: fully_shard on a module leaves the parameters of units already sharded below it alone.
    for block in reversed(teacher_blocks(teacher)):
        fully_shard(block, **options)
    fully_shard(teacher, **options)
    return teacher


def shard_teacher_like_student(teacher: nn.Module, accelerator: Any) -> nn.Module:
    """:func:`shard_teacher` over the student's FSDP mesh and mixed-precision policy (accelerate's)."""
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        mesh = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    whole = sum(p.numel() for p in teacher.parameters())
    units = len(teacher_blocks(teacher)) + 1
    teacher = shard_teacher(teacher, mesh, accelerator.state.fsdp_plugin.mixed_precision_policy)
    logger.info("Teacher sharded with FSDP2 in %d units: this process holds %s of its %s parameters", units,
                f"{local_numel(teacher):,}", f"{whole:,}")
    return teacher


def local_numel(model: nn.Module) -> int:
    """Parameter elements this process holds: its shard of each sharded parameter, all of any other."""
    return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
