"""``SpectralDistillationConfig``: ``TrainingArguments`` plus the SpectralKD hyperparameters.

Defaults are the paper's DeiT setting (docs/method.md#objective): ``alpha=0.9``, ``temperature=1``,
``beta=0.2`` (the *effective* feature weight; the Swin preset uses 0.05), label smoothing 0.1,
soft KD, FFT feature loss.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from transformers import TrainingArguments

from .errors import ConfigurationError
from .grids import GridAlignment
from .losses import DistillationType, FeatureLoss
from .option_checks import (
    check_choice,
    check_count,
    check_number,
    compile_mode,
    parse_layer_list,
)

LrSchedule = Literal["trainer", "deit"]
LayerMapMode = Literal["manual", "auto"]
#: Options that were switches before they took a value: a config file's true/false still stands for them.
FORMER_SWITCHES = ("teacher_compile",)


@dataclass
class SpectralDistillationConfig(TrainingArguments):
    """Training arguments for :class:`~hf_spectralkd.SpectralDistillationTrainer`.

    The objective is ``(1-alpha)·CE_ε + alpha·KD + beta·L_feat``
    (:func:`hf_spectralkd.losses.distillation_objective`). With ``distillation_type="none"`` there is
    no logit-KD term and the loss is ``CE_ε + beta·L_feat``: set ``beta=0`` too for the no-teacher
    baseline. ε is ``label_smoothing_factor`` (default 0.1 here; ``label_smoothing`` is an alias).
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
    distillation_type: DistillationType = field(
        default="soft",
        metadata={
            "help": "Logit distillation: 'soft' (T^2 * KL to the teacher's softened probabilities), 'hard' "
            "(cross-entropy to the teacher's argmax) or 'none' (no logit KD)."
        },
    )
    feature_loss: FeatureLoss = field(
        default="fft",
        metadata={
            "help": "Feature loss on the paired layers: 'fft' (SpectralKD: MSE of ortho rfft2 spectra) or 'mse' "
            "(spatial MSE after the same channel pooling)."
        },
    )
    grid_alignment: GridAlignment = field(
        default="spectral",
        metadata={
            "help": "Paired layers on different token grids (other families or input sizes): 'spectral' compares their "
            "spectra on the shared frequency band (the larger map's ortho spectrum cropped to the smaller grid), "
            "'interpolate' area-averages the larger map onto the smaller grid, 'error' refuses such pairs before training."
        },
    )
    layer_map: LayerMapMode = field(
        default="manual",
        metadata={
            "help": "'manual' pairs --student_layers with --teacher_layers; 'auto' chooses both lists from the teacher's "
            "spectral profile on one evaluation batch (hf_spectralkd.analysis.select_layers). '--teacher_layers auto' "
            "is an accepted spelling of '--layer_map auto'."
        },
    )
    student_layers: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "0-based student block (Swin: stage) indices to distil, paired by position with "
            "--teacher_layers, e.g. '0 1 6 7 8 9 10 11' for DeiT-Tiny. Empty: no feature loss."
        },
    )
    teacher_layers: Optional[list[int]] = field(
        default=None,
        metadata={
            "help": "0-based teacher block (Swin: stage) indices, same length as --student_layers, e.g. "
            "'0 1 18 19 20 21 22 23' for CaiT-S24."
        },
    )
    label_smoothing_factor: float = field(
        default=0.1,
        metadata={"help": "Label smoothing epsilon of the base cross-entropy on hard labels, in [0, 1)."},
    )
    label_smoothing: Optional[float] = field(
        default=None,
        metadata={"help": "Alias of --label_smoothing_factor."},
    )
    teacher_image_mean: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": "Normalisation mean the teacher was trained with, when the teacher does not carry it (an image "
            "processor saved with it, or timm's pretrained_cfg). The student's batch is re-normalised for the teacher."
        },
    )
    teacher_image_std: Optional[list[float]] = field(
        default=None, metadata={"help": "Normalisation std the teacher was trained with (see --teacher_image_mean)."}
    )
    teacher_check_images: int = field(
        default=256,
        metadata={
            "help": "Before the first step, score the teacher on this many evaluation images and stop if it is below "
            "twice chance (wrong normalisation, label order or checkpoint). 0 disables."
        },
    )
    scale_lr: bool = field(
        default=False,
        metadata={
            "help": "Scale the learning rate with the global batch as DeiT does: the rate used is --learning_rate x "
            "global_batch / 512 (--learning_rate is then the rate at a global batch of 512)."
        },
    )
    base_learning_rate: Optional[float] = field(
        default=None,
        metadata={"help": "Set by --scale_lr: the --learning_rate given, before scaling (do not set it yourself)."},
    )
    teacher_revision: Optional[str] = field(
        default=None,
        metadata={"help": "Branch, tag or commit of the teacher on the Hub when it is given by id."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow model code from the Hub to run when loading models by id. Off by default."},
    )
    teacher_compile: Optional[str] = field(
        default=None,
        metadata={
            "help": "Compile the teacher's forward and taps with torch.compile in this mode: default, reduce-overhead, "
            "max-autotune or max-autotune-no-cudagraphs (a bare --teacher_compile or 'true' means default; 'false' "
            "turns it off). The student follows transformers' --torch_compile / --torch_compile_mode.",
            "nargs": "?", "const": "default",
        },
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
            "help": "Stop with an error naming the step and the loss component when a loss term is NaN or infinite; no "
            "checkpoint is written after it (see --nonfinite_check_interval)."
        },
    )
    nonfinite_check_interval: int = field(
        default=0,
        metadata={
            "help": "Also check for a non-finite loss every N optimizer steps (1 = every step, which costs a host-device "
            "synchronisation per step on a GPU). 0: only at each logging step, before every checkpoint and at the end."
        },
    )
    cpu_malloc_tuning: bool = field(
        default=True,
        metadata={
            "help": "When training on CPU, keep freed activation memory for reuse (glibc mallopt) instead of returning it "
            "to the OS every step; measured faster in bench/step.py. No effect on GPU or without glibc."
        },
    )
    lr_schedule: LrSchedule = field(
        default="trainer",
        metadata={
            "help": "'trainer' uses --lr_scheduler_type; 'deit' is the paper's cosine (warmup from --warmup_lr to the "
            "peak over --warmup_steps/--warmup_ratio, counted inside the cosine, which ends at --min_lr), per step."
        },
    )
    min_lr: float = field(default=1e-5, metadata={"help": "Final learning rate of the 'deit' schedule."})
    warmup_lr: float = field(default=1e-6, metadata={"help": "Starting learning rate of the 'deit' warmup."})
    do_train: bool = field(
        default=True, metadata={"help": "Train (the default). --do_train false --do_eval true only evaluates."}
    )
    do_eval: bool = field(
        default=True, metadata={"help": "Evaluate the student (and the teacher) on the evaluation split at the end."}
    )
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
        metadata={"help": "On SIGTERM (preemption), finish the current step, save its checkpoint and stop (exit code 143)."},
    )
    max_skipped_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Stop the run when more than this share of the training images read so far, or of an evaluation's "
            "images, cannot be decoded (a warning is logged above 1 %). Undecodable images are skipped and counted."
        },
    )

    def __post_init__(self) -> None:
        student_layers = parse_layer_list(self.student_layers, "student_layers")
        teacher_layers = parse_layer_list(self.teacher_layers, "teacher_layers")
        if student_layers == "auto":
            raise ConfigurationError(
                "student_layers: 'auto' is not a list of layers; use --layer_map auto to choose both lists"
            )
        if teacher_layers == "auto":  # the older spelling of layer_map="auto"
            self.layer_map, teacher_layers = "auto", None
        self.student_layers, self.teacher_layers = student_layers, teacher_layers
        check_choice("distillation_type", self.distillation_type, DistillationType)
        check_choice("feature_loss", self.feature_loss, FeatureLoss)
        check_choice("lr_schedule", self.lr_schedule, LrSchedule)
        check_choice("layer_map", self.layer_map, LayerMapMode)
        self.teacher_compile = compile_mode(self.teacher_compile, "teacher_compile", aliases=True)
        compile_mode(self.torch_compile_mode, "torch_compile_mode")
        check_choice("grid_alignment", self.grid_alignment, GridAlignment)
        if self.label_smoothing is not None:
            if self.label_smoothing_factor not in (0.1, self.label_smoothing):
                raise ConfigurationError(
                    f"label_smoothing: {self.label_smoothing} contradicts label_smoothing_factor "
                    f"{self.label_smoothing_factor}; give one of the two"
                )
            self.label_smoothing_factor, self.label_smoothing = self.label_smoothing, None
        check_number("alpha", self.alpha, 0.0, 1.0)
        check_number("temperature", self.temperature, 0.0, low_open=True)
        check_number("beta", self.beta, 0.0)
        check_number("label_smoothing_factor", self.label_smoothing_factor, 0.0, 1.0)
        if self.label_smoothing_factor >= 1.0:
            raise ConfigurationError(f"label_smoothing_factor must be in [0, 1), got {self.label_smoothing_factor}")
        if isinstance(self.teacher_check_images, bool) or not isinstance(self.teacher_check_images, int) or (
            self.teacher_check_images < 0
        ):
            raise ConfigurationError(
                f"teacher_check_images must be a number of images >= 0 (0 disables the check), got {self.teacher_check_images!r}"
            )
        for name in ("teacher_image_mean", "teacher_image_std"):
            value = getattr(self, name)
            if value is not None and (len(value) not in (1, 3) or not all(math.isfinite(float(v)) for v in value)):
                raise ConfigurationError(f"{name} must be 1 or 3 finite numbers (one per channel), got {value!r}")
        if (self.teacher_image_mean is None) != (self.teacher_image_std is None):
            raise ConfigurationError("teacher_image_mean and teacher_image_std go together: give both or neither")
        if self.teacher_image_std is not None and any(float(v) <= 0 for v in self.teacher_image_std):
            raise ConfigurationError(f"teacher_image_std must be positive, got {self.teacher_image_std!r}")
        if self.do_predict:
            raise ConfigurationError("do_predict: prediction is not part of this recipe; use --do_eval, or pipeline() on the student")
        if isinstance(self.nonfinite_check_interval, bool) or not isinstance(self.nonfinite_check_interval, int) or (
            self.nonfinite_check_interval < 0
        ):
            raise ConfigurationError(
                f"nonfinite_check_interval must be a number of steps >= 0, got {self.nonfinite_check_interval!r}"
            )
        self._check_step_counts()
        check_number("min_lr", self.min_lr, 0.0)
        check_number("warmup_lr", self.warmup_lr, 0.0)
        check_number("max_skipped_fraction", self.max_skipped_fraction, 0.0, 1.0)
        if self.layer_map == "manual" and (self.student_layers or self.teacher_layers):
            n_student, n_teacher = len(self.student_layers or []), len(self.teacher_layers or [])
            if n_student != n_teacher:
                raise ConfigurationError(
                    f"student_layers and teacher_layers must have the same length (they pair by position): got "
                    f"{n_student} student layers {self.student_layers} and {n_teacher} teacher layers "
                    f"{self.teacher_layers}"
                )
        try:
            super().__post_init__()
        except ConfigurationError:
            raise
        except ValueError as error:  # TrainingArguments' own checks are about the user's options too
            raise ConfigurationError(str(error).strip().splitlines()[0]) from error
        self._check_fsdp()
        if self.scale_lr:
            # Idempotent: dataclasses.replace() runs __post_init__ again with base_learning_rate already set.
            if self.base_learning_rate is None:
                self.base_learning_rate = self.learning_rate
            self.learning_rate = self.base_learning_rate * self.global_batch_size / 512
        # Streaming datasets: every rank reads its own shards instead of rank 0 decoding everything
        # and broadcasting slices (accelerate's default for iterable datasets, a bottleneck).
        # Map-style datasets are unaffected.
        if getattr(self.accelerator_config, "dispatch_batches", None) is None:
            self.accelerator_config.dispatch_batches = False

    def _check_step_counts(self) -> None:
        """Batch sizes, accumulation, workers and the length of training: values torch or the Trainer would take
        without a word (a 0-step run that saves a card, an epoch-based run for ``max_steps 0``) or fail on deep
        inside (a division by zero, a ``DataLoader`` error)."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            check_count(name, getattr(self, name), 1, "a positive integer")
        check_count("dataloader_num_workers", self.dataloader_num_workers, 0,
                     "a number of DataLoader worker processes >= 0 (0 loads in the training process)")
        if not self.do_train:
            return  # evaluation alone: the length of training does not matter
        if self.max_steps == 0:
            raise ConfigurationError(
                "max_steps must be a positive number of optimizer steps, or -1 to train for --num_train_epochs; "
                "got 0 (a run of 0 steps would save an untrained student)"
            )
        if self.max_steps < 0 and not (math.isfinite(self.num_train_epochs) and self.num_train_epochs > 0):
            raise ConfigurationError(
                f"num_train_epochs must be a positive number of epochs, got {self.num_train_epochs} (or pass --max_steps "
                "N to train N optimizer steps)"
            )

    def _check_fsdp(self) -> None:
        """FSDP asked for by ``--fsdp`` or by ``accelerate launch`` (recipes/accelerate/fsdp2.yaml) runs as FSDP2 on
        CUDA devices or not at all. transformers' Trainer does not shard on CPU: with ``use_cpu`` it trains as DDP
        without a word, without a GPU it stops in ``Trainer.__init__``, after the data has loaded; and FSDP1 leaves
        the teacher on the CPU (accelerate neither moves nor shards a model prepared for evaluation under FSDP)."""
        launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if not (self.fsdp or launcher):
            return
        source = "fsdp" if self.fsdp else "accelerate launch (an FSDP config: ACCELERATE_USE_FSDP=true)"
        version = (self.fsdp_plugin_args or {}).get("fsdp_version") if self.fsdp else os.environ.get("FSDP_VERSION", "1")
        if str(version) != "2":
            raise ConfigurationError(
                f"{source}: FSDP version {version} is not supported (the teacher is sharded with FSDP2); set "
                "fsdp_version: 2 (recipes/accelerate/fsdp2.yaml) or fsdp_config version 2"
            )
        if self.use_cpu or not torch.cuda.is_available():
            raise ConfigurationError(
                f"{source}: FSDP needs CUDA devices and this run has none ({'use_cpu' if self.use_cpu else 'no GPU'}); "
                "on CPU train with DDP (torchrun --nproc_per_node N ... --use_cpu) and without FSDP"
            )

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps

    @property
    def uses_teacher_logits(self) -> bool:
        return self.distillation_type != "none" and self.alpha > 0

    @property
    def uses_features(self) -> bool:
        return self.beta > 0 and (self.layer_map == "auto" or bool(self.student_layers))

    @property
    def needs_teacher(self) -> bool:
        return self.uses_teacher_logits or self.uses_features
