"""What a run is, recorded so that a resume can refuse a checkpoint of another run.

A run's record (``run_config.json``) holds every resolved option by section (``model``, ``data``,
``training``, as the recipe gives them), the number of processes (``launch``) and the student's
architecture (``student_config``). :class:`RunRecord` (a part of the trainer) writes it into
every checkpoint, so the record travels with a checkpoint that is copied elsewhere, and, for a
recipe run, into the output folder when training starts.

Before a resumed run trains, :meth:`RunRecord.check_resume` compares the checkpoint's record
with the new run's, field by field, and refuses the checkpoint with one line naming every field
that changes what is computed (a different student width, layer map, loss weight, data, seed,
learning rate or batch): without it a resumed run silently continues another run's weights under
the new run's name, or fails deep in the weight loading. Fields that only change how a run is
watched, saved or fed (logging, output paths, evaluation, DataLoader workers) are
:data:`NEUTRAL_FIELDS`; ``max_steps`` and ``num_train_epochs`` may grow (a run is continued
further), and a length that does not reach past the checkpoint's step is refused on its own, except
for a run trained to its end whose final student was never written (a full disk at the final save):
that run is finished from its last checkpoint without training (:mod:`.finished_run`).
Every other field counts, so an option added later is compared until it is declared neutral.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import ConfigurationError
from ..io.integrity import CONFIG_FILE, read_json, saved_model_problems
from ..utils import unwrap_model

logger = logging.getLogger(__name__)

RUN_CONFIG_FILE = "run_config.json"
TRAINER_STATE_FILE = "trainer_state.json"

#: Per record section, the fields that do not change the trained weights.
NEUTRAL_FIELDS: dict[str, frozenset[str]] = {
    # The student's weights come from the checkpoint, so where its architecture was read from does not matter
    # (the architecture itself is compared, as student_config); the rest concerns reports and a teacher trained first.
    "model": frozenset({
        "student", "student_revision", "student_from_scratch", "train_teacher_if_missing", "teacher_architecture",
        "teacher_num_train_epochs", "teacher_learning_rate", "evaluate_teacher", "results_file", "license",
        "profile_images", "spectral_dynamics_steps",
    }),
    # Evaluation data and the size used to turn epochs into steps (that length is checked on its own).
    "data": frozenset({"eval_split", "max_eval_samples", "eval_crop_pct", "train_samples"}),
    "training": frozenset({
        # where and how the run is written, logged, evaluated and reported
        "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_strategy", "logging_steps",
        "logging_first_step", "log_on_each_node", "logging_nan_inf_filter", "include_num_input_tokens_seen", "log_level",
        "log_level_replica", "disable_tqdm", "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id", "do_train", "do_eval", "do_predict", "eval_strategy", "eval_steps", "eval_delay",
        "per_device_eval_batch_size", "prediction_loss_only", "eval_on_start", "eval_do_concat_batches",
        "eval_use_gather_object", "eval_accumulation_steps", "include_for_metrics", "batch_eval_metrics",
        "eval_with_teacher", "teacher_check_images", "save_only_model", "save_strategy", "save_steps",
        "save_on_each_node", "save_total_limit", "enable_jit_checkpoint", "push_to_hub", "hub_token", "hub_private_repo",
        "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "restore_callback_states_from_checkpoint",
        "skip_memory_metrics", "debug", "stop_on_nonfinite_loss", "nonfinite_check_interval", "max_skipped_fraction",
        # the length of the run: it may grow (see RunRecord.check_resume)
        "max_steps", "num_train_epochs",
        # how the data is fed and the processes are joined
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout", "local_rank",
        # speed and memory: the same computation, differently scheduled
        "use_cpu", "tf32", "torch_compile", "torch_compile_backend", "torch_compile_mode", "teacher_compile",
        "torch_empty_cache_steps", "activation_checkpointing", "activation_checkpointing_kwargs",
        "gradient_checkpointing", "gradient_checkpointing_kwargs", "cpu_malloc_tuning", "trust_remote_code",
    }),
    "launch": frozenset(),
    # What save_pretrained adds or sets beside the architecture (``architectures`` names the class it saved, which a
    # config read from a file lacks; model_type and every size are compared).
    "student_config": frozenset({
        "transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "output_hidden_states",
        "output_attentions", "return_dict", "use_cache",
    }),
}
#: How a field of each section is named in a message (training, data and model fields are the recipe's options).
_SECTION_PREFIX = {"student_config": "student config ", "launch": ""}
#: At most this many differences are spelled out in one message.
_SHOWN = 6


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, integer keys text), so records compare equal."""
    return json.loads(json.dumps(value, default=str))


def student_config_record(model) -> dict[str, Any]:
    """The student's architecture as ``config.json`` holds it."""
    return json.loads(unwrap_model(model).config.to_json_string(use_diff=False))


