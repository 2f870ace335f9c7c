#!/usr/bin/env python
"""Distil a Vision Transformer with SpectralKD (arXiv 2412.19055).

Launch with accelerate (one or many GPUs, DeepSpeed) or plain python::

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/run_distill.py recipes/configs/deit_tiny_from_cait_s24.yaml
    python recipes/run_distill.py recipes/configs/demo.yaml            # offline, 2 CPU cores
    python recipes/run_distill.py --teacher timm/cait_s24_224.fb_dist_in1k \\
        --student deit_tiny_patch16_224 --dataset ILSVRC/imagenet-1k --streaming true \\
        --student_layers 0 1 6 7 8 9 10 11 --teacher_layers 0 1 18 19 20 21 22 23 --output_dir runs/x

A YAML file given first (or with ``--config``) supplies option values; options on the command line
override it. Every option of ``SpectralDistillationConfig`` (``--alpha``, ``--beta``,
``--temperature``, ``--student_layers``, ...) and of ``transformers.TrainingArguments`` is accepted;
``--help`` lists them all.

Writes to ``--output_dir``: checkpoints, the final student (safetensors, config, image processor,
model card), ``results.json`` and ``run_config.json``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import transformers
from transformers import HfArgumentParser, set_seed
from transformers.trainer_utils import get_last_checkpoint

from hf_spectralkd import SpectralDistillationConfig, SpectralDistillationTrainer
from hf_spectralkd.cli.common import UsageError, check_output_dir, exit_on_error, expand_config_argument
from hf_spectralkd.data import (
    DataArguments,
    build_image_processor,
    open_image_datasets,
    prepare_image_datasets,
    steps_for_epochs,
)
from hf_spectralkd.features import describe_taps
from hf_spectralkd.models import ARCHITECTURE_PRESETS, LoadedModel, count_parameters, ensure_deepspeed_distributed, load_model
from hf_spectralkd.validation import format_layer_map

logger = logging.getLogger("run_distill")
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on their signal


@dataclass
class ModelArguments:
    """Which teacher distils which student."""

    teacher: Optional[str] = field(
        default=None,
        metadata={
            "help": "Teacher: Hub id (e.g. timm/cait_s24_224.fb_dist_in1k, facebook/deit-base-patch16-224) or local "
            "folder saved with save_pretrained. Not needed with --distillation_type none --beta 0."
        },
    )
    student: Optional[str] = field(
        default=None,
        metadata={
            "help": "Student: a built-in architecture trained from scratch (" + ", ".join(ARCHITECTURE_PRESETS) + "), "
            "a config.json, a local folder or a Hub id."
        },
    )
    student_from_scratch: bool = field(
        default=False,
        metadata={"help": "Build the student from the config of --student with random weights (as the paper does)."},
    )
    student_revision: Optional[str] = field(default=None, metadata={"help": "Branch, tag or commit of a Hub student."})
    train_teacher_if_missing: bool = field(
        default=False,
        metadata={
            "help": "If --teacher is a local folder that does not exist, first train a teacher there from "
            "--teacher_architecture on the same data (the offline demo does this)."
        },
    )
    teacher_architecture: str = field(
        default="demo_vit_teacher",
        metadata={"help": "Architecture (built-in name or config.json) of a teacher trained by --train_teacher_if_missing."},
    )
    teacher_num_train_epochs: float = field(default=15.0, metadata={"help": "Epochs of that teacher training."})
    teacher_learning_rate: float = field(default=2e-3, metadata={"help": "Peak learning rate of that teacher training."})
    evaluate_teacher: bool = field(
        default=True, metadata={"help": "Evaluate the teacher on the eval split and record its accuracy in results.json."}
    )
    results_file: Optional[str] = field(
        default=None, metadata={"help": "Where to write results.json (default: <output_dir>/results.json)."}
    )
    profile_images: int = field(
        default=64,
        metadata={
            "help": "Evaluation images on which the final teacher and student spectral profiles are compared "
            "(spectral_profiles.json/.png, shown in the model card). 0 disables."
        },
    )
    spectral_dynamics_steps: int = field(
        default=0,
        metadata={
            "help": "Record the student's spectral profile on a fixed evaluation batch every N steps (and at each "
            "evaluation) into spectral_dynamics.jsonl and TensorBoard. 0 disables."
        },
    )


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, SpectralDistillationConfig]:
    parser = HfArgumentParser((ModelArguments, DataArguments, SpectralDistillationConfig))
    *parsed, unknown = parser.parse_args_into_dataclasses(args=expand_config_argument(argv), return_remaining_strings=True)
    if unknown:
        known = [option for action in parser._actions for option in action.option_strings]
        flags = [u for u in unknown if u.startswith("--")] or unknown
        hints = {f: difflib.get_close_matches(f, known, n=1) for f in flags}
        hint = "; ".join(f"did you mean {m[0]} for {f}?" for f, m in hints.items() if m)
        raise UsageError(f"unknown option(s) {' '.join(unknown)}" + (f" ({hint})" if hint else "") + "; see --help")
    return tuple(parsed)


def hub_token(args: SpectralDistillationConfig) -> Optional[str]:
    """The Hub token from --hub_token or the environment; never logged."""
    return args.hub_token or os.environ.get("HF_TOKEN") or None


def resolve_resume(args: SpectralDistillationConfig) -> Optional[str]:
    """``--resume_from_checkpoint true`` → the last complete checkpoint of output_dir; a path is checked."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if str(value).lower() in ("true", "yes", "last", "1"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise UsageError(f"resume_from_checkpoint: no checkpoint-* folder in '{args.output_dir}' to resume from")
        return last
    if not os.path.isdir(value):
        raise UsageError(f"resume_from_checkpoint: '{value}' is not a checkpoint folder")
    return value


