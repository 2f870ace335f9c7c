"""Distil a Vision Transformer with SpectralKD (arXiv 2412.19055): the training recipe.

Launch with accelerate (one or many GPUs, DeepSpeed) or plain python::

    accelerate launch --config_file recipes/accelerate/single_gpu.yaml \\
        recipes/run_distill.py recipes/configs/deit_tiny_from_cait_s24.yaml
    python recipes/run_distill.py recipes/configs/demo.yaml            # offline, 2 CPU cores
    hf-spectralkd distill demo --max_steps 5                          # a shipped config, by name

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
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import transformers
from transformers import HfArgumentParser, set_seed

from ..checkpointing import acquire_run_lock, newest_verified_checkpoint, verify_checkpoint
from ..config import SpectralDistillationConfig
from ..data import (
    DataArguments,
    first_images,
    open_image_datasets,
    prepare_image_datasets,
    steps_for_epochs,
)
from ..errors import ConfigurationError
from ..features import has_taps
from ..integrity import damaged
from ..layer_map import format_layer_map, resolve_layer_map
from ..models import (
    ARCHITECTURE_PRESETS,
    LoadedModel,
    ensure_deepspeed_distributed,
    load_model,
    model_license,
)
from ..preprocessing import (
    InputSpec,
    configured_size,
    input_spec_of,
    spec_from_processor,
    student_image_size,
    teacher_input_adapter,
)
from ..summary import RunSummary
from ..teacher import TeacherClassifier
from ..trainer import SpectralDistillationTrainer
from ..utils import unwrap_model
from .common import (
    check_config_values,
    check_output_dir,
    clear_previous_run,
    close_process_group,
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
            "evaluation): logged to the --report_to trackers and spectral_dynamics.jsonl. 0 disables."
        },
    )


ARGUMENT_CLASSES = (ModelArguments, DataArguments, SpectralDistillationConfig)


class _RecipeParser(HfArgumentParser):
    """argparse prints its whole usage (hundreds of options) before an error: give the one line instead.

    Help texts are plain text in the dataclasses' metadata, but argparse formats them with ``%`` (the
    defaults formatter appends ``%(default)s``): a lone ``%`` ("above 1 %") made ``--help`` crash.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        for action in self._actions:
            if action.help:  # transformers' own texts are escaped already ("~20%%"): "%%" and "%(" stay
                action.help = re.sub(r"%%|%\(|%", lambda m: m.group() if len(m.group()) == 2 else "%%", action.help)

    def error(self, message: str):
        # The message quotes the user's value, which a YAML file can make multi-line: keep one line.
        message = message.replace("\r", "\\r").replace("\n", "\\n")
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


def _key_name(key: Any) -> str:
    """A config key as a message shows it: as written, or quoted when it is not plain text (``1``, ``'a\\nb'``)."""
    return key if isinstance(key, str) and key.isprintable() and key else repr(key)


def parse_arguments(
    argv: list[str], overrides: Optional[dict[str, Any]] = None
) -> tuple[ModelArguments, DataArguments, SpectralDistillationConfig]:
    """Parse ``[CONFIG.yaml] [options]``: the config file's values become the parser's defaults.

    ``overrides`` (Python values) replace the config file's, and the command line replaces both.
    """
    parser = _RecipeParser(ARGUMENT_CLASSES)
    known_dests = {action.dest for action in parser._actions}
    config_path, argv = split_config_argument(argv)
    sources = [(f"config: '{config_path}'", _normalise_aliases(read_config_file(config_path)))] if config_path else []
    if overrides:
        sources.append(("load_recipe", _normalise_aliases(overrides)))
    for where, values in sources:
        unknown = [key for key in values if key not in known_dests]
        if unknown:
            names = [_key_name(key) for key in unknown]  # YAML keys can be numbers, null, multi-line text
            hint = _did_you_mean(names[0], sorted(known_dests))
            where_text = f" in {where.split(': ', 1)[1]}" if ": " in where else ""
            raise ConfigurationError(f"{where.split(':')[0]}: unknown option(s) {', '.join(names)}{where_text}{hint}; "
                                     "see --help")
        check_config_values(values, ARGUMENT_CLASSES, config_path if where.startswith("config") else where)
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


def streamed_max_steps(args: SpectralDistillationConfig, train_size: Optional[int], repeats: int = 1) -> int:
    """Optimizer steps of ``--num_train_epochs`` over a streamed split of ``train_size`` images (a stream has
    no length), an epoch counted as the reference does with ``repeats`` augmented copies of each image."""
    if not train_size:
        raise ConfigurationError(
            "max_steps: a streamed dataset of unknown size needs --max_steps, or --train_samples to derive it "
            "from --num_train_epochs"
        )
    return steps_for_epochs(train_size, args.num_train_epochs, args.per_device_train_batch_size, args.world_size,
                            args.gradient_accumulation_steps, repeats)


