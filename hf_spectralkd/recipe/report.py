"""What a recipe run reports: its configuration, spectral profiles, the card and results.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Optional

from ..config import SpectralDistillationConfig
from ..data import DataArguments
from ..errors import ConfigurationError
from ..features import has_taps
from ..io.run_summary import RunSummary
from ..layer_map import format_layer_map
from ..preprocessing import InputSpec
from ..utils import unwrap_model
from .arguments import ModelArguments

logger = logging.getLogger("hf_spectralkd.distill")


def write_eval_predictions(trainer, output_dir: str) -> None:
    """The last evaluation's per-image labels and top-k predictions (main process), when the trainer's metrics
    are the library's own (:class:`~hf_spectralkd.metrics.TopKAccuracy`)."""
    from ..metrics import TopKAccuracy

    if trainer.is_world_process_zero() and isinstance(trainer.compute_metrics, TopKAccuracy):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        trainer.compute_metrics.save_predictions(output_dir)


def describe_run(summary: RunSummary, args: SpectralDistillationConfig, data, layer_map) -> str:
    """The run's configuration, printed once at the start (the same facts the card and results.json hold)."""
    s = summary
    lines = ["", "=" * 88, "hf_spectralkd run configuration", "=" * 88]
    lines.append(f"student : {s.student} [{s.student_kind}] {s.student_architecture}, {s.student_parameters:,} params")
    if s.distilled:
        revision = f", revision {s.teacher_revision}" if s.teacher_revision else ""
        lines.append(f"teacher : {s.teacher} {s.teacher_architecture}, {s.teacher_parameters:,} params{revision}")
    size = f"{data.train_size:,} images" if data.train_size else "size unknown"
    evaluated = len(data.eval) if data.eval is not None else 0
    lines.append(f"data    : {s.dataset} ({'streamed' if data.streaming else 'map-style'}, {size}), "
                 f"{len(data.id2label)} classes, eval on {evaluated:,} images")
    kd = f"(1-{s.alpha})·CE + {s.alpha}·{s.distillation_type}KD(T={s.temperature})" if args.uses_teacher_logits else "CE"
    lines.append(f"loss    : {kd} + {s.beta}·L_{s.feature_loss}, label smoothing {s.label_smoothing}")
    lines.append(
        f"train   : epochs {s.num_train_epochs}, max_steps {s.max_steps}, batch {args.per_device_train_batch_size}"
        f"×{args.world_size} proc×{args.gradient_accumulation_steps} accum, lr {s.learning_rate:.4g}"
        f"{f' (= {s.base_learning_rate:g} × {s.global_batch_size}/512, scale_lr)' if s.base_learning_rate else ''} ({s.lr_schedule}), "
        f"weight decay {s.weight_decay}, precision {s.precision}, seed {s.seed}"
    )
    lines += [f"output  : {args.output_dir}", "layer map:", format_layer_map(layer_map), "=" * 88]
    return "\n".join(lines)


def spectral_extras(model_args: ModelArguments, student, teacher) -> tuple[int, int]:
    """``(profile_images, spectral_dynamics_steps)`` the run can produce: 0 for an extra that needs feature taps of
    a model without them (a logit-only run of DINOv2, BEiT, ConvNeXt, ...), with one warning naming it.

    A loss that needs taps was refused before (resolve_layer_map); the extras never stop a run that trained.
    """
    profile, dynamics = model_args.profile_images, model_args.spectral_dynamics_steps
    untapped = [f"{role} {type(unwrap_model(model)).__name__}" for role, model in (("student", student), ("teacher", teacher))
                if model is not None and not has_taps(model)]
    skipped = []
    if profile > 0 and teacher is not None and untapped:
        skipped.append("--profile_images (teacher/student spectral profiles)")
        profile = 0
    if dynamics > 0 and not has_taps(student):
        skipped.append("--spectral_dynamics_steps")
        dynamics = 0
    if skipped:
        logger.warning("skipping %s: the %s has no feature taps (supported: ViT, DeiT, Swin, timm models with "
                       "forward_intermediates); training is unaffected", " and ".join(skipped), " and ".join(untapped))
    return profile, dynamics


