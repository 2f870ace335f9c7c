"""``SpectralDistillationTrainer``: a ``transformers.Trainer`` that distils a ViT student with SpectralKD.

The student is ``self.model`` (moved, wrapped, saved and pushed by the Trainer as usual); the
teacher is a frozen, eval-mode attribute prepared for the launch mode (HF_NOTES.md §5):

* single device / DDP: ``accelerator.prepare_model(teacher, evaluation_mode=True)`` (device
  placement and the trainer's autocast, no DDP wrapper);
* DeepSpeed: its own inference engine, ZeRO-3 sharded when training is ZeRO-3, otherwise stage 0
  (a replica), as TRL does.

Per step: one student forward (with hidden states when layers are paired), one teacher forward
under ``no_grad`` on the same augmented batch, then
``loss = (1-α)·CE_ε + α·KD + β·L_feat`` (METHOD.md §3.3). The three raw components are logged as
``loss_ce``, ``loss_kd``, ``loss_fft`` (or ``loss_mse``), averaged over the logging window and over
processes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
from typing import Any, Callable, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from .config import SpectralDistillationConfig
from .data import ImageClassificationCollator
from .features import describe_taps, extract_features, feature_forward_kwargs, model_family, unwrap_model
from .losses import classification_loss, feature_alignment_loss, hard_kd_loss, soft_kd_loss
from .metrics import topk_accuracy, topk_indices
from .models import LoadedModel, load_model
from .perf import keep_freed_memory
from .validation import LayerPair, build_layer_map, check_num_labels

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
#: Parameters that DeiT/Swin training keeps out of weight decay, besides every 1-D tensor (biases, norms).
NO_DECAY_KEYWORDS = (
    "position_embeddings", "pos_embed", "cls_token", "distillation_token", "dist_token", "mask_token",
    "relative_position_bias_table", "absolute_pos_embed",
)


class NonFiniteLossError(RuntimeError):
    """A loss component became NaN or infinite; raised before the optimizer step."""


class SpectralDistillationTrainer(Trainer):
    """Distil ``model`` (the student) from ``teacher_model`` with the SpectralKD objective.

    Args:
        model: the student, a transformers image classifier (ViT, DeiT, Swin or timm-wrapped).
        teacher_model: the teacher as a model, a Hub id or a local folder. Not needed when
            ``args.distillation_type == "none"`` and no feature loss is used.
        args: a :class:`SpectralDistillationConfig`.
        teacher_kwargs: extra keyword arguments for loading a teacher given by id (``token``, ...).
        **kwargs: everything ``transformers.Trainer`` accepts (datasets, collator, callbacks, ...).
            ``compute_metrics`` defaults to top-1/top-5 accuracy and the collator to
            :class:`~hf_spectralkd.data.ImageClassificationCollator`.

    Raises:
        ValueError / TypeError: before training, for a missing or unsupported teacher, layer lists of
            different lengths or out of range, paired layers of different spatial size, or teacher and
            student with different numbers of classes.
    """

    # compute_loss returns a per-micro-batch mean: the Trainer must divide it by the accumulation
    # steps itself (HF_NOTES.md §1, the GA trap).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Union[nn.Module, str, None] = None,
        teacher_model: Union[nn.Module, str, None] = None,
        args: Optional[SpectralDistillationConfig] = None,
        teacher_kwargs: Optional[dict[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = SpectralDistillationConfig(output_dir="spectralkd_output")
        if not isinstance(args, SpectralDistillationConfig):
            raise TypeError(f"args must be a SpectralDistillationConfig, got {type(args).__name__}")
        if model is None:
            raise ValueError("model: the student model is required")
        if isinstance(model, str):
            model = load_model(model, argument="model", trust_remote_code=args.trust_remote_code).model

        self.teacher_info: Optional[LoadedModel] = None
        teacher = self._resolve_teacher(teacher_model, args, teacher_kwargs or {})
        kwargs.setdefault("data_collator", ImageClassificationCollator())
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = topk_accuracy
            kwargs.setdefault("preprocess_logits_for_metrics", topk_indices)

        if teacher is not None and args.uses_teacher_logits:
            check_num_labels(model, teacher)
        # The layer map is validated before Trainer.__init__, which may already contact the Hub.
        if args.teacher_layers == "auto" and args.uses_features:
            args.student_layers, args.teacher_layers = self._select_layer_map(model, teacher, args, kwargs)
        self.layer_map: list[LayerPair] = (
            build_layer_map(model, teacher, args.student_layers, args.teacher_layers) if args.uses_features else []
        )
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
        self.add_callback(_DatasetEpochCallback(self))
        # Running sums of (ce, kd, feature) per mode, reset at each log; see `log`.
        self._loss_sums: dict[str, Optional[torch.Tensor]] = {"train": None, "eval": None}
        self._loss_counts = {"train": 0, "eval": 0}
        self._skipped_images = 0
        self._feature_key = f"loss_{args.feature_loss}"

    # ------------------------------------------------------------------------------------------
    # Teacher
    # ------------------------------------------------------------------------------------------
    def _resolve_teacher(
        self, teacher_model: Union[nn.Module, str, None], args: SpectralDistillationConfig, teacher_kwargs: dict
    ) -> Optional[nn.Module]:
        if not args.needs_teacher:
            if teacher_model is not None:
                logger.warning("teacher_model is ignored: distillation_type='none' and no feature loss (beta=0 or no layers)")
            return None
        if teacher_model is None:
            raise ValueError(
                f"teacher_model is required for distillation_type='{args.distillation_type}' (alpha={args.alpha}) "
                f"and beta={args.beta} with layers {args.teacher_layers}; pass a model, Hub id or folder, or set "
                "distillation_type='none' and beta=0 to train without a teacher"
            )
        if isinstance(teacher_model, str):
            self.teacher_info = load_model(
                teacher_model,
                argument="teacher_model",
                revision=args.teacher_revision,
                trust_remote_code=args.trust_remote_code,
                **teacher_kwargs,
            )
            teacher_model = self.teacher_info.model
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(f"teacher_model must be an nn.Module, a Hub id or a folder, got {type(teacher_model).__name__}")
        if args.uses_features:
            model_family(teacher_model)
        return teacher_model

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        teacher.eval().requires_grad_(False)
        if self.is_deepspeed_enabled:
            return self._prepare_deepspeed_teacher(teacher)
        teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        if self.args.teacher_compile:
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
            taps = describe_taps(teacher)
            hidden = max(taps.channels)
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

    def _select_layer_map(
        self, student: nn.Module, teacher: nn.Module, args: SpectralDistillationConfig, trainer_kwargs: dict
    ) -> tuple[list[int], list[int]]:
        """Resolve ``teacher_layers='auto'``: profile the teacher on one batch and apply ``select_layers``."""
        from .analysis import select_layers, spectral_profile

        dataset = trainer_kwargs.get("eval_dataset")
        if dataset is None or isinstance(dataset, dict):
            dataset = trainer_kwargs.get("train_dataset")
        if dataset is None:
            raise ValueError("teacher_layers='auto' needs a train or eval dataset to analyse the teacher")
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, collate_fn=trainer_kwargs["data_collator"])
        pixel_values = next(iter(loader))["pixel_values"]
        profile = spectral_profile(teacher.to(args.device), pixel_values)
        selection = select_layers(profile, describe_taps(student).num_layers)
        self.layer_selection = selection
        logger.info("teacher_layers='auto': %s (%s)", selection.as_arguments(), selection.rule)
        return selection.student_layers, selection.teacher_layers

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args: Any, **kwargs: Any):
        """``Trainer.train``; a resumed stream skips the already-trained batches without decoding them."""
        if resume_from_checkpoint and not self.args.ignore_data_skip and hasattr(self.train_dataset, "fast_forward"):
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            state_file = os.path.join(str(checkpoint), "trainer_state.json")
            if checkpoint and os.path.isfile(state_file):
                with open(state_file, encoding="utf-8") as handle:
                    global_step = json.load(handle)["global_step"]
                self.train_dataset.fast_forward(
                    global_step * self.args.gradient_accumulation_steps, self.args.per_device_train_batch_size
                )
        return super().train(resume_from_checkpoint, *args, **kwargs)

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
        self._skipped_images += int(inputs.get("num_skipped", 0))
        mode = "train" if model.training else "eval"
        use_teacher = self.teacher is not None and (mode == "train" or args.eval_with_teacher)
        use_features = use_teacher and bool(self.layer_map)

        student_layers = [p.student for p in self.layer_map] if use_features else []
        teacher_layers = [p.teacher for p in self.layer_map] if use_features else []
        teacher_logits, teacher_maps = None, []
        if use_teacher:
            # Teacher first: its large temporaries are freed before the student's activations are
            # allocated and kept for backward, which measured faster on CPU (bench/README.md). Only
            # its logits and the requested maps outlive this block: the other block outputs an HF
            # model returns with output_hidden_states are dropped before the student runs.
            with torch.no_grad():
                teacher_outputs = self.teacher(
                    pixel_values=pixel_values, **feature_forward_kwargs(self.teacher, teacher_layers)
                )
                teacher_logits = teacher_outputs.logits
                if use_features:
                    teacher_maps = extract_features(self.teacher, teacher_outputs, teacher_layers)
                del teacher_outputs
        outputs = model(pixel_values=pixel_values, **feature_forward_kwargs(model, student_layers))
        logits = outputs.logits
        loss_ce = classification_loss(logits, labels, args.label_smoothing)
        zero = loss_ce.new_zeros(())
        loss_kd, loss_feat = zero, zero

        if teacher_logits is not None:
            if args.uses_teacher_logits:
                loss_kd = (
                    soft_kd_loss(logits, teacher_logits, args.temperature)
                    if args.distillation_type == "soft"
                    else hard_kd_loss(logits, teacher_logits)
                )
            if use_features:
                student_maps = extract_features(model, outputs, student_layers)
                loss_feat = feature_alignment_loss(student_maps, teacher_maps, args.feature_loss)

        ce_weight = (1.0 - args.alpha) if args.uses_teacher_logits else 1.0
        kd_weight = args.alpha if args.uses_teacher_logits else 0.0
        loss = ce_weight * loss_ce + kd_weight * loss_kd + args.beta * loss_feat

        components = torch.stack([loss_ce.detach(), loss_kd.detach(), loss_feat.detach()]).float()
        if mode == "train" and args.stop_on_nonfinite_loss:
            self._check_finite(components)
        sums = self._loss_sums[mode]
        self._loss_sums[mode] = components if sums is None else sums + components
        self._loss_counts[mode] += 1

        if return_outputs:
            return loss, ImageClassifierOutput(logits=logits)  # only logits: hidden states are never gathered
        return loss

    def _check_finite(self, components: torch.Tensor) -> None:
        """Raise on a NaN/inf loss term on any process, on every process at once (no rank left waiting)."""
        bad = (~torch.isfinite(components)).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bool(bad > 0):
            return
        names = ("loss_ce", "loss_kd", self._feature_key)
        bad_terms = [f"{n}={v:.4g}" for n, v in zip(names, components.tolist()) if not math.isfinite(v)]
        where = ", ".join(bad_terms) if bad_terms else "on another process"
        raise NonFiniteLossError(
            f"non-finite loss at step {self.state.global_step + 1}: {where}. Training stopped before the "
            f"optimizer step; the last checkpoint in {self.args.output_dir} is intact. Lower the learning rate, "
            "check the inputs, or resume from the last checkpoint."
        )

    # ------------------------------------------------------------------------------------------
    # Logging
    # ------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """Add the mean loss components of the window; collective-safe (runs on every rank)."""
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
                skipped = torch.tensor(float(self._skipped_images), device=self.args.device)
                logs["skipped_images"] = int(self.accelerator.reduce(skipped, reduction="sum").item())
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------------------
    # Optimizer and schedule (METHOD.md §4.2)
    # ------------------------------------------------------------------------------------------
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Weight decay on matrices only: no decay on 1-D tensors, position embeddings or prefix tokens."""
        return [
            name
            for name, param in model.named_parameters()
            if param.ndim > 1 and not any(keyword in name for keyword in NO_DECAY_KEYWORDS)
        ]

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if self.args.lr_schedule != "deit":
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, deit_lr_lambda(self.args, num_training_steps)
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------------------------------
    # Saving: atomic checkpoints and a model card beside every saved student
    # ------------------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_root", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Write the checkpoint into a staging folder, then rename it into place.

        ``checkpoint-N`` therefore only ever exists complete: a crash mid-save leaves a partial folder
        under ``.checkpoint-staging/``, which resume ignores and the next save clears.
        """
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            _fsync_tree(staged)
            os.replace(staged, final)
            _fsync_dir(run_dir)
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        for attr in ("best_model_checkpoint",):
            value = getattr(self.state, attr)
            if value and value.startswith(staging_root):
                setattr(self.state, attr, os.path.join(run_dir, os.path.basename(value)))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    # transformers 5.23 reloads checkpoints with a raw ``load_state_dict`` of the file's keys, but
    # ``save_pretrained`` writes the Hub key names (e.g. ViT's ``encoder.layer.0.attention.attention.query``
    # for the in-memory ``layers.0.attention.q_proj``): the load silently matches nothing and a resumed
    # run restarts from its initial weights (huggingface/transformers#48805). Loading through
    # ``from_pretrained`` applies the key conversion.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not _single_file_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_from_folder(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not _single_file_checkpoint(best):
            return super()._load_best_model()
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_weights_from_folder(self.model, best)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            from .hub import write_model_card

            write_model_card(self, output_dir or self.args.output_dir)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Replace the Trainer's generic card with the SpectralKD card (called by ``push_to_hub``)."""
        if self.is_world_process_zero():
            from .hub import write_model_card

            write_model_card(self, self.args.output_dir)