def record_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"<field> <saved> → <current>"`` for each field, present in both records, that changes the result.

    A field one record lacks (a record written by another version) is not compared.
    """
    saved, current = _plain(saved), _plain(current)
    found = []
    for section, neutral in NEUTRAL_FIELDS.items():
        old, new = saved.get(section), current.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key in sorted(old.keys() & new.keys() - neutral):
            if old[key] != new[key]:
                found.append(f"{_SECTION_PREFIX.get(section, '')}{key} {_short(old[key])} → {_short(new[key])}")
    return found


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def saved_record(checkpoint: str) -> tuple[dict[str, Any], Optional[str]]:
    """The record of the run that wrote ``checkpoint`` and where it was read from.

    The checkpoint's own ``run_config.json``, else its run folder's (checkpoints written before records were
    kept in them); the student's architecture is always the checkpoint's own ``config.json``.
    """
    record, source = {}, None
    for path in (Path(checkpoint) / RUN_CONFIG_FILE, Path(checkpoint).parent / RUN_CONFIG_FILE):
        value, problem = read_json(path)
        if problem is None and isinstance(value, dict):
            record, source = value, str(path)
            break
    config, problem = read_json(Path(checkpoint) / CONFIG_FILE)
    if problem is None and isinstance(config, dict):
        record = {**record, "student_config": config}
    return record, source


def check_same_run(checkpoint: str, current: dict[str, Any]) -> None:
    """Refuse ``checkpoint`` when the run that wrote it differs from ``current`` in a field that changes the result."""
    saved, source = saved_record(checkpoint)
    if source is None:
        logger.warning("%s holds no %s (written by an older version): only the student's architecture is compared "
                       "with this run's", checkpoint, RUN_CONFIG_FILE)
    differences = record_differences(saved, current)
    if not differences:
        return
    shown = "; ".join(differences[:_SHOWN]) + (f"; and {len(differences) - _SHOWN} more" if len(differences) > _SHOWN else "")
    raise ConfigurationError(
        f"resume_from_checkpoint: '{checkpoint}' belongs to a run configured differently (checkpoint → now: {shown}); "
        "resume with the checkpoint's settings, or start a new run with --overwrite_output_dir true or another --output_dir"
    )


def resume_length_problem(checkpoint: str, step: int, saved_max_steps: Optional[int], max_steps: int,
                          from_epochs: Optional[float]) -> Optional[str]:
    """Why a run resumed at ``step`` with ``max_steps`` (derived from ``from_epochs`` epochs when given) would not
    train, or ``None``. The Trainer would otherwise take one step past the end and save that as the final student."""
    if step < max_steps:
        return None
    if max_steps == saved_max_steps:
        more = "--num_train_epochs" if from_epochs is not None else "--max_steps"
        return (f"resume_from_checkpoint: this run is finished at step {step} ('{checkpoint}'); raise {more} to train it "
                "further, or start a new run with --overwrite_output_dir true or another --output_dir")
    given = (f"num_train_epochs: {from_epochs:g} epochs are {max_steps} steps, which is" if from_epochs is not None
             else f"max_steps: {max_steps} is")
    return (f"{given} not above step {step} of the checkpoint resumed from ('{checkpoint}'); pass a length above "
            f"{step} steps to continue the run" + (f" (it was set to {saved_max_steps})" if saved_max_steps else ""))


class RunRecord:
    """The run's record (a part of the trainer): written into every checkpoint and, for a recipe run, the output
    folder; a resume is checked against it (see the module docstring).

    Args:
        args: the training arguments.
        model: returns the student (the trainer's ``model``), whose architecture is recorded.
    """

    def __init__(self, args: Any, model: Callable[[], Any]):
        self.args, self._model = args, model
        self._sections: Optional[dict[str, Any]] = None

    def add(self, **sections: Any) -> None:
        """Add sections to the record, e.g. ``model=model_args, data=data_args`` (dataclasses are converted)."""
        converted = {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                     for name, value in sections.items()}
        self._sections = {**(self._sections or {}), **converted}

    def state_dict(self) -> dict[str, Any]:
        """The record: the sections given to :meth:`add`, the training arguments, the number of processes and the
        student's architecture (saved in every checkpoint as ``run_config.json``)."""
        return _plain({
            **(self._sections or {}), "training": self.args.to_dict(),
            "launch": {"world_size": self.args.world_size}, "student_config": student_config_record(self._model()),
        })

    def check_resume(self, checkpoint: Optional[str], planned_max_steps: Callable[[], tuple[int, Optional[float]]],
                     is_main_process: bool) -> bool:
        """Raise :class:`~hf_spectralkd.errors.ConfigurationError` when resuming from ``checkpoint`` would continue
        another run, or would not train at all, unless the run is at its end without a whole final student in the
        output folder: then return ``True`` (finish it without training; otherwise ``False``). Then, for a run described by :meth:`add` (the recipe's), write
        the record into the output folder (the Python API's folder holds what it held before: the record is in each
        checkpoint, which ``push_to_hub`` leaves out, and not beside the student it uploads).

        ``planned_max_steps``: the optimizer steps the run trains to and the epochs they come from (``None`` for
        ``--max_steps``), as ``Trainer.train`` computes them.
        """
        finish_only = False
        if checkpoint:
            check_same_run(checkpoint, self.state_dict())
            state, problem = read_json(Path(checkpoint) / TRAINER_STATE_FILE)
            if problem is None and isinstance(state, dict) and isinstance(state.get("global_step"), int):
                max_steps, epochs = planned_max_steps()
                step, saved_max_steps = state["global_step"], state.get("max_steps")
                finish_only = step >= max_steps == saved_max_steps and bool(saved_model_problems(self.args.output_dir))
                problem = None if finish_only else resume_length_problem(checkpoint, step, saved_max_steps, max_steps,
                                                                         epochs)
                if problem:
                    raise ConfigurationError(problem)
        if self._sections is not None and is_main_process:  # a recipe run: its folder's record
            from ..io.run_summary import write_json_atomic

            os.makedirs(self.args.output_dir, exist_ok=True)
            write_json_atomic(os.path.join(self.args.output_dir, RUN_CONFIG_FILE), self.state_dict())
        return finish_only