def check_model_arguments(model_args: ModelArguments, args: SpectralDistillationConfig) -> None:
    if not model_args.student:
        raise UsageError("student: no student given; pass --student (a built-in architecture, folder or Hub id)")
    if args.needs_teacher and not model_args.teacher:
        raise UsageError(
            f"teacher: distillation_type='{args.distillation_type}' with alpha={args.alpha} and beta={args.beta} needs "
            "--teacher (a Hub id or folder); use --distillation_type none --beta 0 to train without one"
        )


def train_teacher(model_args: ModelArguments, data, args: SpectralDistillationConfig, processor) -> None:
    """Train a teacher from scratch into ``model_args.teacher`` (the offline demo's first stage)."""
    loaded = load_model(model_args.teacher_architecture, argument="teacher_architecture", id2label=data.id2label)
    teacher_dir = model_args.teacher
    teacher_args = dataclasses.replace(
        args,
        output_dir=teacher_dir,
        distillation_type="none",
        beta=0.0,
        student_layers=None,
        teacher_layers=None,
        num_train_epochs=model_args.teacher_num_train_epochs,
        learning_rate=model_args.teacher_learning_rate,
        max_steps=-1 if not data.streaming else args.max_steps,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        push_to_hub=False,
        resume_from_checkpoint=None,
        report_to=[],
    )
    logger.info("training a %s teacher into %s (%s epochs)", model_args.teacher_architecture, teacher_dir, teacher_args.num_train_epochs)
    trainer = SpectralDistillationTrainer(
        model=loaded.model, args=teacher_args, train_dataset=data.train, data_collator=data.collator, processing_class=processor
    )
    trainer.train()
    trainer.save_model(teacher_dir)


def evaluate_model(model, data, args: SpectralDistillationConfig, processor) -> dict[str, float]:
    """Top-1/top-5 of any classifier on the eval split (used for the teacher)."""
    eval_args = dataclasses.replace(
        args, distillation_type="none", beta=0.0, student_layers=None, teacher_layers=None, report_to=[],
        push_to_hub=False, resume_from_checkpoint=None,
    )
    trainer = SpectralDistillationTrainer(
        model=model, args=eval_args, eval_dataset=data.eval, data_collator=data.collator, processing_class=processor
    )
    metrics = trainer.evaluate(metric_key_prefix="teacher")
    return {k.removeprefix("teacher_"): v for k, v in metrics.items()}


