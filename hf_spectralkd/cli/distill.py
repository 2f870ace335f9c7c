"""Distil a Vision Transformer with SpectralKD (arXiv 2412.19055): the training recipe.

Launch with accelerate (one or many GPUs, DeepSpeed) or plain python::

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/run_distill.py recipes/configs/deit_tiny_from_cait_s24.yaml
    python recipes/run_distill.py recipes/configs/demo.yaml            # offline, 2 CPU cores
    hf-spectralkd distill recipes/configs/demo.yaml --max_steps 5

A YAML file given first (or with ``--config``) supplies the options' defaults; options on the
command line override it. Every option of ``SpectralDistillationConfig`` (``--alpha``, ``--beta``,
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

from ..checkpointing import acquire_run_lock
from ..config import SpectralDistillationConfig
from ..data import (
    DataArguments,
    build_image_processor,
    first_images,
    open_image_datasets,
    prepare_image_datasets,
    steps_for_epochs,
)
from ..errors import ConfigurationError
from ..features import describe_taps
from ..layer_map import format_layer_map, resolve_layer_map
from ..models import (
    ARCHITECTURE_PRESETS,
    LoadedModel,
    ensure_deepspeed_distributed,
    load_model,
    model_license,
)
from ..summary import RunSummary, write_json_atomic
from ..trainer import SpectralDistillationTrainer
from .common import (
    check_output_dir,
    exit_on_error,
    read_config_file,
    split_config_argument,
)

logger = logging.getLogger("hf_spectralkd.distill")
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on their signal


@dataclass
class ModelArguments:
    """Which teacher distils which student, and what the run records."""

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
            "help": "Offline demo: if --teacher is a local folder that does not exist, first train a teacher there "
            "from --teacher_architecture on the same data."
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
    license: Optional[str] = field(
        default=None,
        metadata={"help": "License in the student's model card metadata (default: the teacher's, when its card names one)."},
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


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SpectralDistillationConfig)


class _RecipeParser(HfArgumentParser):
    """argparse prints its whole usage (hundreds of options) before an error: give the one line instead."""

    def error(self, message: str):
        raise ConfigurationError(f"{message}; see --help")


def _normalise_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """Older spellings: ``teacher_layers: auto`` is ``layer_map: auto``; layer lists as ``"0,1,18"``."""
    values = dict(values)
    for key in ("student_layers", "teacher_layers"):
        value = values.get(key)
        if isinstance(value, str):
            if value.strip().lower() == "auto" and key == "teacher_layers":
                values.pop(key)
                values["layer_map"] = "auto"
            else:
                values[key] = [part for part in value.replace(",", " ").split() if part]
    return values


def _normalise_argv(argv: list[str]) -> tuple[list[str], set[str]]:
    """The same aliases on the command line: ``--teacher_layers auto``, ``--student_layers 0,1,6``.

    Returns the arguments and the layer lists cleared with an empty value or ``none`` (``--student_layers ""``),
    which become empty rather than keeping a config file's lists.
    """
    out: list[str] = []
    cleared: set[str] = set()
    index = 0
    while index < len(argv):
        token = argv[index]
        flag = token.split("=", 1)[0].replace("-", "_")
        if flag in ("__student_layers", "__teacher_layers"):
            values = [token.split("=", 1)[1]] if "=" in token else []
            index += 1
            while "=" not in token and index < len(argv) and not argv[index].startswith("--"):
                values.append(argv[index])
                index += 1
            parts = [part for value in values for part in value.replace(",", " ").split() if part]
            if flag == "__teacher_layers" and [p.lower() for p in parts] == ["auto"]:
                out += ["--layer_map", "auto"]
            elif not parts or [p.lower() for p in parts] == ["none"]:
                cleared.add(flag[2:])
            else:
                out += [token.split("=", 1)[0], *parts]
            continue
        out.append(token)
        index += 1
    return out, cleared


def _did_you_mean(name: str, known: list[str]) -> str:
    match = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {match[0]} for {name}?)" if match else ""


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, SpectralDistillationConfig]:
    """Parse ``[CONFIG.yaml] [options]``: the config file's values become the parser's defaults."""
    parser = _RecipeParser(ARGUMENT_CLASSES)
    known_dests = {action.dest for action in parser._actions}
    config_path, argv = split_config_argument(argv)
    if config_path:
        values = _normalise_aliases(read_config_file(config_path))
        unknown = [key for key in values if key not in known_dests]
        if unknown:
            hint = "".join(_did_you_mean(key, sorted(known_dests)) for key in unknown[:1])
            raise ConfigurationError(f"config: unknown option(s) {', '.join(unknown)} in '{config_path}'{hint}; see --help")
        parser.set_defaults(**values)
    argv, cleared = _normalise_argv(argv)
    parser.set_defaults(**{name: None for name in cleared})
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigurationError:
        raise
    except (ValueError, TypeError) as error:  # raised while building the dataclasses: the user's values
        raise ConfigurationError(str(error).strip().splitlines()[0]) from error
    if unknown:
        options = [option for action in parser._actions for option in action.option_strings]
        flags = [u for u in unknown if u.startswith("--")] or unknown
        hint = "; ".join(h.strip(" ()") for h in (_did_you_mean(f, options) for f in flags) if h)
        raise ConfigurationError(f"unknown option(s) {' '.join(unknown)}" + (f" ({hint})" if hint else "") + "; see --help")
    return tuple(parsed)


def resolve_resume(args: SpectralDistillationConfig) -> Optional[str]:
    """``--resume_from_checkpoint true`` → the last complete checkpoint of output_dir; a path is checked."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if str(value).lower() in ("true", "yes", "last", "1"):
        last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if last is None:
            raise ConfigurationError(f"resume_from_checkpoint: no checkpoint-* folder in '{args.output_dir}' to resume from")
        return last
    if not os.path.isdir(value):
        raise ConfigurationError(f"resume_from_checkpoint: '{value}' is not a checkpoint folder")
    return value


