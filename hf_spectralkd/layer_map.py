"""The layer map: which student tap is distilled from which teacher tap, checked before training.

:func:`resolve_layer_map` is the one place a map is made, for the recipe and the Python API alike:
from the explicit ``student_layers``/``teacher_layers`` lists (``layer_map="manual"``) or from the
teacher's spectral profile on a batch of images (``layer_map="auto"``,
:func:`hf_spectralkd.analysis.select_layers`). Every check works from the models' configs alone and
raises :class:`~hf_spectralkd.errors.ConfigurationError` naming the argument, the value and what was
expected, so the recipe and the CLI print it as one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .features import TapInfo, describe_taps
from .grids import GridAlignment, common_grid
from .utils import unwrap_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPair:
    """One distilled pair: student tap ``student`` ↔ teacher tap ``teacher`` with their ``(C, H, W)``."""

    student: int
    teacher: int
    student_shape: tuple[int, int, int]
    teacher_shape: tuple[int, int, int]

    @property
    def aligned_channels(self) -> int:
        return min(self.student_shape[0], self.teacher_shape[0])

    @property
    def same_grid(self) -> bool:
        return self.student_shape[1:] == self.teacher_shape[1:]

    def describe(self) -> str:
        """E.g. ``student  3 (14×14, 192 ch) ← teacher  7 (16×16, 384 ch): teacher pooled 384→192; compared on 14×14``."""
        (cs, sh, sw), (ct, th, tw) = self.student_shape, self.teacher_shape
        notes = [] if cs == ct else [f"teacher pooled {ct}→{cs}" if ct > cs else f"student pooled {cs}→{ct}"]
        if not self.same_grid:
            notes.append("compared on {}×{}".format(*common_grid((sh, sw), (th, tw))))
        return (f"student {self.student:>2} ({sh}×{sw}, {cs} ch) ← teacher {self.teacher:>2} ({th}×{tw}, {ct} ch)"
                + (": " + "; ".join(notes) if notes else ""))


def check_layer_indices(layers: Sequence[int], taps: TapInfo, argument: str) -> None:
    for layer in layers:
        if not 0 <= layer < taps.num_layers:
            raise ConfigurationError(
                f"{argument}: index {layer} is out of range; the {taps.family} model has {taps.num_layers} "
                f"{taps.unit}s, so indices must be in [0, {taps.num_layers - 1}] (0-based)"
            )


def build_layer_map(
    student: nn.Module, teacher: nn.Module, student_layers: Sequence[int], teacher_layers: Sequence[int],
    grid_alignment: GridAlignment = "spectral",
) -> list[LayerPair]:
    """Validate a student↔teacher layer map and return its pairs with shapes.

    Raises ``ConfigurationError`` for: unsupported model families, lists of different lengths, indices out of
    range, and, with ``grid_alignment="error"``, pairs whose token grids differ (all of them named). Otherwise
    paired layers may sit on any grids (other families, or a teacher fed another input size): the loss
    compares them on their common grid (:mod:`hf_spectralkd.grids`).
    """
    if len(student_layers) != len(teacher_layers):
        raise ConfigurationError(
            f"student_layers and teacher_layers must have the same length: got {list(student_layers)} "
            f"({len(student_layers)}) and {list(teacher_layers)} ({len(teacher_layers)})"
        )
    pairs_given = list(zip(student_layers, teacher_layers))
    repeated = sorted({pair for pair in pairs_given if pairs_given.count(pair) > 1})
    if repeated:
        # The feature loss averages over pairs: a repeated pair would silently weigh that layer twice.
        s, t = repeated[0]
        raise ConfigurationError(
            f"student_layers/teacher_layers: the pair student {s} ↔ teacher {t} is given "
            f"{pairs_given.count(repeated[0])} times (positions {[i for i, p in enumerate(pairs_given) if p == (s, t)]}); "
            "give each pair once"
        )
    student_taps, teacher_taps = describe_taps(student), describe_taps(teacher)
    check_layer_indices(student_layers, student_taps, "student_layers")
    check_layer_indices(teacher_layers, teacher_taps, "teacher_layers")
    pairs = [LayerPair(s, t, student_taps.shape(s), teacher_taps.shape(t)) for s, t in zip(student_layers, teacher_layers)]
    apart = [p for p in pairs if not p.same_grid]
    if grid_alignment == "error" and apart:
        (sh, sw), (th, tw) = student_taps.image_size, teacher_taps.image_size
        listed = ", ".join("student layer {} is {}×{} but teacher layer {} is {}×{}".format(
            p.student, *p.student_shape[1:], p.teacher, *p.teacher_shape[1:]) for p in apart)
        raise ConfigurationError(
            f"grid_alignment 'error': {listed} (token grid H×W, inputs {sh}×{sw} and {th}×{tw}); pair layers on equal "
            "grids, or compare them on their shared grid with --grid_alignment spectral (or interpolate)"
        )
    return pairs


def resolve_layer_map(
    student: nn.Module, teacher: Optional[nn.Module], args, pixel_values: Optional[torch.Tensor] = None,
    teacher_inputs: Optional[nn.Module] = None,
) -> list[LayerPair]:
    """The checked layer map of a run configured by ``args`` (a ``SpectralDistillationConfig``).

    ``args.layer_map == "manual"``: the pairs of ``args.student_layers``/``args.teacher_layers``.
    ``"auto"``: the teacher is profiled on ``pixel_values`` (``N×3×H×W``, e.g. 32 of the student's
    evaluation images) passed through ``teacher_inputs`` (the run's
    :class:`~hf_spectralkd.preprocessing.InputAdapter`: the teacher's size and normalisation), and
    :func:`~hf_spectralkd.analysis.select_layers` chooses both lists by relative depth and profile, across
    grids; with ``args.grid_alignment == "error"`` among the pairs on equal token grids only, the only ones
    such a run accepts. The chosen pairs are logged with both grids. Empty when the run has no feature
    loss. ``args`` is not modified.
    """
    if not args.uses_features:
        return []
    if args.layer_map == "manual":
        return build_layer_map(student, teacher, args.student_layers, args.teacher_layers, args.grid_alignment)
    from .analysis import select_layers, spectral_profile

    if pixel_values is None:
        raise ConfigurationError("layer_map: 'auto' needs images to profile the teacher on (a train or eval dataset)")
    student_taps, teacher_taps = describe_taps(student), describe_taps(teacher)  # unsupported families fail here
    device = next(unwrap_model(teacher).parameters()).device
    pixel_values = pixel_values.to(device)
    if teacher_inputs is not None:
        pixel_values = teacher_inputs.to(device)(pixel_values)
    profile = spectral_profile(unwrap_model(teacher), pixel_values)
    equal_grids = args.grid_alignment == "error"
    selection = select_layers(profile, student_taps.num_layers, student_unit=student_taps.unit,
                              student_grids=student_taps.grids if equal_grids else None,
                              teacher_grids=teacher_taps.grids if equal_grids else None)
    pairs = build_layer_map(student, teacher, selection.student_layers, selection.teacher_layers, args.grid_alignment)
    logger.info("layer_map='auto': %s (%s)\n%s", selection.as_arguments(), selection.rule, format_layer_map(pairs))
    return pairs


def format_layer_map(pairs: Sequence[LayerPair]) -> str:
    """Multi-line human-readable summary of a layer map."""
    if not pairs:
        return "  (no feature pairs: feature loss off)"
    return "\n".join(f"  {p.describe()}" for p in pairs)
