"""``SpectralDistillationConfig``: ``TrainingArguments`` plus the SpectralKD hyperparameters.

Defaults follow METHOD.md §3.3 (the paper's DeiT setting): ``alpha=0.9``, ``temperature=1``,
``beta=0.2`` (the *effective* feature weight; the Swin preset uses 0.05), ``label_smoothing=0.1``,
soft KD, FFT feature loss.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from transformers import TrainingArguments

DISTILLATION_TYPES = ("soft", "hard", "none")
FEATURE_LOSSES = ("fft", "mse")
LR_SCHEDULES = ("trainer", "deit")


def parse_layer_list(value: Any, argument: str) -> Union[list[int], str, None]:
    """Normalise a layer list given as ints, strings, ``"0,1,18"`` or ``"auto"``.

    Returns a list of ints, the string ``"auto"`` or ``None``; raises ``ValueError`` naming ``argument``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    items: list[str] = []
    for item in value:
        if isinstance(item, str):
            items.extend(part for part in item.replace(",", " ").split() if part)
        else:
            items.append(item)
    if len(items) == 1 and isinstance(items[0], str) and items[0].lower() in ("auto", "none"):
        return "auto" if items[0].lower() == "auto" else None
    layers = []
    for item in items:
        if isinstance(item, bool):
            item = str(item)
        try:
            layer = int(item)
        except (TypeError, ValueError):
            raise ValueError(
                f"{argument}: expected 0-based block indices (e.g. 0 1 18 19) or 'auto', got {value!r}"
            ) from None
        if isinstance(item, float) and item != layer:
            raise ValueError(f"{argument}: block indices must be integers, got {item!r}")
        if layer < 0:
            raise ValueError(f"{argument}: block indices are 0-based and must be >= 0, got {layer}")
        layers.append(layer)
    return layers


def _check_number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    below = value <= low if low_open else value < low
    if below or value > high:
        bracket = "(" if low_open else "["
        upper = "inf)" if math.isinf(high) else f"{high}]"
        raise ValueError(f"{name} must be in {bracket}{low}, {upper}, got {value}")