def load_recipe(
    config: str, **overrides: Any
) -> tuple[ModelArguments, DataArguments, SpectralDistillationConfig]:
    """A recipe config (a file, or a shipped config's name such as ``deit_tiny_from_cait_s24``) as the recipe's three
    argument objects, exactly as ``run_distill.py CONFIG`` would use them, for the Python API.

    ``overrides`` set any option of the three (``output_dir="runs/x"``, ``per_device_train_batch_size=128``).
    For a streamed dataset of known size (ImageNet, or ``train_samples``), ``max_steps`` is derived from the
    epochs as the recipe does.
    """
    model_args, data_args, args = parse_arguments([config], overrides)
    if data_args.streaming and args.max_steps <= 0:
        from ..data import KNOWN_TRAIN_SIZES

        size = data_args.train_samples or KNOWN_TRAIN_SIZES.get(data_args.dataset)
        if size:
            args = dataclasses.replace(args, max_steps=streamed_max_steps(args, size, data_args.repeated_augmentation))
    return model_args, data_args, args


def resolve_resume(args: SpectralDistillationConfig) -> Optional[str]:
    """The checkpoint folder to resume from, verified, or ``None``.

    ``--resume_from_checkpoint true``: the newest checkpoint of output_dir that verifies; damaged newer
    ones are skipped with a warning. An explicit path must verify: it is never silently replaced.
    """
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if str(value).lower() in ("true", "yes", "last", "1"):
        return newest_verified_checkpoint(args.output_dir)
    if not os.path.isdir(value):
        raise ConfigurationError(f"resume_from_checkpoint: '{value}' is not a checkpoint folder")
    problems = verify_checkpoint(value)
    if problems:
        raise damaged("resume_from_checkpoint", value, problems,
                      "pass an earlier checkpoint, or --resume_from_checkpoint true to resume from the newest one that verifies")
    return value


def check_model_arguments(model_args: ModelArguments, args: SpectralDistillationConfig) -> None:
    if not model_args.student:
        raise ConfigurationError("student: no student given; pass --student (a built-in architecture, folder or Hub id)")
    if args.do_train and args.needs_teacher and not model_args.teacher:
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
    from ..hub import PROFILE_PLOT

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


@exit_on_error
def main(argv: Optional[list[str]] = None) -> int:
    started = time.time()
    model_args, data_args, args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())

    check_model_arguments(model_args, args)
    if args.push_to_hub:
        from ..hub import require_online_hub

        require_online_hub("push_to_hub", "pass --push_to_hub false and upload the finished run later with "
                           "`hf-spectralkd push OUTPUT_DIR --repo-id USER/NAME`")
    resume = resolve_resume(args)
    check_output_dir(args.output_dir, args.overwrite_output_dir, resume)
    lock = acquire_run_lock(args.distributed_state, args.output_dir)
    try:
        if args.overwrite_output_dir and lock is not None:  # the main process, now sure no other run uses the folder
            clear_previous_run(args.output_dir)
        code = _run(model_args, data_args, args, resume, started)
    finally:
        if lock is not None:
            lock.release()
    close_process_group()
    return code


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