class _DatasetEpochCallback(TrainerCallback):
    """Tell the training dataset which epoch starts, also on a resumed run.

    Augmentation (map-style) and stream order (streaming) depend on the epoch. accelerate forwards
    ``set_epoch`` to the dataset, except through the loader that skips the already-seen batches of a
    resumed epoch, which would replay that epoch with epoch 0's randomness.
    """

    def __init__(self, trainer: "SpectralDistillationTrainer"):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        dataset = self.trainer.train_dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-9)))


def deit_lr_lambda(args: SpectralDistillationConfig, num_training_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak rate at optimizer step ``t``: DeiT's warmup + cosine, per step.

    ``lr(t) = warmup_lr + t·(peak - warmup_lr)/W`` for ``t < W``, else
    ``min_lr + ½(peak - min_lr)(1 + cos(π·t/T))``; the warmup counts toward the cosine (timm's
    ``t_initial = epochs``). The reference steps it per epoch; per step is a documented deviation.
    """
    peak = args.learning_rate
    warmup = args.get_warmup_steps(num_training_steps)
    total = max(1, num_training_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            lr = args.warmup_lr + step * (peak - args.warmup_lr) / warmup
        else:
            lr = args.min_lr + 0.5 * (peak - args.min_lr) * (1.0 + math.cos(math.pi * min(step, total) / total))
        return lr / peak if peak > 0 else 0.0

    return multiplier


def _single_file_checkpoint(folder: Optional[str]) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "model.safetensors"))


def load_weights_from_folder(model: nn.Module, folder: str) -> None:
    """Copy the weights saved in ``folder`` (``save_pretrained`` layout) into ``model``, strictly."""
    target = unwrap_model(model)
    reloaded = type(target).from_pretrained(folder, config=target.config)
    target.load_state_dict(reloaded.state_dict(), strict=True)
    del reloaded


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """Flush every file of a checkpoint to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                with open(os.path.join(folder, name), "rb+") as handle:
                    os.fsync(handle.fileno())
            except OSError:
                pass
        _fsync_dir(folder)