def check_model_arguments(model_args: ModelArguments, args: SpectralDistillationConfig) -> None:
    if not model_args.student:
        raise ConfigurationError("student: no student given; pass --student (a built-in architecture, folder or Hub id)")
    if args.needs_teacher and not model_args.teacher:
        raise ConfigurationError(
            f"teacher: distillation_type='{args.distillation_type}' with alpha={args.alpha} and beta={args.beta} needs "
            "--teacher (a Hub id or folder); use --distillation_type none --beta 0 to train without one"
        )


def evaluate_model(model, data, args: SpectralDistillationConfig, processor) -> dict[str, float]:
    """Top-1/top-5 of any classifier on the eval split (used for the teacher)."""
    eval_args = dataclasses.replace(
        args, distillation_type="none", beta=0.0, layer_map="manual", student_layers=None, teacher_layers=None,
        report_to=[], push_to_hub=False, resume_from_checkpoint=None,
    )
    trainer = SpectralDistillationTrainer(
        model=model, args=eval_args, eval_dataset=data.eval, data_collator=data.collator, processing_class=processor
    )
    metrics = trainer.evaluate(metric_key_prefix="teacher")
    return {k.removeprefix("teacher_"): v for k, v in metrics.items()}


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
        f"×{args.world_size} proc×{args.gradient_accumulation_steps} accum, lr {s.learning_rate} ({s.lr_schedule}), "
        f"weight decay {s.weight_decay}, precision {s.precision}, seed {s.seed}"
    )
    lines += [f"output  : {args.output_dir}", "layer map:", format_layer_map(layer_map), "=" * 88]
    return "\n".join(lines)


def write_profile_comparison(trainer, teacher, pixel_values, output_dir: str) -> dict[str, Any]:
    """Teacher and student spectral profiles on the same images: JSON, overlay plot, similarity.

    Skipped under DeepSpeed ZeRO-3, where neither model's parameters are whole on any one process.
    """
    from ..analysis import compare_profiles, spectral_profile
    from ..analysis.plots import plot_profile_comparison
    from ..hub import PROFILE_PLOT

    device = trainer.args.device
    student_model = trainer.accelerator.unwrap_model(trainer.model)
    student_profile = spectral_profile(student_model, pixel_values.to(device), model_name="student")
    teacher_profile = spectral_profile(teacher.to(device), pixel_values.to(device), model_name="teacher")
    comparison = compare_profiles(student_profile, teacher_profile)
    if trainer.is_world_process_zero():  # every rank computed (cheap, collective-free); one writes
        payload = {"teacher": teacher_profile.to_dict(), "student": student_profile.to_dict(), "comparison": comparison.to_dict()}
        Path(output_dir, "spectral_profiles.json").write_text(json.dumps(payload, indent=2))
        plot_profile_comparison([teacher_profile, student_profile], ["teacher", "student"], Path(output_dir, PROFILE_PLOT),
                                title=f"Spectral intensity, normalised (Pearson {comparison.pearson:.3f})")
    return {"pearson": comparison.pearson, "mean_abs_distance": comparison.mean_abs_distance}


@exit_on_error
def main(argv: Optional[list[str]] = None) -> int:
    started = time.time()
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())

    check_model_arguments(model_args, args)
    resume = resolve_resume(args)
    check_output_dir(args.output_dir, args.overwrite_output_dir, resume)
    lock = acquire_run_lock(args.distributed_state, args.output_dir)
    try:
        return _run(model_args, data_args, args, resume, started)
    finally:
        if lock is not None:
            lock.release()


