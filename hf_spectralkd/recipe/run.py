"""Distil a Vision Transformer with SpectralKD (arXiv 2412.19055): the training recipe, top to bottom.

Parse → load data → load models → trainer → train and/or evaluate → save and report, in the shape of
transformers' image-classification example; ``--do_train false`` evaluates on the same path. The run's
decisions (teacher, input adapter, label order, layer map, record, lock, resume point) are the
trainer's. Writes to ``--output_dir``: checkpoints, the final student (safetensors, config, image
processor, model card), ``results.json`` and ``run_config.json``.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import transformers
from transformers import set_seed

from ..checkpointing.write_errors import reporting_write_failure
from ..data import first_images, open_image_datasets, prepare_image_datasets
from ..errors import ConfigurationError
from ..io.hub import PROFILE_PLOT
from ..io.model_loading import ensure_deepspeed_distributed, load_model, model_license
from ..io.run_summary import RunSummary, layer_map_record
from ..preprocessing import input_spec_of, spec_from_processor, student_image_size
from ..training import SpectralDistillationTrainer
from ..training.output_dir import check_writable
from ..training.scoring import DataClasses
from .arguments import parse_arguments, streamed_max_steps
from .report import (
    describe_run,
    spectral_extras,
    with_student_preprocessing,
    write_eval_predictions,
    write_profile_comparison,
    write_results,
)

logger = logging.getLogger("hf_spectralkd.distill")
EXIT_PREEMPTED = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on their signal


def run(argv: list[str]) -> int:
    """The recipe on ``[CONFIG] [options]``; returns the exit code (0, or 143 when stopped by SIGTERM)."""
    started = time.time()
    model_args, data_args, args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if args.should_log else logging.WARNING)
    transformers.utils.logging.set_verbosity(args.get_process_log_level())
    if not model_args.student:
        raise ConfigurationError("student: no student given; pass --student (a built-in architecture, folder or Hub id)")
    if not args.do_train and not args.do_eval:
        raise ConfigurationError("do_train: false leaves only evaluation, which needs --do_eval true")
    if args.push_to_hub:
        from ..io.hub import require_online_hub

        require_online_hub("push_to_hub", "pass --push_to_hub false and upload the finished run later with "
                           "`hf-spectralkd push OUTPUT_DIR --repo_id USER/NAME`")
    check_writable(args.output_dir)  # before data is cached there; the rest of the folder check is the trainer's
    set_seed(args.seed)
    ensure_deepspeed_distributed(args)
    token = args.hub_token or os.environ.get("HF_TOKEN") or None  # the trainer moves --hub_token to HF_TOKEN; never logged

    # Data (an evaluation opens only its split) and the student, whose own preprocessing fills the unset options.
    raw = open_image_datasets(data_args, args.seed, token, train=args.do_train)
    student = load_model(model_args.student, argument="student", from_scratch=model_args.student_from_scratch,
                         id2label=raw.id2label if args.do_train else None,  # an evaluated student keeps its head
                         revision=model_args.student_revision, token=token, trust_remote_code=args.trust_remote_code)
    if student.kind == "pretrained":
        data_args = with_student_preprocessing(
            data_args, input_spec_of(student.model, student.source, model_args.student_revision, token))
        raw.args = data_args
    with args.main_process_first(desc="stream layout"):  # remote footers are read, or shards counted, once
        data = prepare_image_datasets(raw, student_image_size(student.model, data_args.image_size), args.seed,
                                      args.label_smoothing_factor, cache_dir=args.output_dir)
    if args.do_train and data.streaming and args.max_steps <= 0:
        args.max_steps = streamed_max_steps(args, data.train_size, data_args.repeated_augmentation)
    if args.do_train and args.eval_strategy != "no" and data.eval is None:
        raise ConfigurationError(f"eval_strategy: '{args.eval_strategy}' needs an eval split; '{data_args.eval_split}' was not found")

    # The teacher: what the loss needs when training; when evaluating, only the one given, to score it.
    teacher = None
    if (args.needs_teacher and args.do_train) or (not args.do_train and model_args.teacher and model_args.evaluate_teacher):
        if model_args.train_teacher_if_missing and not os.path.exists(model_args.teacher):
            from ..demo import train_demo_teacher

            if not train_demo_teacher(model_args.teacher_architecture, model_args.teacher, data, args, data.image_processor,
                                      model_args.teacher_num_train_epochs, model_args.teacher_learning_rate):
                print("stopped on SIGTERM while training the demo teacher; nothing of it was kept: the next run "
                      "trains it again", file=sys.stderr, flush=True)
                return EXIT_PREEMPTED
        teacher = load_model(model_args.teacher, argument="teacher", revision=args.teacher_revision, token=token,
                             trust_remote_code=args.trust_remote_code) if model_args.teacher else None
    student_spec = spec_from_processor(data.image_processor, source="the student's batches")
    teacher_spec = input_spec_of(teacher.model, teacher.source, teacher.revision, token, mean=args.teacher_image_mean,
                                 std=args.teacher_image_std) if teacher else None
    license_ = model_args.license or (model_license(model_args.teacher, args.teacher_revision, token) if teacher else None)

    # The trainer decides the rest (evaluating alone: both models checked against, and scored in, the data's classes).
    profile_images, dynamics_steps = spectral_extras(model_args, student.model, teacher.model if teacher else None)
    profile_batch = first_images(data.eval, max(profile_images, 32 if dynamics_steps else 0)) if args.do_train else None
    summary = RunSummary.describe(
        args, student.model, teacher.model if teacher else None, student_source=student.source,
        student_kind=student.kind, teacher_source=teacher.source if teacher else None,
        teacher_revision=teacher.revision if teacher else None, dataset=data_args.dataset, eval_split=raw.eval_split,
        license=license_)
    trainer = SpectralDistillationTrainer(
        model=student.model, teacher_model=teacher.model if teacher else None, args=args, summary=summary,
        student_inputs=student_spec, teacher_inputs=teacher_spec, classes=DataClasses(data.id2label, data_args.dataset),
        train_dataset=data.train if args.do_train else None, eval_dataset=data.eval, data_collator=data.collator,
        processing_class=data.image_processor)
    summary.layer_map = layer_map_record(trainer.layer_map)  # the trainer resolved it

    # Training, the final save, evaluation, results and card: under the output folder's lock, released at the end.
    with trainer.holding_output_dir():
        if args.do_train:
            if dynamics_steps > 0 and profile_batch is not None:
                from ..analysis import SpectralDynamicsCallback

                trainer.add_callback(SpectralDynamicsCallback(profile_batch[:32], trainer=trainer,
                                                              every_n_steps=dynamics_steps))
            if trainer.is_world_process_zero():
                print(describe_run(summary, args, data, trainer.layer_map), flush=True)
            trainer.run_record.add(model=model_args, data=data_args)  # written once a resumed checkpoint is checked
            train_result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
            step = trainer.preempted_at_step
            if step is not None:  # SIGTERM: that step's checkpoint holds everything; no final student
                if trainer.is_world_process_zero():
                    print(f"stopped at step {step} of {trainer.state.max_steps} on SIGTERM; checkpoint saved: "
                          f"checkpoint-{step} in {args.output_dir}; resume with --resume_from_checkpoint true",
                          file=sys.stderr, flush=True)
                return EXIT_PREEMPTED
            with reporting_write_failure(args.output_dir, "the model card README.md"):  # the weights: save_final
                trainer.save_model()
            trainer.log_metrics("train", train_result.metrics)
            with reporting_write_failure(args.output_dir, "train_results.json, all_results.json, trainer_state.json"):
                trainer.save_metrics("train", train_result.metrics)
                trainer.save_state()
            summary.train_runtime_s = train_result.metrics.get("train_runtime")
        if data.eval is not None and args.do_eval:
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            with reporting_write_failure(args.output_dir, "eval_results.json, all_results.json, eval_predictions.npz", args.do_train):
                trainer.save_metrics("eval", metrics)
                write_eval_predictions(trainer, args.output_dir)  # per image: what ablate pairs runs by
            if not args.do_train:
                summary.record_evaluation(metrics)
                summary.best_student_accuracy = summary.student_accuracy
        if teacher is not None and model_args.evaluate_teacher and data.eval is not None and args.do_eval:
            scores = trainer.evaluate_teacher()
            summary.teacher_accuracy, summary.teacher_top5 = scores.get("top1"), scores.get("top5")

        zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
        if args.do_train and teacher is not None and profile_batch is not None and profile_images > 0 and not zero3:
            with reporting_write_failure(args.output_dir, f"spectral_profiles.json, {PROFILE_PLOT}"):
                summary.profile_similarity = write_profile_comparison(
                    trainer, teacher.model, profile_batch[:profile_images], args.output_dir, trainer.teacher_inputs)
        if args.do_train:
            summary.record_training_state(trainer.state)
            summary.record_image_counts(*trainer.image_counter.training_totals())  # every process: a sum over them
        else:
            summary.global_steps, summary.max_steps = 0, 0
        results = model_args.results_file or "results.json"
        with reporting_write_failure(args.output_dir, f"README.md, {results}" if args.do_train else results, args.do_train):
            write_results(summary, trainer, model_args, args, started, card=args.do_train)
        if trainer.args.push_to_hub:  # an evaluation alone pushes nothing
            trainer.push_to_hub(commit_message="SpectralKD distilled student")
        return 0
