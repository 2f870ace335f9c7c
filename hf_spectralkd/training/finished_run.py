"""A run trained to its end whose final student was never written (a part of the trainer).

A full disk (or a lost mount) at the final save leaves a run whose last checkpoint is at
``max_steps`` and no whole student in the output folder. ``--resume_from_checkpoint true`` would have
nothing left to train, and used to be refused as a finished run; :func:`finish_from_checkpoint`
instead gives the trainer that checkpoint's weights and state (the best checkpoint's weights with
``load_best_model_at_end``) and returns as ``Trainer.train`` would, so that the caller's final save,
evaluation and results follow unchanged, without a training step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from transformers import TrainerState
from transformers.trainer_utils import TrainOutput

from ..errors import ConfigurationError

logger = logging.getLogger(__name__)


def finish_from_checkpoint(trainer: Any, checkpoint: str) -> TrainOutput:
    """Load ``checkpoint`` (at the run's last step) into ``trainer`` and return its ``TrainOutput`` untrained
    (``metrics``: the last logged training loss only; nothing was timed). Under DeepSpeed or FSDP, whose engines are built by training,
    :class:`ConfigurationError` says how to get the student out instead."""
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        raise ConfigurationError(
            f"resume_from_checkpoint: the run is trained to its end in '{checkpoint}' but its final student was not "
            f"written; under DeepSpeed or FSDP load it from that checkpoint (from_pretrained('{checkpoint}')) and "
            "save_pretrained it, or run the same command once more without DeepSpeed/FSDP to write it"
        )
    state = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json"))
    logger.warning("the run is trained to its end (step %d of %d, '%s') but the output folder has no whole final "
                   "student: writing it from that checkpoint, without training", state.global_step, state.max_steps,
                   checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = state
    best = state.best_model_checkpoint
    if trainer.args.load_best_model_at_end and best and os.path.isdir(best):
        trainer._load_best_model()
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    loss = losses[-1] if losses else float("nan")
    return TrainOutput(state.global_step, loss, {"train_loss": loss})