def _run(model_args: ModelArguments, data_args: DataArguments, args: SpectralDistillationConfig,
         resume: Optional[str], started: float) -> int:
    set_seed(args.seed)
    ensure_deepspeed_distributed(args)
    token = os.environ.get("HF_TOKEN") or None  # --hub_token was moved there; never logged

    raw = open_image_datasets(data_args, args.seed, token)
    student = load_model(
        model_args.student, argument="student", from_scratch=model_args.student_from_scratch, id2label=raw.id2label,
        revision=model_args.student_revision, token=token, trust_remote_code=args.trust_remote_code,
    )
    image_size = data_args.image_size or describe_taps(student.model).image_size[0]
    with args.main_process_first(desc="stream layout"):  # remote footers are read, or shards counted, once
        data = prepare_image_datasets(raw, image_size, args.seed, args.label_smoothing_factor, cache_dir=args.output_dir)
    processor = build_image_processor(data_args, image_size)

    teacher: Optional[LoadedModel] = None
    if args.needs_teacher:
        if model_args.train_teacher_if_missing and not os.path.exists(model_args.teacher):
            from ..demo import train_demo_teacher

            train_demo_teacher(model_args.teacher_architecture, model_args.teacher, data, args, processor,
                               model_args.teacher_num_train_epochs, model_args.teacher_learning_rate)
        teacher = load_model(
            model_args.teacher, argument="teacher", revision=args.teacher_revision, token=token,
            trust_remote_code=args.trust_remote_code,
        )

    if data.streaming and args.max_steps <= 0:
        if not data.train_size:
            raise ConfigurationError(
                "max_steps: a streamed dataset of unknown size needs --max_steps, or --train_samples to derive it "
                "from --num_train_epochs"
            )
        args.max_steps = steps_for_epochs(
            data.train_size, args.num_train_epochs, args.per_device_train_batch_size, args.world_size,
            args.gradient_accumulation_steps, data_args.repeated_augmentation,
        )
    if args.eval_strategy != "no" and data.eval is None:
        raise ConfigurationError(f"eval_strategy: '{args.eval_strategy}' needs an eval split; '{data_args.eval_split}' was not found")

    profile_count = max(model_args.profile_images, 32 if model_args.spectral_dynamics_steps else 0)
    profile_batch = first_images(data.eval, profile_count)
    auto_batch = None
    if args.layer_map == "auto" and args.uses_features:  # the teacher is profiled on 32 images
        auto_batch = profile_batch[:32] if profile_batch is not None else first_images(data.eval or data.train, 32)
    layer_map = resolve_layer_map(student.model, teacher.model if teacher else None, args, auto_batch)
    license_ = model_args.license or (model_license(model_args.teacher, args.teacher_revision, token) if teacher else None)
    summary = RunSummary.describe(
        args, student.model, teacher.model if teacher else None, layer_map,
        student_source=student.source, student_kind=student.kind,
        teacher_source=teacher.source if teacher else None, teacher_revision=teacher.revision if teacher else None,
        dataset=data_args.dataset, eval_split=raw.eval_split, license=license_,
    )
    trainer = SpectralDistillationTrainer(
        model=student.model, teacher_model=teacher.model if teacher else None, args=args, layer_map=layer_map,
        summary=summary, train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
        processing_class=processor,
    )
    if model_args.spectral_dynamics_steps > 0 and profile_batch is not None:
        from ..analysis import SpectralDynamicsCallback

        trainer.add_callback(SpectralDynamicsCallback(profile_batch[:32], every_n_steps=model_args.spectral_dynamics_steps))
    if trainer.is_world_process_zero():
        print(describe_run(summary, args, data, layer_map), flush=True)
        resolved = {"model": dataclasses.asdict(model_args), "data": dataclasses.asdict(data_args), "training": args.to_dict()}
        write_json_atomic(os.path.join(args.output_dir, "run_config.json"), resolved)

    train_result = trainer.train(resume_from_checkpoint=resume)
    if trainer.state.max_steps and trainer.state.global_step < trainer.state.max_steps:
        # Stopped early by SIGTERM (preemption): the JIT checkpoint holds everything; no final student.
        print(f"stopped at step {trainer.state.global_step} of {trainer.state.max_steps} on SIGTERM; checkpoint saved "
              f"in {args.output_dir}; resume with --resume_from_checkpoint true", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    trainer.save_model()
    if data.eval is not None:
        trainer.evaluate()
    if teacher is not None and model_args.evaluate_teacher and data.eval is not None:
        teacher_metrics = evaluate_model(teacher.model, data, args, processor)
        summary.teacher_accuracy, summary.teacher_top5 = teacher_metrics.get("top1"), teacher_metrics.get("top5")

    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if teacher is not None and profile_batch is not None and model_args.profile_images > 0 and not zero3:
        summary.profile_similarity = write_profile_comparison(
            trainer, teacher.model, profile_batch[: model_args.profile_images], args.output_dir
        )
    summary.record_training_state(trainer.state)
    summary.train_runtime_s = train_result.metrics.get("train_runtime")
    summary.record_image_counts(*trainer.training_image_counts())  # every process: a sum over them
    summary.wall_time_s = round(time.time() - started, 1)
    if trainer.is_world_process_zero():
        from ..hub import write_model_card

        # again, now with the teacher's accuracy and the profile plot
        write_model_card(summary, args.output_dir, args.hub_model_id)
        results_file = model_args.results_file or os.path.join(args.output_dir, "results.json")
        summary.write_json(results_file)
        brief = {"teacher_accuracy": summary.teacher_accuracy, "student_accuracy": summary.student_accuracy,
                 "wall_time_s": summary.wall_time_s}
        print(f"results → {results_file}: {json.dumps(brief)}", flush=True)
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="SpectralKD distilled student")
    return 0


if __name__ == "__main__":
    sys.exit(main())