def _run(model_args: ModelArguments, data_args: DataArguments, args: SpectralDistillationConfig,
         resume: Optional[str], started: float) -> int:
    set_seed(args.seed)
    ensure_deepspeed_distributed(args)
    token = os.environ.get("HF_TOKEN") or None  # --hub_token was moved there; never logged

    evaluate_only = not args.do_train
    if evaluate_only and not args.do_eval:
        raise ConfigurationError("do_train: false leaves only evaluation, which needs --do_eval true")
    raw = open_image_datasets(data_args, args.seed, token, train=not evaluate_only)  # evaluation opens only its split
    student = load_model(
        model_args.student, argument="student", from_scratch=model_args.student_from_scratch,
        # An evaluated student keeps its own head and class names (checked against the data below).
        id2label=None if evaluate_only else raw.id2label,
        revision=model_args.student_revision, token=token, trust_remote_code=args.trust_remote_code,
    )
    if student.kind == "pretrained":
        data_args = with_student_preprocessing(
            data_args, input_spec_of(student.model, student.source, model_args.student_revision, token)
        )
        raw.args = data_args
    image_size = student_image_size(student.model, data_args.image_size)
    with args.main_process_first(desc="stream layout"):  # remote footers are read, or shards counted, once
        data = prepare_image_datasets(raw, image_size, args.seed, args.label_smoothing_factor, cache_dir=args.output_dir)
    processor = data.image_processor
    student_spec = spec_from_processor(processor, source="the student's batches")

    teacher: Optional[LoadedModel] = None
    # An evaluate-only run scores a teacher only when one is given (a student is evaluated alone).
    if (args.needs_teacher and not evaluate_only) or (evaluate_only and model_args.teacher and model_args.evaluate_teacher):
        if model_args.train_teacher_if_missing and not os.path.exists(model_args.teacher):
            from ..demo import train_demo_teacher

            train_demo_teacher(model_args.teacher_architecture, model_args.teacher, data, args, processor,
                               model_args.teacher_num_train_epochs, model_args.teacher_learning_rate)
        teacher = load_model(
            model_args.teacher, argument="teacher", revision=args.teacher_revision, token=token,
            trust_remote_code=args.trust_remote_code,
        )
    teacher_spec = input_spec_of(
        teacher.model, teacher.source, teacher.revision, token, mean=args.teacher_image_mean, std=args.teacher_image_std
    ) if teacher else None
    license_ = model_args.license or (model_license(model_args.teacher, args.teacher_revision, token) if teacher else None)
    if evaluate_only:
        return _evaluate_only(model_args, data_args, args, student, teacher, data, raw, processor, student_spec,
                              teacher_spec, license_, started)

    if data.streaming and args.max_steps <= 0:
        args.max_steps = streamed_max_steps(args, data.train_size, data_args.repeated_augmentation)
    if args.eval_strategy != "no" and data.eval is None:
        raise ConfigurationError(f"eval_strategy: '{args.eval_strategy}' needs an eval split; '{data_args.eval_split}' was not found")

    profile_images, dynamics_steps = spectral_extras(model_args, student.model, teacher.model if teacher else None)
    profile_count = max(profile_images, 32 if dynamics_steps else 0)
    profile_batch = first_images(data.eval, profile_count)
    auto_batch = auto_inputs = None
    if args.layer_map == "auto" and args.uses_features:  # the teacher is profiled on 32 images, as it will see them
        auto_batch = profile_batch[:32] if profile_batch is not None else first_images(data.eval or data.train, 32)
        auto_inputs = teacher_input_adapter(student_spec, teacher_spec, configured_size(student.model)) if teacher else None
    layer_map = resolve_layer_map(student.model, teacher.model if teacher else None, args, auto_batch, auto_inputs)
    summary = RunSummary.describe(
        args, student.model, teacher.model if teacher else None, layer_map,
        student_source=student.source, student_kind=student.kind,
        teacher_source=teacher.source if teacher else None, teacher_revision=teacher.revision if teacher else None,
        dataset=data_args.dataset, eval_split=raw.eval_split, license=license_,
    )
    trainer = SpectralDistillationTrainer(
        model=student.model, teacher_model=teacher.model if teacher else None, args=args, layer_map=layer_map,
        summary=summary, student_inputs=student_spec, teacher_inputs=teacher_spec, train_dataset=data.train,
        eval_dataset=data.eval, data_collator=data.collator, processing_class=processor,
    )
    if dynamics_steps > 0 and profile_batch is not None:
        from ..analysis import SpectralDynamicsCallback

        trainer.add_callback(SpectralDynamicsCallback(profile_batch[:32], trainer=trainer, every_n_steps=dynamics_steps))
    if trainer.is_world_process_zero():
        print(describe_run(summary, args, data, layer_map), flush=True)
    # run_config.json: written by train() once a resumed checkpoint is known to belong to this run
    trainer.record_run(model=model_args, data=data_args)

    train_result = trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted_at_step is not None:
        # Stopped by SIGTERM (preemption): the checkpoint of that step holds everything; no final student.
        step = trainer.preempted_at_step
        if trainer.is_world_process_zero():
            print(f"stopped at step {step} of {trainer.state.max_steps} on SIGTERM; checkpoint saved: checkpoint-{step} in "
                  f"{args.output_dir}; resume with --resume_from_checkpoint true", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()
    if data.eval is not None and args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if teacher is not None and model_args.evaluate_teacher and data.eval is not None and args.do_eval:
        teacher_metrics = evaluate_model(
            TeacherClassifier(teacher.model, trainer.teacher_inputs, trainer.teacher_label_order), data, args, processor
        )
        summary.teacher_accuracy, summary.teacher_top5 = teacher_metrics.get("top1"), teacher_metrics.get("top5")

    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if teacher is not None and profile_batch is not None and profile_images > 0 and not zero3:
        summary.profile_similarity = write_profile_comparison(
            trainer, teacher.model, profile_batch[:profile_images], args.output_dir, trainer.teacher_inputs
        )
    summary.record_training_state(trainer.state)
    summary.train_runtime_s = train_result.metrics.get("train_runtime")
    summary.record_image_counts(*trainer.training_image_counts())  # every process: a sum over them
    _finish(summary, trainer, model_args, args, started)
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="SpectralKD distilled student")
    return 0


