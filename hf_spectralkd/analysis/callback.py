"""Watch a student's spectral profile while it trains (the paper's "distillation dynamics").

:class:`SpectralDynamicsCallback` profiles the student on one fixed batch at the start of training,
every ``every_n_steps`` optimizer steps and/or at each evaluation. Each measurement goes through
``trainer.log`` (``spectral/intensity_layer_NN``, and with a teacher profile
``spectral/pearson_to_teacher``, ``spectral/distance_to_teacher``), so TensorBoard, W&B, trackio,
MLflow and every other tracker in ``--report_to`` receive it and ``--report_to none`` sends it
nowhere; the per-layer bars are logged as an image to the trackers that take figures
(:func:`log_figure`). It is also appended to ``<output_dir>/spectral_dynamics.jsonl``.

The forward runs on every process (safe under DeepSpeed ZeRO-3, where parameters are sharded);
only the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence

import torch
from transformers import TrainerCallback

from .compare import compare_profiles
from .spectrum import SpectralProfile, spectral_profile

logger = logging.getLogger(__name__)

DYNAMICS_FILE = "spectral_dynamics.jsonl"


def log_figure(trainer, tag: str, figure: Any, step: int) -> list[str]:
    """Send a matplotlib figure to the trainer's trackers that take images; returns their names.

    TensorBoard (``add_figure``), W&B (``wandb.Image``), trackio (``trackio.Image``) and MLflow
    (``log_figure``) do; scalar-only trackers are skipped. Main process only.
    """
    if not trainer.is_world_process_zero():
        return []
    sent = []
    for callback in trainer.callback_handler.callbacks:
        kind = type(callback).__name__
        try:
            if kind == "TensorBoardCallback":
                if callback.tb_writer is None:
                    callback._init_summary_writer(trainer.args)
                callback.tb_writer.add_figure(tag, figure, step)
                callback.tb_writer.flush()
            elif kind == "WandbCallback" and getattr(callback, "_wandb", None) is not None:
                callback._wandb.log({tag: callback._wandb.Image(figure), "train/global_step": step})
            elif kind == "TrackioCallback" and getattr(callback, "_trackio", None) is not None:
                callback._trackio.log({tag: callback._trackio.Image(figure), "train/global_step": step})
            elif kind == "MLflowCallback" and getattr(callback, "_ml_flow", None) is not None:
                callback._ml_flow.log_figure(figure, f"{tag.replace('/', '_')}_step{step:07d}.png")
            else:
                continue
            sent.append(kind)
        except Exception as error:  # noqa: BLE001 - a figure is never worth stopping a run for
            logger.warning("could not log figure %s to %s: %s", tag, kind, error)
    return sent


class SpectralDynamicsCallback(TrainerCallback):
    """Record the student's spectral profile on a fixed batch during training.

    Args:
        pixel_values: ``N×3×H×W`` fixed evaluation images (e.g. 32 from the eval split).
        trainer: the trainer to log through (``trainer.log``, and its trackers for the figure).
            Without one, measurements only go to ``spectral_dynamics.jsonl`` and :attr:`history`.
        every_n_steps: profile every this many optimizer steps (``None``: only at evaluations).
        on_evaluate: also profile at each evaluation.
        teacher_profile: when given, log the Pearson correlation and mean distance to it.
        layers: student layers to profile (default all).
        figures: also log the intensity bars as an image.
    """

    def __init__(
        self,
        pixel_values: torch.Tensor,
        trainer=None,
        every_n_steps: Optional[int] = None,
        on_evaluate: bool = True,
        teacher_profile: Optional[SpectralProfile] = None,
        layers: Optional[Sequence[int]] = None,
        figures: bool = True,
    ):
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.pixel_values = pixel_values
        self.trainer = trainer
        self.every_n_steps = every_n_steps
        self.on_evaluate_enabled = on_evaluate
        self.teacher_profile = teacher_profile
        self.layers = layers
        self.figures = figures
        self._last_step: Optional[int] = None
        self.history: list[dict] = []

    def _record(self, args, state, model) -> None:
        if model is None or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        device = next(model.parameters()).device
        profile = spectral_profile(model, self.pixel_values.to(device), layers=self.layers)
        entry = {"step": state.global_step, "epoch": state.epoch, "layers": profile.layers, "intensity": profile.intensity}
        metrics = {f"spectral/intensity_layer_{layer:02d}": value for layer, value in zip(profile.layers, profile.intensity)}
        if self.teacher_profile is not None:
            comparison = compare_profiles(profile, self.teacher_profile)
            entry.update(pearson_to_teacher=comparison.pearson, distance_to_teacher=comparison.mean_abs_distance)
            metrics.update({"spectral/pearson_to_teacher": comparison.pearson,
                            "spectral/distance_to_teacher": comparison.mean_abs_distance})
        self.history.append(entry)
        if self.trainer is not None:
            self.trainer.log(metrics)  # every process: Trainer.log is where trackers are fed
            if self.figures:
                from .plots import plot_intensity_bars

                figure = plot_intensity_bars(profile, title=f"step {state.global_step}")
                log_figure(self.trainer, "spectral/intensity", figure, state.global_step)
                _close(figure)
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, DYNAMICS_FILE), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and state.global_step % self.every_n_steps == 0:
            self._record(args, state, model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if self.on_evaluate_enabled:
            self._record(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._record(args, state, model)


def _close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