def describe_run(model_args, data_args, args, student: LoadedModel, teacher: Optional[LoadedModel], trainer, data) -> str:
    lines = ["", "=" * 88, "hf_spectralkd run configuration", "=" * 88]
    student_arch = type(student.model).__name__
    lines.append(f"student : {student.source} [{student.kind}] {student_arch}, {count_parameters(student.model):,} params")
    if teacher is not None:
        lines.append(
            f"teacher : {teacher.source} [{teacher.kind}] {type(teacher.model).__name__}, "
            f"{count_parameters(teacher.model):,} params" + (f", revision {teacher.revision}" if teacher.revision else "")
        )
    size = f"{data.train_size:,} images" if data.train_size else "size unknown"
    lines.append(f"data    : {data_args.dataset} ({'streamed' if data.streaming else 'map-style'}, {size}), "
                 f"{len(data.id2label)} classes, eval on {len(data.eval) if data.eval is not None else 0:,} images")
    lines.append(
        f"loss    : {'' if not args.uses_teacher_logits else f'(1-{args.alpha})·CE + {args.alpha}·{args.distillation_type}KD(T={args.temperature})'}"
        f"{'CE' if not args.uses_teacher_logits else ''} + {args.beta}·L_{args.feature_loss}, label smoothing {args.label_smoothing}"
    )
    lines.append(
        f"train   : epochs {args.num_train_epochs}, max_steps {args.max_steps}, batch {args.per_device_train_batch_size}"
        f"×{args.world_size} proc×{args.gradient_accumulation_steps} accum, lr {args.learning_rate} "
        f"({args.lr_schedule if args.lr_schedule == 'deit' else getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}), weight decay {args.weight_decay}, "
        f"precision {'bf16' if args.bf16 else 'fp16' if args.fp16 else 'fp32'}, seed {args.seed}"
    )
    lines.append(f"output  : {args.output_dir}")
    lines.append("layer map:")
    lines.append(format_layer_map(trainer.layer_map))
    lines.append("=" * 88)
    return "\n".join(lines)


def fixed_eval_batch(data, count: int):
    """The first ``count`` evaluation images (deterministic eval transform) as one tensor."""
    if data.eval is None or count <= 0:
        return None
    samples = [data.eval[i] for i in range(min(count, len(data.eval)))]
    return data.collator(samples)["pixel_values"]


def write_profile_comparison(trainer, teacher, pixel_values, output_dir: str) -> dict[str, Any]:
    """Teacher and student spectral profiles on the same images: JSON, overlay plot, similarity.

    Skipped under DeepSpeed ZeRO-3, where neither model's parameters are whole on any one process.
    """
    from hf_spectralkd.analysis import compare_profiles, spectral_profile
    from hf_spectralkd.analysis.plots import plot_profile_comparison
    from hf_spectralkd.hub import PROFILE_PLOT

    student_model = trainer.accelerator.unwrap_model(trainer.model)
    student_profile = spectral_profile(student_model, pixel_values.to(trainer.args.device), model_name="student")
    teacher_profile = spectral_profile(teacher.to(trainer.args.device), pixel_values.to(trainer.args.device), model_name="teacher")
    comparison = compare_profiles(student_profile, teacher_profile)
    if trainer.is_world_process_zero():  # every rank computed (cheap, collective-free); one writes
        payload = {"teacher": teacher_profile.to_dict(), "student": student_profile.to_dict(), "comparison": comparison.to_dict()}
        Path(output_dir, "spectral_profiles.json").write_text(json.dumps(payload, indent=2))
        plot_profile_comparison([teacher_profile, student_profile], ["teacher", "student"], Path(output_dir, PROFILE_PLOT),
                                title=f"Spectral intensity, normalised (Pearson {comparison.pearson:.3f})")
    return {"pearson": comparison.pearson, "mean_abs_distance": comparison.mean_abs_distance}