def _evaluate_only(model_args, data_args, args, student, teacher, data, raw, processor, student_spec, teacher_spec,
                   license_, started) -> int:
    """``--do_train false --do_eval true``: score the student (and the teacher) on the evaluation split."""
    from ..teacher import teacher_label_order

    data_labels = _LabelsOnly(raw.id2label)
    _check_scored_classes("student", student.model, raw.id2label, data_args.dataset)
    student_order = teacher_label_order(data_labels, student.model)  # the student's classes in the data's order
    teacher_inputs, teacher_order = None, None
    if teacher is not None:
        _check_scored_classes("teacher", teacher.model, raw.id2label, data_args.dataset)
        teacher_order = teacher_label_order(data_labels, teacher.model)
        adapter = teacher_input_adapter(student_spec, teacher_spec, configured_size(student.model))
        teacher_inputs = adapter.to(args.device) if adapter is not None else None
    eval_args = dataclasses.replace(args, distillation_type="none", beta=0.0, layer_map="manual", student_layers=None,
                                    teacher_layers=None, push_to_hub=False, resume_from_checkpoint=None)
    summary = RunSummary.describe(
        eval_args, student.model, teacher.model if teacher else None, student_source=student.source,
        student_kind=student.kind, teacher_source=teacher.source if teacher else None,
        teacher_revision=teacher.revision if teacher else None, dataset=data_args.dataset, eval_split=raw.eval_split,
        license=license_,
    )
    model = student.model if student_order is None else TeacherClassifier(student.model, None, student_order)
    trainer = SpectralDistillationTrainer(model=model, args=eval_args, summary=summary, eval_dataset=data.eval,
                                          data_collator=data.collator, processing_class=processor)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)
    summary.student_accuracy, summary.student_top5 = metrics.get("eval_top1"), metrics.get("eval_top5")
    summary.best_student_accuracy = summary.student_accuracy
    if teacher is not None and model_args.evaluate_teacher:
        teacher_metrics = evaluate_model(TeacherClassifier(teacher.model, teacher_inputs, teacher_order), data, args, processor)
        summary.teacher_accuracy, summary.teacher_top5 = teacher_metrics.get("top1"), teacher_metrics.get("top5")
    summary.global_steps, summary.max_steps = 0, 0
    if trainer.is_world_process_zero():
        results_file = model_args.results_file or os.path.join(args.output_dir, "results.json")
        summary.wall_time_s = round(time.time() - started, 1)
        summary.write_json(results_file)
        print(f"results → {results_file}: {json.dumps({'student_accuracy': summary.student_accuracy, 'teacher_accuracy': summary.teacher_accuracy})}",
              flush=True)
    return 0


def _check_scored_classes(argument: str, model, id2label: dict[int, str], dataset: str) -> None:
    """An evaluated model must predict the data's classes: the count is compared here, before
    :func:`~hf_spectralkd.teacher.teacher_label_order` (whose message speaks of a teacher and a student) matches names."""
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if num_labels is not None and num_labels != len(id2label):
        raise ConfigurationError(
            f"{argument}: the {argument} predicts {num_labels} classes but dataset '{dataset}' has {len(id2label)}; "
            f"evaluate it on the data set it was trained for (or a --{argument} trained on these {len(id2label)} classes)"
        )


class _LabelsOnly:
    """The dataset's class names in the shape :func:`~hf_spectralkd.teacher.teacher_label_order` compares."""

    def __init__(self, id2label: dict[int, str]):
        from types import SimpleNamespace

        self.config = SimpleNamespace(id2label=id2label, num_labels=len(id2label))


def _finish(summary: RunSummary, trainer, model_args: ModelArguments, args: SpectralDistillationConfig, started: float) -> None:
    """Write the card and results.json from the completed summary (main process)."""
    summary.wall_time_s = round(time.time() - started, 1)
    if not trainer.is_world_process_zero():
        return
    from ..hub import write_model_card

    # again, now with the teacher's accuracy and the profile plot
    write_model_card(summary, args.output_dir, args.hub_model_id)
    results_file = model_args.results_file or os.path.join(args.output_dir, "results.json")
    summary.write_json(results_file)
    brief = {"teacher_accuracy": summary.teacher_accuracy, "student_accuracy": summary.student_accuracy,
             "wall_time_s": summary.wall_time_s}
    print(f"results → {results_file}: {json.dumps(brief)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
