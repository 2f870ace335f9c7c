"""``SpectralDistillationTrainer``: a ``transformers.Trainer`` that distils a ViT student with SpectralKD.

The student is ``self.model`` (moved, wrapped, saved and pushed by the Trainer as usual); the
teacher is a frozen, eval-mode attribute prepared for the launch mode (docs/design.md#teacher-placement):

* single device / DDP: ``accelerator.prepare_model(teacher, evaluation_mode=True)`` (device
  placement and the trainer's autocast, no DDP wrapper);
* DeepSpeed: its own inference engine, ZeRO-3 sharded when training is ZeRO-3, otherwise stage 0
  (a replica), as TRL does.

Per step: one teacher forward under ``no_grad`` on the same augmented batch, re-normalised and
resized for the teacher when it expects other inputs, its logits put in the student's class order
(:mod:`.teacher`); one student forward; each asked only for the tapped hidden states; then
:func:`~hf_spectralkd.losses.distillation_objective`. Before the first step the teacher is scored on a
few evaluation images and a teacher near chance stops the run. Its three raw components are logged as
``loss_ce``, ``loss_kd``, ``loss_fft`` (or ``loss_mse``), averaged over the logging window and over
processes. Checkpointing, the model card and the optimizer details live in their own mixins
(:mod:`.checkpointing`, :mod:`.hub`, :mod:`.optimization`), SIGTERM in :mod:`.preemption`; batches of encoded images
(``--data_backend torchvision``) are decoded on the device by :class:`~.data.DecodeOnDeviceMixin`.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import ImageClassifierOutput

from .checkpointing import AtomicCheckpointMixin, acquire_run_lock, newest_verified_checkpoint
from .config import SpectralDistillationConfig
from .data import (
    DataOrderMixin,
    DatasetEpochCallback,
    DecodeOnDeviceMixin,
    ImageClassificationCollator,
    first_images,
)
from .errors import ConfigurationError
from .features import (
    describe_taps,
    extract_features,
    feature_forward_kwargs,
    model_family,
)
from .hub import ModelCardMixin
from .image_counts import ImageCountsMixin
from .layer_map import LayerPair, resolve_layer_map
from .losses import distillation_objective
from .metrics import topk_accuracy, topk_indices
from .models import LoadedModel, load_model
from .nonfinite import NonFiniteWatch
from .optimization import DeiTOptimizationMixin
from .perf import keep_freed_memory
from .preemption import PreemptionWatch, ignore_stop_signals_in_workers
from .preprocessing import (
    InputAdapter,
    InputSpec,
    configured_size,
    input_spec_of,
    spec_from_processor,
    teacher_input_adapter,
)
from .run_record import RunRecordMixin
from .summary import RunSummary
from .teacher import check_teacher, run_teacher, stop_if_near_chance, teacher_label_order

logger = logging.getLogger(__name__)


class SpectralDistillationTrainer(
    ModelCardMixin, RunRecordMixin, ImageCountsMixin, AtomicCheckpointMixin, DataOrderMixin, DeiTOptimizationMixin,
    DecodeOnDeviceMixin, Trainer,
):
    """Distil ``model`` (the student) from ``teacher_model`` with the SpectralKD objective.

    Args:
        model: the student, a transformers image classifier (ViT, DeiT, Swin or timm-wrapped).
        teacher_model: the teacher as a model, a Hub id or a local folder. Not needed when
            ``args.distillation_type == "none"`` and no feature loss is used.
        args: a :class:`SpectralDistillationConfig`.
        teacher_kwargs: extra keyword arguments for loading a teacher given by id (``token``, ...).
        layer_map: the checked pairs from :func:`~hf_spectralkd.layer_map.resolve_layer_map`; by
            default resolved here from ``args`` (``layer_map="auto"`` profiles the teacher on 32
            images of the evaluation or training set).
        summary: the run's record for cards and ``results.json``; by default described from the
            models and ``args``.
        student_inputs: how the batches are normalised (:class:`~hf_spectralkd.preprocessing.InputSpec`);
            by default read from ``processing_class`` (the image processor saved with the student).
        teacher_inputs: what the teacher expects; by default ``args.teacher_image_mean/std``, else read
            from the teacher (its image processor when given by id or folder, timm's ``pretrained_cfg``).
        **kwargs: everything ``transformers.Trainer`` accepts (datasets, collator, callbacks, ...).
            ``compute_metrics`` defaults to top-1/top-5 accuracy and the collator to
            :class:`~hf_spectralkd.data.ImageClassificationCollator`.

    Raises:
        ConfigurationError (a ``ValueError``): before training, for a missing or unsupported
            teacher, layer lists of different lengths or out of range, paired layers of different
            spatial size, or teacher and student with different numbers of classes.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer must divide it by the accumulation
    # steps itself. Left at None, transformers 5.23 skips that division for students whose forward
    # takes **kwargs (ViT, DeiT, Swin), and loss and gradients come out GA-times too large.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Union[nn.Module, str, None] = None,
        teacher_model: Union[nn.Module, str, None] = None,
        args: Optional[SpectralDistillationConfig] = None,
        teacher_kwargs: Optional[dict[str, Any]] = None,
        layer_map: Optional[list[LayerPair]] = None,
        summary: Optional[RunSummary] = None,
        student_inputs: Optional[InputSpec] = None,
        teacher_inputs: Optional[InputSpec] = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SpectralDistillationConfig(output_dir="spectralkd_output")
        if not isinstance(args, SpectralDistillationConfig):
            raise TypeError(f"args must be a SpectralDistillationConfig, got {type(args).__name__}")
        if model is None:
            raise ConfigurationError("model: the student model is required")
        student_info = None
        if isinstance(model, str):
            student_info = load_model(model, argument="model", trust_remote_code=args.trust_remote_code)
            model = student_info.model

        teacher_info, teacher = self._resolve_teacher(teacher_model, args, teacher_kwargs or {})
        kwargs.setdefault("data_collator", ImageClassificationCollator())
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = topk_accuracy
            kwargs.setdefault("preprocess_logits_for_metrics", topk_indices)
        label_order = teacher_label_order(model, teacher) if teacher is not None and args.uses_teacher_logits else None
        adapter = None
        if teacher is not None:
            teacher_inputs = teacher_inputs or input_spec_of(
                teacher, teacher_info.source if teacher_info else None, args.teacher_revision,
                mean=args.teacher_image_mean, std=args.teacher_image_std,
            )
            student_inputs = student_inputs or spec_from_processor(kwargs.get("processing_class"))
            adapter = teacher_input_adapter(student_inputs, teacher_inputs, configured_size(model))
        # Checked before Trainer.__init__, which may already contact the Hub.
        if layer_map is None:
            layer_map = resolve_layer_map(model, teacher, args, _sample_images(args, kwargs), adapter)
        self.layer_map: list[LayerPair] = list(layer_map)
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # never pass num_items_in_batch to the student
        if args.cpu_malloc_tuning and self.args.device.type == "cpu":
            keep_freed_memory()
        if self.layer_map:
            logger.info(
                "SpectralKD: %d layer pairs, %s loss, beta=%s: student %s <-> teacher %s", len(self.layer_map),
                args.feature_loss, args.beta, [p.student for p in self.layer_map], [p.teacher for p in self.layer_map],
            )
        self.teacher = self._prepare_teacher(teacher) if teacher is not None else None
        self.teacher_label_order = label_order
        self.teacher_inputs: Optional[InputAdapter] = adapter.to(args.device) if adapter is not None else None
        self.summary = summary or RunSummary.describe(
            args, model, teacher, self.layer_map,
            student_source=student_info.source if student_info else None,
            student_kind=student_info.kind if student_info else "scratch",
            teacher_source=teacher_info.source if teacher_info else None,
            teacher_revision=teacher_info.revision if teacher_info else None,
        )
        self.add_callback(DatasetEpochCallback(lambda: self.train_dataset))
        # Running sums of (ce, kd, feature) per mode, reset at each log; see `log`.
        self._loss_sums: dict[str, Optional[torch.Tensor]] = {"train": None, "eval": None}
        self._loss_counts = {"train": 0, "eval": 0}
        self._feature_key = f"loss_{args.feature_loss}"
        self._nonfinite = NonFiniteWatch(("loss_ce", "loss_kd", self._feature_key))
        self._preemption = self._replace_jit_checkpoint() if args.enable_jit_checkpoint else None
        #: The step whose checkpoint was saved on SIGTERM before training stopped; None if it was not preempted.
        self.preempted_at_step: Optional[int] = None
        self._saved_step: Optional[int] = None

    def _replace_jit_checkpoint(self) -> PreemptionWatch:
        """Take SIGTERM from transformers' JIT checkpoint (it saves inside a step; see :mod:`.preemption`).

        ``Trainer.__init__`` installed its handler already, for the trainer's lifetime: give the signal
        its previous handler back; :meth:`train` installs a :class:`PreemptionWatch` while it trains.
        """
        from transformers.trainer_jit_checkpoint import JITCheckpointCallback

        for callback in list(self.callback_handler.callbacks):
            if isinstance(callback, JITCheckpointCallback):
                self.callback_handler.remove_callback(callback)
                manager = callback.jit_manager
                if manager is not None and manager._original_sigterm_handler is not None:
                    signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
        return PreemptionWatch()

    # ------------------------------------------------------------------------------------------
    # Teacher
    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _resolve_teacher(
        teacher_model: Union[nn.Module, str, None], args: SpectralDistillationConfig, teacher_kwargs: dict
    ) -> tuple[Optional[LoadedModel], Optional[nn.Module]]:
        if not args.needs_teacher:
            if teacher_model is not None:
                logger.warning("teacher_model is ignored: distillation_type='none' and no feature loss (beta=0 or no layers)")
            return None, None
        if teacher_model is None:
            raise ConfigurationError(
                f"teacher_model is required for distillation_type='{args.distillation_type}' (alpha={args.alpha}) "
                f"and beta={args.beta} with layers {args.teacher_layers}; pass a model, Hub id or folder, or set "
                "distillation_type='none' and beta=0 to train without one"
            )
        info = None
        if isinstance(teacher_model, str):
            info = load_model(
                teacher_model, argument="teacher_model", revision=args.teacher_revision,
                trust_remote_code=args.trust_remote_code, **teacher_kwargs,
            )
            teacher_model = info.model
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be an nn.Module, a Hub id or a folder, got {type(teacher_model).__name__}")
        if args.uses_features:
            model_family(teacher_model)
        return info, teacher_model

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return self._prepare_deepspeed_teacher(teacher)
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        # With --torch_compile, prepare_model has compiled the teacher already; compiling it again would
        # only return its forward as a function.
        if self.args.teacher_compile and not hasattr(teacher, "_orig_mod"):
            teacher = torch.compile(teacher)
        return teacher

    def _prepare_deepspeed_teacher(self, teacher: nn.Module) -> nn.Module:
        """Frozen teacher engine: ZeRO-3 sharded under ZeRO-3 training, else a stage-0 replica (TRL's recipe)."""
        import deepspeed

        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
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

    def check_teacher(self) -> Optional[float]:
        """Score the teacher on ``args.teacher_check_images`` evaluation images (a seeded sample stratified by
        class); stop if near chance.

        Returns the top-1 (``None`` when there is nothing to check). Runs through the same input
        adaptation and label order as distillation, so it checks what the KD targets will be.
        """
        args = self.args
        if (args.teacher_check_images <= 0 or self.teacher is None or not args.uses_teacher_logits
                or self.eval_dataset is None or isinstance(self.eval_dataset, dict)):
            return None
        top1, scored, classes = check_teacher(
            self.teacher, self.eval_dataset, args.teacher_check_images, args.device, args.per_device_eval_batch_size,
            self.teacher_inputs, self.teacher_label_order, seed=args.seed,
        )
        self.summary.teacher_check_accuracy = top1
        stop_if_near_chance(top1, scored, getattr(self.model.config, "num_labels", None) or 1, self.teacher_inputs, classes)
        return top1

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """``Trainer.train`` holding the output folder's lock; a resumed stream starts at its resume point itself.

        ``resume_from_checkpoint=True`` resumes from the newest checkpoint that verifies (a damaged
        newer one is skipped with a warning); the Trainer and the stream get that path. A checkpoint of a
        run configured differently, or one at or past ``max_steps``, is refused first (:meth:`check_resume`).
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_verified_checkpoint(self.args.output_dir)
        checkpoint = resume_from_checkpoint
        self.check_resume(checkpoint)  # another run's checkpoint, or nothing left to train: refused before any step
        self._restore_image_counts(checkpoint)
        dataset = self.train_dataset
        if hasattr(dataset, "fast_forward"):
            with self.args.main_process_first(desc="stream layout"):
                getattr(dataset, "layout", None)  # footers, the cached layout, or one count, before workers start
            global_step = 0
            state_file = os.path.join(str(checkpoint), "trainer_state.json") if checkpoint else None
            if state_file and not self.args.ignore_data_skip and os.path.isfile(state_file):
                with open(state_file, encoding="utf-8") as handle:
                    global_step = json.load(handle)["global_step"]
            dataset.fast_forward(global_step * self.args.gradient_accumulation_steps, self.args.per_device_train_batch_size)
        lock = acquire_run_lock(self.accelerator, self.args.output_dir)
        self.preempted_at_step = None
        if self._preemption is not None:
            self._preemption.install()
        try:
            self.check_teacher()
            result = super().train(resume_from_checkpoint, *args, **kwargs)
            self._check_finite()
            return result
        finally:
            if self._preemption is not None:
                self._preemption.restore()
            if lock is not None:
                lock.release()

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Optional[Union[torch.Tensor, int]] = None,
    ):
        args = self.args
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        mode = "train" if model.training else "eval"
        self._count_images(mode, inputs)
        use_teacher = self.teacher is not None and (mode == "train" or args.eval_with_teacher)
        use_features = use_teacher and bool(self.layer_map)

        student_layers = [p.student for p in self.layer_map] if use_features else []
        teacher_layers = [p.teacher for p in self.layer_map] if use_features else []
        teacher_logits, teacher_maps = None, []
        if use_teacher:
            # Teacher first: its large temporaries are freed before the student's activations are
            # allocated and kept for backward, which measured faster on CPU (bench/README.md).
            teacher_logits, teacher_maps = run_teacher(
                self.teacher, pixel_values, teacher_layers, self.teacher_inputs, self.teacher_label_order
            )
        outputs = model(pixel_values=pixel_values, **feature_forward_kwargs(model, student_layers))
        student_maps = extract_features(model, outputs, student_layers) if use_features else []
        losses = distillation_objective(
            outputs.logits, labels, teacher_logits, student_maps, teacher_maps,
            alpha=args.alpha, beta=args.beta, temperature=args.temperature,
            distillation_type=args.distillation_type if use_teacher and args.uses_teacher_logits else "none",
            feature_loss=args.feature_loss, label_smoothing=args.label_smoothing_factor,
        )
        components = torch.stack([losses.ce.detach(), losses.kd.detach(), losses.feature.detach()]).float()
        if mode == "train" and args.stop_on_nonfinite_loss:
            step = self.state.global_step + 1
            self._nonfinite.update(components, step)  # on the device: no synchronisation here
            if args.nonfinite_check_interval and step % args.nonfinite_check_interval == 0:
                self._check_finite(step)
        sums = self._loss_sums[mode]
        self._loss_sums[mode] = components if sums is None else sums + components
        self._loss_counts[mode] += 1

        if return_outputs:  # only logits: hidden states are never gathered over the eval set
            return losses.total, ImageClassifierOutput(logits=outputs.logits)
        return losses.total

    def _check_finite(self, step: Optional[int] = None) -> None:
        """Stop on a non-finite loss component seen so far (a collective on several processes).

        ``step``: the step being computed; default the last completed one (at logs, saves, the end).
        """
        if self.args.stop_on_nonfinite_loss:
            detected_at = self.state.global_step if step is None else step
            self._nonfinite.check(self.accelerator, detected_at, self.args.output_dir)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self._check_finite()  # never write weights a non-finite loss has touched
        super()._save_checkpoint(model, trial)
        self._saved_step = self.state.global_step

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs) -> None:
        """After each optimizer step's log, evaluation and save: on SIGTERM, save this step (unless just saved) and stop.

        Here, and only here, step N is complete and step N+1 has not begun: its checkpoint holds
        exactly step N's state, like a scheduled one. A signal during an evaluation or a save is
        acted on when it has finished.
        """
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
        if self._preemption is None or not self._preemption.requested(self.accelerator):
            return
        if self._saved_step != self.state.global_step:
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        self.control.should_training_stop = True
        self.preempted_at_step = self.state.global_step

    def _get_dataloader(self, *args: Any, **kwargs: Any):
        # Workers ignore SIGTERM/SIGINT: a process-group signal must not kill them under the run (see .preemption).
        return ignore_stop_signals_in_workers(super()._get_dataloader(*args, **kwargs))

    # ------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the mean loss components of the window and the image counts; collective-safe (runs on every rank)."""
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None:
            sums = self._loss_sums[mode]
            count = self._loss_counts[mode]
            means = (sums / count) if sums is not None and count else torch.zeros(3, device=self.args.device)
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            for name, value in zip(("loss_ce", "loss_kd", self._feature_key), means.tolist()):
                logs[prefix + name] = round(value, 6)
            self._loss_sums[mode], self._loss_counts[mode] = None, 0
        if mode == "train":
            self._check_finite()
        self._log_image_counts(logs, mode)
        super().log(logs, start_time)


def _sample_images(args: SpectralDistillationConfig, trainer_kwargs: dict) -> Optional[torch.Tensor]:
    """32 images for ``layer_map="auto"``: from the evaluation set (deterministic), else the training set."""
    if args.layer_map != "auto" or not args.uses_features:
        return None
    dataset = trainer_kwargs.get("eval_dataset")
    if dataset is None or isinstance(dataset, dict):
        dataset = trainer_kwargs.get("train_dataset")
    return first_images(dataset, 32)