def write_profile_comparison(trainer, teacher, pixel_values, output_dir: str, teacher_inputs=None) -> Optional[dict[str, Any]]:
    """Teacher and student spectral profiles on the same images: JSON, overlay plot, similarity (``None``, with a
    warning, when a profile has too few layers to compare).

    Skipped under DeepSpeed ZeRO-3, where neither model's parameters are whole on any one process.
    """
    from ..analysis import compare_profiles, spectral_profile
    from ..analysis.callback import log_figure
    from ..analysis.plots import plot_profile_comparison
    from ..io.hub import PROFILE_PLOT

    device = trainer.args.device
    student_model = trainer.accelerator.unwrap_model(trainer.model)
    student_profile = spectral_profile(student_model, pixel_values.to(device), model_name="student")
    teacher_pixels = pixel_values.to(device) if teacher_inputs is None else teacher_inputs(pixel_values.to(device))
    teacher_profile = spectral_profile(teacher.to(device), teacher_pixels, model_name="teacher")
    try:
        comparison = compare_profiles(student_profile, teacher_profile)
    except ConfigurationError as error:  # too few layers for a shape: the run itself is fine
        logger.warning("spectral profiles not compared: %s", error)
        return None
    # Every rank computed (cheap, collective-free) and logs; the trackers write on the main process.
    trainer.log({"spectral/final_pearson_to_teacher": comparison.pearson,
                 "spectral/final_distance_to_teacher": comparison.mean_abs_distance})
    if trainer.is_world_process_zero():
        payload = {"teacher": teacher_profile.to_dict(), "student": student_profile.to_dict(), "comparison": comparison.to_dict()}
        Path(output_dir, "spectral_profiles.json").write_text(json.dumps(payload, indent=2))
        figure = plot_profile_comparison([teacher_profile, student_profile], ["teacher", "student"],
                                         Path(output_dir, PROFILE_PLOT),
                                         title=f"Spectral intensity, normalised (Pearson {comparison.pearson:.3f})")
        log_figure(trainer, "spectral/teacher_vs_student", figure, trainer.state.global_step)
        figure.clf()
    return {"pearson": comparison.pearson, "mean_abs_distance": comparison.mean_abs_distance}


def with_student_preprocessing(data_args: DataArguments, spec: InputSpec) -> DataArguments:
    """Fill the preprocessing options the user left unset from the student's own (a pretrained student's processor)."""
    values = {}
    if data_args.image_mean is None and data_args.image_std is None and spec.knows_normalisation:
        values.update(image_mean=list(spec.mean), image_std=list(spec.std))
    if data_args.eval_crop_pct is None and spec.crop_pct is not None:
        values["eval_crop_pct"] = float(spec.crop_pct)
    if data_args.interpolation is None and spec.interpolation:
        values["interpolation"] = spec.interpolation
    if values:
        logger.info("preprocessing from the student's image processor: %s", values)
    return dataclasses.replace(data_args, **values) if values else data_args


def write_results(summary: RunSummary, trainer, model_args: ModelArguments, args: SpectralDistillationConfig,
                  started: float, card: bool = True) -> None:
    """Write results.json (and, for a trained student, its card again) from the completed summary (main process)."""
    summary.wall_time_s = round(time.time() - started, 1)
    if not trainer.is_world_process_zero():
        return
    from ..io.hub import write_model_card

    brief = {"teacher_accuracy": summary.teacher_accuracy, "student_accuracy": summary.student_accuracy}
    if card:  # again, now with the teacher's accuracy and the profile plot
        write_model_card(summary, args.output_dir, args.hub_model_id)
        brief = {**brief, "wall_time_s": summary.wall_time_s}
    else:  # an evaluation: as it printed before
        brief = {"student_accuracy": summary.student_accuracy, "teacher_accuracy": summary.teacher_accuracy}
    results_file = model_args.results_file or os.path.join(args.output_dir, "results.json")
    summary.write_json(results_file)
    print(f"results → {results_file}: {json.dumps(brief)}", flush=True)