@dataclass
class SpectralDistillationConfig(TrainingArguments):
    """Training arguments for :class:`~hf_spectralkd.SpectralDistillationTrainer`.

    The objective is ``(1-alpha)·CE_ε + alpha·KD + beta·L_feat`` (METHOD.md §3.3). With
    ``distillation_type="none"`` there is no logit-KD term and the loss is ``CE_ε + beta·L_feat``:
    set ``beta=0`` too for the no-teacher baseline.
    """

    alpha: float = field(
        default=0.9,
        metadata={"help": "Weight of the logit-distillation term, in [0, 1]; the cross-entropy gets 1 - alpha."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature T of soft KD (> 0). The KL term is multiplied by T^2."},
    )
    beta: float = field(
        default=0.2,
        metadata={
            "help": "Effective weight of the pair-averaged feature loss (>= 0): the paper's beta, i.e. the reference "
            "code's beta * w_fft. 0.2 for DeiT students, 0.05 for the Swin preset; 0 disables feature distillation."
        },
    )
    distillation_type: str = field(
        default="soft",
        metadata={
            "help": "Logit distillation: 'soft' (T^2 * KL to the teacher's softened probabilities), 'hard' "
            "(cross-entropy to the teacher's argmax) or 'none' (no logit KD)."
        },
    )
    feature_loss: str = field(
        default="fft",
        metadata={
            "help": "Feature loss on the paired layers: 'fft' (SpectralKD: MSE of ortho rfft2 spectra) or 'mse' "
            "(spatial MSE after the same channel pooling)."
        },
    )
    student_layers: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "0-based student block (Swin: stage) indices to distil, paired by position with "
            "--teacher_layers, e.g. '0 1 6 7 8 9 10 11' for DeiT-Tiny. Empty: no feature loss."
        },
    )
    teacher_layers: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "0-based teacher block (Swin: stage) indices, same length as --student_layers, e.g. "
            "'0 1 18 19 20 21 22 23' for CaiT-S24. 'auto' chooses the whole map (student layers too) from the "
            "teacher's spectral profile on one evaluation batch (hf_spectralkd.analysis.select_layers)."
        },
    )
    label_smoothing: float = field(
        default=0.1,
        metadata={"help": "Label smoothing epsilon of the base cross-entropy on hard labels, in [0, 1)."},
    )
    teacher_revision: Optional[str] = field(
        default=None,
        metadata={"help": "Branch, tag or commit of the teacher on the Hub when it is given by id."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the Hub to run when loading models by id. Off by default."},
    )
    teacher_compile: bool = field(
        default=False,
        metadata={"help": "Compile the teacher's forward with torch.compile (GPU; first steps are slower)."},
    )
    eval_with_teacher: bool = field(
        default=True,
        metadata={
            "help": "Run the teacher during evaluation to report eval_loss_kd / eval_loss_fft. Disable to halve "
            "evaluation time; eval_loss is then the cross-entropy alone."
        },
    )
    stop_on_nonfinite_loss: bool = field(
        default=True,
        metadata={
            "help": "Stop with an error naming the step and the loss component when a loss term is NaN or infinite, "
            "before the optimizer step (the last checkpoint stays intact)."
        },
    )
    cpu_malloc_tuning: bool = field(
        default=True,
        metadata={
            "help": "When training on CPU, keep freed activation memory for reuse (glibc mallopt) instead of returning it "
            "to the OS every step; measured faster in bench/step.py. No effect on GPU or without glibc."
        },
    )
    lr_schedule: str = field(
        default="trainer",
        metadata={
            "help": "'trainer' uses --lr_scheduler_type; 'deit' is the paper's cosine (warmup from --warmup_lr to the "
            "peak over --warmup_steps/--warmup_ratio, counted inside the cosine, which ends at --min_lr), per step."
        },
    )
    min_lr: float = field(default=1e-5, metadata={"help": "Final learning rate of the 'deit' schedule."})
    warmup_lr: float = field(default=1e-6, metadata={"help": "Starting learning rate of the 'deit' warmup."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow training into an output_dir that already holds checkpoints of another run."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: the image column must reach the transforms (the Trainer would drop it otherwise)."
        },
    )
    enable_jit_checkpoint: bool = field(
        default=True,
        metadata={"help": "Save a checkpoint and stop cleanly when the job receives SIGTERM (preemption)."},
    )

    def __post_init__(self) -> None:
        self.student_layers = parse_layer_list(self.student_layers, "student_layers")
        self.teacher_layers = parse_layer_list(self.teacher_layers, "teacher_layers")
        if self.student_layers == "auto":
            raise ValueError("student_layers: 'auto' is only accepted for teacher_layers (it then chooses both lists)")
        if self.teacher_layers == "auto" and self.student_layers:
            raise ValueError(
                "teacher_layers='auto' chooses the whole layer map from the teacher's spectral profile; remove "
                f"student_layers ({self.student_layers}) or list teacher_layers explicitly"
            )
        _check_number("alpha", self.alpha, 0.0, 1.0)
        _check_number("temperature", self.temperature, 0.0, low_open=True)
        _check_number("beta", self.beta, 0.0)
        _check_number("label_smoothing", self.label_smoothing, 0.0, 1.0)
        if self.label_smoothing >= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check_number("min_lr", self.min_lr, 0.0)
        _check_number("warmup_lr", self.warmup_lr, 0.0)
        if self.distillation_type not in DISTILLATION_TYPES:
            raise ValueError(f"distillation_type must be one of {DISTILLATION_TYPES}, got {self.distillation_type!r}")
        if self.feature_loss not in FEATURE_LOSSES:
            raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {self.feature_loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.teacher_layers != "auto" and (self.student_layers or self.teacher_layers):
            n_student, n_teacher = len(self.student_layers or []), len(self.teacher_layers or [])
            if n_student != n_teacher:
                raise ValueError(
                    f"student_layers and teacher_layers must have the same length (they pair by position): got "
                    f"{n_student} student layers {self.student_layers} and {n_teacher} teacher layers "
                    f"{self.teacher_layers}"
                )
        if self.hub_token:
            # Keep the token out of everything that serialises these arguments (training_args.bin,
            # run_config.json, logs): huggingface_hub reads it from the environment instead.
            os.environ["HF_TOKEN"] = self.hub_token
            self.hub_token = None
        super().__post_init__()
        # Streaming datasets: let every rank read its own shards instead of rank 0 decoding everything
        # and broadcasting (HF_NOTES.md §7). Map-style datasets are unaffected.
        if getattr(self.accelerator_config, "dispatch_batches", None) is None:
            self.accelerator_config.dispatch_batches = False

    @property
    def uses_teacher_logits(self) -> bool:
        return self.distillation_type != "none" and self.alpha > 0

    @property
    def uses_features(self) -> bool:
        return self.beta > 0 and (self.teacher_layers == "auto" or bool(self.student_layers))

    @property
    def needs_teacher(self) -> bool:
        return self.uses_teacher_logits or self.uses_features
