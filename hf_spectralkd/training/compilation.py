"""How a run compiles: a teacher region and a student region, each traced as one graph (a part of the trainer).

The regions (``--teacher_compile MODE`` and transformers' ``--torch_compile`` / ``--torch_compile_mode``):

* teacher: input adapter, forward with the tapped hidden states, the taps as maps and the label order,
  under ``no_grad`` (:func:`~hf_spectralkd.teacher.run_teacher`);
* student: forward with its taps, the maps and the whole objective (:func:`student_objective`).

Why two regions rather than one compiled step, and why they break nowhere (``torch._dynamo.explain``,
tiny ViT / Swin / timm CaiT, transformers 5.23, torch 2.14, tests/test_compilation.py):

* transformers installs a model's output-capturing hooks on its first forward that asks for hidden
  states, under a ``threading.Lock`` that Dynamo cannot enter ("Unsupported context manager"). Traced
  inside a compiled region that first forward splits it: one step compiled as one function measured
  6 graphs (ViT) and 9 (Swin). :func:`install_output_hooks` installs them before anything is compiled;
  then the whole step, and each region, is one graph for every family.
* Both forms are then break-free; the per-model regions are kept because they compose with the
  launch modes (the teacher is never wrapped; under DDP, FSDP or DeepSpeed the student's wrapper is
  what must run) and each model gets its own mode: a frozen teacher has no backward, so CUDA graphs
  (``reduce-overhead``, ``max-autotune``) suit it even when the student's step does not.
* A DDP student called inside a compiled function measured 2 graphs and 1 break, while accelerate's
  ``torch.compile(DDP(model))`` is one graph. So the student region is compiled only on a single
  device; with several processes (or DeepSpeed, FSDP) ``--torch_compile`` is accelerate's compile of
  the wrapped model and the taps and the loss run eagerly after it.

Nothing in a region reads a tensor on the host or changes shape from step to step (which would
break the graph, or re-record CUDA graphs). What does stays outside, in ``compute_loss`` and after it:
the image counts (host integers from the collator), the non-finite watch (device-side ``where``; read
at logs and saves), the logging sums (started from a copy, never an alias of a CUDA-graph output, which
the next replay overwrites) and the preemption check (after the optimizer step; one all-reduce with
several processes).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..features import extract_features, feature_forward_kwargs
from ..losses import distillation_objective
from ..teacher import run_teacher
from ..utils import unwrap_model

#: Modes that capture CUDA graphs: their outputs are overwritten by the next replay.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def student_objective(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                      teacher_logits: Optional[torch.Tensor], teacher_maps: Sequence[torch.Tensor],
                      layers: Sequence[int], loss_options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student region: forward (``pixel_values`` ``B×3×S×S``), taps ``layers``, objective.

    Returns ``(total loss, components (ce, kd, feature) as a float32 3-vector, detached, logits B×K)``.
    """
    outputs = model(pixel_values=pixel_values, **feature_forward_kwargs(model, layers))
    student_maps = extract_features(model, outputs, layers) if layers else []
    losses = distillation_objective(outputs.logits, labels, teacher_logits, student_maps, teacher_maps, **loss_options)
    components = torch.stack([losses.ce.detach(), losses.kd.detach(), losses.feature.detach()]).float()
    return losses.total, components, outputs.logits


def install_output_hooks(model: nn.Module) -> None:
    """Install transformers' output-capturing hooks of every model inside ``model`` now, outside any compiled region."""
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import maybe_install_capturing_hooks

    for module in unwrap_model(model).modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


def compiled(function: Callable, mode: Optional[str], backend: Optional[str]) -> Callable:
    """``torch.compile(function)`` with ``mode`` (only inductor takes one; ``"default"`` is inductor's default)."""
    backend = backend or "inductor"
    options = {"mode": mode} if backend == "inductor" and mode not in (None, "default") else {}
    return torch.compile(function, backend=backend, **options)


class CompiledStep:
    """The regions of one training step, compiled as the arguments ask, and the calls around them.

    Args:
        args: the run's arguments (``torch_compile``, ``torch_compile_mode``, ``torch_compile_backend``,
            ``teacher_compile``).
        single_device: whether the student is used unwrapped by DDP, FSDP or DeepSpeed (see the module docstring).
    """

    def __init__(self, args: Any, single_device: bool):
        self.teacher_mode: Optional[str] = args.teacher_compile
        self.student_mode: Optional[str] = (args.torch_compile_mode or "default") if args.torch_compile else None
        self.student_region = single_device and self.student_mode is not None
        self.teacher = compiled(run_teacher, self.teacher_mode, args.torch_compile_backend) \
            if self.teacher_mode else run_teacher
        self.student = compiled(student_objective, self.student_mode, args.torch_compile_backend) \
            if self.student_region else student_objective
        self._cuda_graphs = any(m in CUDA_GRAPH_MODES for m in (self.teacher_mode, self.student_mode))

    def prepare(self, *models: Optional[nn.Module]) -> None:
        """Install the models' output hooks before their first compiled call (see the module docstring)."""
        if self.teacher_mode or self.student_mode:
            for model in models:
                if model is not None:
                    install_output_hooks(model)

    def begin_step(self) -> None:
        """Tell CUDA graph trees a new step begins, so the previous step's outputs may be overwritten."""
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def describe(self) -> Optional[str]:
        """What was compiled, for the model card (``None`` when nothing was)."""
        parts = [f"student (forward, taps and loss; mode {self.student_mode})" if self.student_region else
                 f"student forward (mode {self.student_mode})" if self.student_mode else None,
                 f"teacher (forward and taps; mode {self.teacher_mode})" if self.teacher_mode else None]
        parts = [p for p in parts if p]
        return "torch.compile: " + ", ".join(parts) if parts else None