def write_results(path: str, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written results file


@exit_on_error
def main(argv: Optional[list[str]] = None) -> int:
    started = time.time()
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())

    check_model_arguments(model_args, args)
    resume = resolve_resume(args)
    check_output_dir(args.output_dir, args.overwrite_output_dir, resume)
    set_seed(args.seed)
    ensure_deepspeed_distributed(args)
    token = hub_token(args)

    raw = open_image_datasets(data_args, args.seed, token)
    student = load_model(
        model_args.student, argument="student", from_scratch=model_args.student_from_scratch, id2label=raw.id2label,
        revision=model_args.student_revision, token=token, trust_remote_code=args.trust_remote_code,
    )
    image_size = data_args.image_size or describe_taps(student.model).image_size[0]
    data = prepare_image_datasets(raw, image_size, args.seed, args.label_smoothing)
    processor = build_image_processor(data_args, image_size)

    teacher: Optional[LoadedModel] = None
    if args.needs_teacher:
        if model_args.train_teacher_if_missing and not os.path.exists(model_args.teacher):
            train_teacher(model_args, data, args, processor)
        teacher = load_model(
            model_args.teacher, argument="teacher", revision=args.teacher_revision, token=token,
            trust_remote_code=args.trust_remote_code,
        )

    if data.streaming and args.max_steps <= 0:
        if not data.train_size:
            raise UsageError(
                "max_steps: a streamed dataset of unknown size needs --max_steps, or --train_samples to derive it "
                "from --num_train_epochs"
            )
        args.max_steps = steps_for_epochs(
            data.train_size, args.num_train_epochs, args.per_device_train_batch_size, args.world_size,
            args.gradient_accumulation_steps,
        )
    if args.eval_strategy != "no" and data.eval is None:
        raise UsageError(f"eval_strategy: '{args.eval_strategy}' needs an eval split; '{data_args.eval_split}' was not found")

    trainer = SpectralDistillationTrainer(
        model=student.model, teacher_model=teacher.model if teacher else None, args=args,
        train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator, processing_class=processor,
    )
    trainer.teacher_info = teacher
    trainer.student_info = student
    trainer.dataset_name = data_args.dataset
    trainer.dataset_split = raw.eval_split
    profile_batch = fixed_eval_batch(data, max(model_args.profile_images, 32 if model_args.spectral_dynamics_steps else 0))
    if model_args.spectral_dynamics_steps > 0 and profile_batch is not None:
        from hf_spectralkd.analysis import SpectralDynamicsCallback

        trainer.add_callback(SpectralDynamicsCallback(profile_batch[:32], every_n_steps=model_args.spectral_dynamics_steps))
    if trainer.is_world_process_zero():
        print(describe_run(model_args, data_args, args, student, teacher, trainer, data), flush=True)
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        resolved = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "training": args.to_dict()}
        write_results(os.path.join(args.output_dir, "run_config.json"), resolved)

    train_result = trainer.train(resume_from_checkpoint=resume)
    if trainer.state.max_steps and trainer.state.global_step < trainer.state.max_steps:
        # Stopped early by SIGTERM (preemption): the JIT checkpoint holds everything; no final student.
        print(f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} on SIGTERM; checkpoint saved "
              f"in {args.output_dir}; resume with --resume_from_checkpoint true", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    trainer.save_model()
    student_metrics = trainer.evaluate() if data.eval is not None else {}
    teacher_metrics = evaluate_model(teacher.model, data, args, processor) if (
        teacher is not None and model_args.evaluate_teacher and data.eval is not None
    ) else {}

    trainer.teacher_accuracy = teacher_metrics.get("top1")
    profile_similarity = None
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if teacher is not None and profile_batch is not None and model_args.profile_images > 0 and not zero3:
        profile_similarity = write_profile_comparison(
            trainer, teacher.model, profile_batch[: model_args.profile_images], args.output_dir
        )
    if trainer.is_world_process_zero():
        from hf_spectralkd.hub import write_model_card

        write_model_card(trainer, args.output_dir)  # again, now with the teacher's accuracy and the profile plot

    history = [e for e in trainer.state.log_history if "eval_top1" in e]
    results = {
        "teacher": teacher.source if teacher else None,
        "teacher_revision": teacher.revision if teacher else None,
        "teacher_parameters": count_parameters(teacher.model) if teacher else None,
        "student": student.source,
        "student_parameters": count_parameters(student.model),
        "dataset": data_args.dataset,
        "teacher_accuracy": teacher_metrics.get("top1"),
        "teacher_top5": teacher_metrics.get("top5"),
        "student_accuracy": student_metrics.get("eval_top1"),
        "student_top5": student_metrics.get("eval_top5"),
        "best_student_accuracy": max([e["eval_top1"] for e in history] + [student_metrics.get("eval_top1") or 0.0]),
        "layer_map": [{"student": p.student, "teacher": p.teacher, "student_shape": p.student_shape,
                       "teacher_shape": p.teacher_shape} for p in trainer.layer_map],
        "alpha": args.alpha, "beta": args.beta, "temperature": args.temperature,
        "distillation_type": args.distillation_type, "feature_loss": args.feature_loss,
        "label_smoothing": args.label_smoothing,
        "global_steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "train_runtime_s": train_result.metrics.get("train_runtime"),
        "profile_similarity": profile_similarity,
        "skipped_images": next((e["skipped_images"] for e in reversed(trainer.state.log_history) if "skipped_images" in e), 0),
        "wall_time_s": round(time.time() - started, 1),
    }
    if trainer.is_world_process_zero():
        results_file = model_args.results_file or os.path.join(args.output_dir, "results.json")
        write_results(results_file, results)
        summary = {k: results[k] for k in ("teacher_accuracy", "student_accuracy", "wall_time_s")}
        print(f"results → {results_file}: {json.dumps(summary)}", flush=True)
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="SpectralKD distilled student")
    return 0


if __name__ == "__main__":
    sys.exit(main())
