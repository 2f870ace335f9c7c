"""``SpectralDistillationTrainer``: a ``transformers.Trainer`` that distils a ViT student with SpectralKD.

The student is ``self.model`` (moved, wrapped, saved and pushed by the Trainer as usual); the teacher
is a frozen, eval-mode attribute (:mod:`.teacher_setup`). Per step: one teacher forward under
``no_grad`` on the same augmented batch, re-normalised and resized for the teacher when it expects
other inputs, its logits put in the student's class order; one student forward; each asked only for
the tapped hidden states; then :func:`~hf_spectralkd.losses.distillation_objective`. Its three raw
components are logged as ``loss_ce``, ``loss_kd``, ``loss_fft`` (or ``loss_mse``), averaged over window and processes.

The trainer owns the run's decisions (teacher, input adapter, label order, layer map, what an evaluation alone
scores, run record, output folder lock, resume point) and delegates each Trainer override in a few lines to a
part it owns (:mod:`.teacher_setup`, :mod:`.scoring`, :class:`ImageCounter`, :class:`AtomicCheckpointWriter`,
:class:`DataOrder`, :class:`DeiTOptimization`, :class:`ModelCardWriter`, :class:`RunRecord`, :class:`NonFiniteWatch`,
:class:`PreemptionWatch`, :class:`OutputDirHold`); the parts' ``state_dict()`` is written into each checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch
from accelerate.utils import DistributedType
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import ImageClassifierOutput

from ..checkpointing import AtomicCheckpointWriter, load_weights_from_folder, resolve_resume, single_file_checkpoint
from ..config import SpectralDistillationConfig
from ..data import ENCODED_IMAGES, DatasetEpochCallback, ImageClassificationCollator, first_images, pixel_batch
from ..errors import ConfigurationError
from ..io.hub import move_token_to_environment
from ..io.model_loading import load_model
from ..io.run_summary import RunSummary
from ..layer_map import LayerPair, resolve_layer_map
from ..metrics import TopKAccuracy, topk_indices
from ..perf import keep_freed_memory
from ..preprocessing import InputAdapter, InputSpec
from ..teacher import TeacherClassifier
from .compilation import CompiledStep
from .data_order import DataOrder
from .finished_run import finish_from_checkpoint
from .image_counter import IMAGE_COUNTS_FILE, ImageCounter
from .model_card import ModelCardWriter
from .nonfinite import NonFiniteWatch
from .optimizer import DeiTOptimization
from .output_dir import OutputDirHold, check_output_dir, clear_previous_run
from .preemption import ignore_stop_signals_in_workers, take_sigterm_from_jit_checkpoint
from .run_record import RUN_CONFIG_FILE, RunRecord
from .scoring import DataClasses, evaluation_only, score_classifier
from .teacher_setup import check_teacher_before_training, place_teacher, resolve_teacher

logger = logging.getLogger(__name__)


class SpectralDistillationTrainer(Trainer):
    """Distil ``model`` (the student) from ``teacher_model`` with the SpectralKD objective.

    Args:
        model: the student, a transformers image classifier (ViT, DeiT, Swin or timm-wrapped), or a Hub id / folder.
        teacher_model: the teacher as a model, a Hub id or a local folder. Not needed when
            ``args.distillation_type == "none"`` and no feature loss is used.
        args: a :class:`SpectralDistillationConfig`.
        teacher_kwargs: extra keyword arguments for loading a teacher given by id (``token``, ...).
        layer_map: the checked pairs from :func:`~hf_spectralkd.layer_map.resolve_layer_map`; by default resolved
            here from ``args`` (``layer_map="auto"`` profiles the teacher on 32 evaluation or training images).
        summary: the run's record for cards and ``results.json``; by default described from the models and ``args``.
        student_inputs: how the batches are normalised (:class:`~hf_spectralkd.preprocessing.InputSpec`);
            by default read from ``processing_class`` (the image processor saved with the student).
        teacher_inputs: what the teacher expects; by default ``args.teacher_image_mean/std``, else read
            from the teacher (its image processor when given by id or folder, timm's ``pretrained_cfg``).
        classes: the data's classes; with ``args.do_train`` false (an evaluation alone) the student and teacher are
            checked against them and scored in their order (:mod:`.scoring`).
        **kwargs: everything ``transformers.Trainer`` accepts (datasets, collator, callbacks, ...).
            ``compute_metrics`` defaults to top-1/top-5 accuracy and the collator to
            :class:`~hf_spectralkd.data.ImageClassificationCollator`.

    Raises:
        ConfigurationError (a ``ValueError``): before training, for a missing or unsupported teacher, layer lists of
            different lengths or out of range, paired layers of different sizes, or models with other classes.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer must divide it by the accumulation
    # steps itself. Left at None, transformers 5.23 skips that division for students whose forward
    # takes **kwargs (ViT, DeiT, Swin), and loss and gradients come out GA-times too large.
    loss_is_scaled_for_ga = False

    def __init__(self, model: Union[nn.Module, str, None] = None, teacher_model: Union[nn.Module, str, None] = None,
                 args: Optional[SpectralDistillationConfig] = None, teacher_kwargs: Optional[dict[str, Any]] = None,
                 layer_map: Optional[list[LayerPair]] = None, summary: Optional[RunSummary] = None,
                 student_inputs: Optional[InputSpec] = None, teacher_inputs: Optional[InputSpec] = None,
                 classes: Optional[DataClasses] = None, **kwargs: Any) -> None:
        args = SpectralDistillationConfig(output_dir="spectralkd_output") if args is None else args
        if not isinstance(args, SpectralDistillationConfig):
            raise TypeError(f"args must be a SpectralDistillationConfig, got {type(args).__name__}")
        move_token_to_environment(args)
        if model is None:
            raise ConfigurationError("model: the student model is required")
        student_info = load_model(model, argument="model", trust_remote_code=args.trust_remote_code) \
            if isinstance(model, str) else None
        model = student_info.model if student_info else model
        teacher = resolve_teacher(teacher_model, model, args, teacher_kwargs or {}, student_inputs, teacher_inputs,
                                  kwargs.get("processing_class"), classes)
        model, args = evaluation_only(model, args, classes, summary)
        kwargs.setdefault("data_collator", ImageClassificationCollator())
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = TopKAccuracy()
            kwargs.setdefault("preprocess_logits_for_metrics", topk_indices)
        # Checked before Trainer.__init__, which may already contact the Hub.
        self.layer_map: list[LayerPair] = list(layer_map if layer_map is not None else resolve_layer_map(
            model, teacher.model, args, _sample_images(args, kwargs), teacher.adapter))
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # never pass num_items_in_batch to the student
        if args.cpu_malloc_tuning and self.args.device.type == "cpu":
            keep_freed_memory()
        if self.layer_map:
            logger.info("SpectralKD: %d layer pairs, %s loss, beta=%s: student %s <-> teacher %s", len(self.layer_map),
                        args.feature_loss, args.beta, [p.student for p in self.layer_map],
                        [p.teacher for p in self.layer_map])
        self.teacher = place_teacher(teacher.model, self.accelerator, self.is_deepspeed_enabled) \
            if teacher.model is not None and args.needs_teacher else None
        self._compiled = CompiledStep(args, self.accelerator.distributed_type == DistributedType.NO)
        self._compiled.prepare(self.model, self.teacher)
        self._teacher_model, self.teacher_label_order = teacher.model, teacher.label_order
        self.teacher_inputs: Optional[InputAdapter] = teacher.adapter.to(args.device) if teacher.adapter else None
        self.summary = summary or RunSummary.describe(
            args, model, teacher.model, self.layer_map, student_source=student_info.source if student_info else None,
            student_kind=student_info.kind if student_info else "scratch",
            teacher_source=teacher.info.source if teacher.info else None,
            teacher_revision=teacher.info.revision if teacher.info else None,
        )
        self.add_callback(DatasetEpochCallback(lambda: self.train_dataset))
        # Running sums of (ce, kd, feature) per mode, reset at each log; see `log`.
        self._loss_sums: dict[str, Optional[torch.Tensor]] = {"train": None, "eval": None}
        self._loss_counts = {"train": 0, "eval": 0}
        self._feature_key = f"loss_{args.feature_loss}"
        self.image_counter = ImageCounter(self.accelerator, args.device, args.max_skipped_fraction)
        self.run_record = RunRecord(args, lambda: self.model)
        self._checkpoints = AtomicCheckpointWriter(self.accelerator, args, {
            IMAGE_COUNTS_FILE: self.image_counter, RUN_CONFIG_FILE: self.run_record})
        self._data_order = DataOrder(args)
        self._output_dir = OutputDirHold(self.accelerator, args.output_dir)
        self._optimization = DeiTOptimization(args)
        self._card = ModelCardWriter(self.summary, args, self._compiled.describe())
        self._nonfinite = NonFiniteWatch(("loss_ce", "loss_kd", self._feature_key))
        self._preemption = take_sigterm_from_jit_checkpoint(self.callback_handler) if args.enable_jit_checkpoint else None
        self.preempted_at_step: Optional[int] = None  # the step checkpointed on SIGTERM before training stopped
        self._saved_step: Optional[int] = None  # the last step checkpointed

    def check_teacher(self) -> Optional[float]:
        """Score the teacher on ``args.teacher_check_images`` evaluation images (a seeded sample stratified by
        class), through the same input adaptation and label order as distillation; stop if near chance.

        Returns the top-1 (``None`` when there is nothing to check).
        """
        return check_teacher_before_training(self)

    def evaluate_teacher(self) -> dict[str, float]:
        """Top-1/top-5 of the teacher (``{}`` without one) on the evaluation split, on the inputs it expects and
        in the student's (or, evaluating alone, the data's) class order."""
        return score_classifier(self, TeacherClassifier(self._teacher_model, self.teacher_inputs,
                                                        self.teacher_label_order)) if self._teacher_model else {}

    def holding_output_dir(self):
        """``with trainer.holding_output_dir():`` keeps the output folder's lock for a whole run (train, final save,
        evaluation, results); :meth:`train` alone holds it while it trains. Every process enters it."""
        return self._output_dir.holding()

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """``Trainer.train`` on a checked output folder, holding its lock, from the one resume point.

        ``resume_from_checkpoint``: ``True``/``"true"`` resumes from the newest checkpoint that verifies (a damaged
        newer one is skipped with a warning), a path must verify. A checkpoint of a run configured differently,
        or one at or past ``max_steps``, is refused before any step (:meth:`RunRecord.check_resume`), unless the run's
        final student is missing (then loaded, untrained: :mod:`.finished_run`); ``overwrite_output_dir`` clears it.
        """
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        check_output_dir(self.args.output_dir, self.args.overwrite_output_dir, checkpoint)
        self.preempted_at_step = None
        with self._output_dir.holding() as lock_holder:
            try:
                if self.args.overwrite_output_dir and lock_holder:  # the main process, sure no other run uses it
                    clear_previous_run(self.args.output_dir)
                self._checkpoints.restore(checkpoint)
                if self.run_record.check_resume(checkpoint, self._planned_max_steps, self.is_world_process_zero()):
                    return finish_from_checkpoint(self, checkpoint)  # trained to its end; its final save had failed
                self._data_order.resume(self.train_dataset, checkpoint)
                if self._preemption is not None:
                    self._preemption.install()
                self.check_teacher()
                result = super().train(checkpoint, *args, **kwargs)
                self._check_finite()
                return result
            finally:
                if self._preemption is not None:
                    self._preemption.restore()

    def _planned_max_steps(self) -> tuple[int, Optional[float]]:
        """The optimizer steps this run trains to and the epochs they come from (``None`` for ``--max_steps``)."""
        if self.args.max_steps > 0:
            return self.args.max_steps, None
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1], self.args.num_train_epochs

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Union[torch.Tensor, int]] = None):
        args = self.args
        pixel_values, labels = inputs["pixel_values"], inputs["labels"]
        mode = "train" if model.training else "eval"
        self.image_counter.count(mode, inputs)
        use_teacher = self.teacher is not None and (mode == "train" or args.eval_with_teacher)
        use_features = use_teacher and bool(self.layer_map)
        student_layers = [p.student for p in self.layer_map] if use_features else []
        teacher_layers = [p.teacher for p in self.layer_map] if use_features else []
        teacher_logits, teacher_maps = None, []
        self._compiled.begin_step()  # host reads and counts stay out of the two regions (see .compilation)
        if use_teacher:
            # Teacher first: its large temporaries are freed before the student's activations are
            # allocated and kept for backward, which measured faster on CPU (bench/README.md).
            teacher_logits, teacher_maps = self._compiled.teacher(
                self.teacher, pixel_values, teacher_layers, self.teacher_inputs, self.teacher_label_order
            )
        loss_options = dict(alpha=args.alpha, beta=args.beta, temperature=args.temperature, feature_loss=args.feature_loss,
                            distillation_type=args.distillation_type if use_teacher and args.uses_teacher_logits else "none",
                            label_smoothing=args.label_smoothing_factor, grid_alignment=args.grid_alignment)
        total, components, logits = self._compiled.student(model, pixel_values, labels, teacher_logits, teacher_maps,
                                                           student_layers, loss_options)
        if mode == "train" and args.stop_on_nonfinite_loss:
            step = self.state.global_step + 1
            self._nonfinite.update(components, step)  # on the device: no synchronisation here
            if args.nonfinite_check_interval and step % args.nonfinite_check_interval == 0:
                self._check_finite(step)
        # a copy: a CUDA-graph output is overwritten by the next replay
        self._loss_sums[mode] = components.clone() if self._loss_sums[mode] is None else self._loss_sums[mode] + components
        self._loss_counts[mode] += 1
        if return_outputs:  # only logits: hidden states are never gathered over the eval set
            return total, ImageClassifierOutput(logits=logits)
        return total

    def _check_finite(self, step: Optional[int] = None) -> None:
        """Stop on a non-finite loss component seen so far (a collective on several processes); ``step``: the step
        being computed, default the last completed one (at logs, saves, the end)."""
        if self.args.stop_on_nonfinite_loss:
            detected_at = self.state.global_step if step is None else step
            self._nonfinite.check(self.accelerator, detected_at, self.args.output_dir)
    # Checkpoints: atomic, with the parts' state; weights reloaded through from_pretrained (checkpointing.reload).
    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        self._check_finite()  # never write weights a non-finite loss has touched
        save, run_dir = super()._save_checkpoint, super()._get_output_dir(trial)
        self._checkpoints.save(run_dir, self.state, lambda: save(model, trial))
        self._saved_step = self.state.global_step

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:  # the final student's failed write: 1 line
        save = super()._save
        self._checkpoints.save_final(output_dir or self.args.output_dir, lambda: save(output_dir, state_dict))

    def _get_output_dir(self, trial) -> str:  # the staging folder while the writer saves
        return self._checkpoints.run_dir(super()._get_output_dir(trial))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not single_file_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_from_folder(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not single_file_checkpoint(best):
            return super()._load_best_model()
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_weights_from_folder(self.model, best, argument="load_best_model_at_end")

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs) -> None:
        """After each optimizer step's log, evaluation and save: on SIGTERM, save this step (unless just saved) and
        stop. Here, and only here, step N is complete and step N+1 has not begun, so its checkpoint holds exactly
        step N's state; a signal during an evaluation or a save is acted on when it has finished."""
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
        if self._preemption is None or not self._preemption.requested(self.accelerator):
            return
        if self._saved_step != self.state.global_step:
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        self.control.should_training_stop = True
        self.preempted_at_step = self.state.global_step
    # Data: order, resume position, workers, and batches of encoded images decoded on the device.
    def _get_dataloader(self, *args: Any, **kwargs: Any):
        # Workers ignore SIGTERM/SIGINT: a process-group signal must not kill them under the run (see .preemption).
        return ignore_stop_signals_in_workers(super()._get_dataloader(*args, **kwargs))

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return self._data_order.sampler(dataset, self._train_batch_size) or super()._get_train_sampler(train_dataset)

    def _init_training_state(self, *args, **kwargs) -> tuple[int, int]:
        epochs_trained, batches_to_skip = super()._init_training_state(*args, **kwargs)
        return epochs_trained, self._data_order.batches_to_skip(self.train_dataset, batches_to_skip)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # training_step and prediction_step pass every batch through here: encoded images are decoded on the device.
        return super()._prepare_inputs(pixel_batch(inputs, self.args.device))

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        # The Trainer counts FLOPs on the batch as the DataLoader gave it: count the pixels it decodes to.
        encoded = inputs.get(ENCODED_IMAGES) if isinstance(inputs, Mapping) else None
        return super().floating_point_ops({"pixel_values": encoded} if encoded is not None else inputs)
    # Optimizer (DeiT's decay groups and schedule) and the model card.
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return self._optimization.decay_parameter_names(model)

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.lr_scheduler is None:
            scheduler = self._optimization.scheduler(self.optimizer if optimizer is None else optimizer, num_training_steps)
            if scheduler is not None:
                self.lr_scheduler, self._created_lr_scheduler = scheduler, True
        return super().create_scheduler(num_training_steps, optimizer)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self._card.write(output_dir or self.args.output_dir, self.state)

    def create_model_card(self, *args, **kwargs) -> None:
        """Replace the Trainer's generic card with the SpectralKD card (called by ``push_to_hub``)."""
        if self.is_world_process_zero():
            self._card.write(self.args.output_dir, self.state)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the mean loss components of the window and the image counts; collective-safe (runs on every rank)."""
        mode = "eval" if "eval_loss" in logs else "train" if "loss" in logs else None
        if mode is not None:
            sums, count = self._loss_sums[mode], self._loss_counts[mode]
            means = (sums / count) if sums is not None and count else torch.zeros(3, device=self.args.device)
            means = self.accelerator.reduce(means.to(self.args.device), reduction="mean")
            prefix = "eval_" if mode == "eval" else ""
            for name, value in zip(("loss_ce", "loss_kd", self._feature_key), means.tolist()):
                logs[prefix + name] = round(value, 6)
            self._loss_sums[mode], self._loss_counts[mode] = None, 0
        if mode == "train":
            self._check_finite()
        self.image_counter.add_to_log(logs, mode)
        super().log(logs, start_time)


def _sample_images(args: SpectralDistillationConfig, trainer_kwargs: dict) -> Optional[torch.Tensor]:
    """32 images for ``layer_map="auto"``: from the evaluation set (deterministic), else the training set."""
    if args.layer_map != "auto" or not args.uses_features:
        return None
    dataset = trainer_kwargs.get("eval_dataset")
    if dataset is None or isinstance(dataset, dict):
        dataset = trainer_kwargs.get("train_dataset")
    return first_images(dataset, 32)
