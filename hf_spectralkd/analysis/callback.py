"""Watch a student's spectral profile while it trains (the paper's "distillation dynamics").

:class:`SpectralDynamicsCallback` profiles the student on one fixed batch at the start of training,
every ``every_n_steps`` optimizer steps and/or at each evaluation, and appends the result to
``<output_dir>/spectral_dynamics.jsonl``. With a teacher profile it also records the similarity of
the two curves (:func:`compare_profiles`). TensorBoard, when installed, receives the per-layer
intensities and the similarity as scalars and the intensity bars as a figure.

The forward runs on every process (safe under DeepSpeed ZeRO-3, where parameters are sharded);
only the main process writes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional, Sequence

import torch
from transformers import TrainerCallback

from .compare import compare_profiles
from .spectrum import SpectralProfile, spectral_profile

logger = logging.getLogger(__name__)

DYNAMICS_FILE = "spectral_dynamics.jsonl"


class SpectralDynamicsCallback(TrainerCallback):
    """Record the student's spectral profile on a fixed batch during training.

    Args:
        pixel_values: ``N×3×H×W`` fixed evaluation images (e.g. 32 from the eval split).
        every_n_steps: profile every this many optimizer steps (``None``: only at evaluations).
        on_evaluate: also profile at each evaluation.
        teacher_profile: when given, log the Pearson correlation and mean distance to it.
        layers: student layers to profile (default all).
        tensorboard: write TensorBoard events under ``<output_dir>/runs/spectral_dynamics``.
    """

    def __init__(
        self,
        pixel_values: torch.Tensor,
        every_n_steps: Optional[int] = None,
        on_evaluate: bool = True,
        teacher_profile: Optional[SpectralProfile] = None,
        layers: Optional[Sequence[int]] = None,
        tensorboard: bool = True,
    ):
        if every_n_steps is not None and every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.pixel_values = pixel_values
        self.every_n_steps = every_n_steps
        self.on_evaluate_enabled = on_evaluate
        self.teacher_profile = teacher_profile
        self.layers = layers
        self.tensorboard = tensorboard
        self._writer = None
        self._last_step: Optional[int] = None
        self.history: list[dict] = []

    def _tb_writer(self, output_dir: str):
        if self._writer is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: the JSONL file is still written
                self.tensorboard = False
                return None
            self._writer = SummaryWriter(log_dir=os.path.join(output_dir, "runs", "spectral_dynamics"))
        return self._writer

    def _record(self, args, state, model) -> None:
        if model is None or self._last_step == state.global_step:
            return
        self._last_step = state.global_step
        device = next(model.parameters()).device
        profile = spectral_profile(model, self.pixel_values.to(device), layers=self.layers)
        entry = {"step": state.global_step, "epoch": state.epoch, "layers": profile.layers, "intensity": profile.intensity}
        if self.teacher_profile is not None:
            comparison = compare_profiles(profile, self.teacher_profile)
            entry.update(pearson_to_teacher=comparison.pearson, distance_to_teacher=comparison.mean_abs_distance)
        self.history.append(entry)
        if not state.is_world_process_zero:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, DYNAMICS_FILE), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")
        writer = self._tb_writer(args.output_dir)
        if writer is not None:
            for layer, value in zip(profile.layers, profile.intensity):
                writer.add_scalar(f"spectral/intensity_layer_{layer:02d}", value, state.global_step)
            if "pearson_to_teacher" in entry:
                writer.add_scalar("spectral/pearson_to_teacher", entry["pearson_to_teacher"], state.global_step)
                writer.add_scalar("spectral/distance_to_teacher", entry["distance_to_teacher"], state.global_step)
            from .plots import plot_intensity_bars

            writer.add_figure("spectral/intensity", plot_intensity_bars(profile, title=f"step {state.global_step}"), state.global_step)
            writer.flush()

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
        if self._writer is not None:
            self._writer.close()
            self._writer = None
