"""How close a student's spectral profile is to its teacher's (the "distillation dynamics" measure).

Teacher and student usually differ in depth (CaiT-S24: 24 blocks, DeiT-Tiny: 12) and width, so
their ``ℓ`` curves are compared by shape: both are placed on a relative-depth axis (layer ``i`` of
``n`` at ``i/(n-1)``), the teacher curve is linearly interpolated at the student's depths, and each
curve is min-max normalised to [0, 1]. The paper's Fig. 1 claim, that a SpectralKD student mirrors
its teacher's U shape, reads as a high Pearson correlation and a small mean distance.

A curve needs :data:`MIN_LAYERS` points to have a shape: two points min-max normalise to 0 and 1
whatever their values, so any two 2-layer curves compare as identical (Pearson 1, distance 0) or
opposite (Pearson -1, distance 1). Such profiles are refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence, Union

import numpy as np

from ..errors import ConfigurationError
from .spectrum import SpectralProfile

#: Fewest layers a profile needs for its shape to be compared.
MIN_LAYERS = 3

Curve = Union[SpectralProfile, Sequence[float]]


@dataclass(frozen=True)
class ProfileComparison:
    """Similarity of a student ``ℓ`` curve to its teacher's, on the student's layers.

    Attributes:
        pearson: correlation of the normalised curves (1 = same shape; ``nan`` if one is constant).
        mean_abs_distance: mean |difference| of the min-max normalised curves (0 = identical shape).
        per_layer_distance: the |difference| at each student layer.
        student_curve / teacher_curve: the normalised curves that were compared.
    """

    pearson: float
    mean_abs_distance: float
    per_layer_distance: list[float]
    student_curve: list[float]
    teacher_curve: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _intensity(curve: Curve) -> np.ndarray:
    values = curve.intensity if isinstance(curve, SpectralProfile) else curve
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError("a profile needs at least one layer intensity")
    return array


def relative_depth(num_layers: int) -> np.ndarray:
    """Positions ``i/(n-1)`` of ``n`` layers on [0, 1] (a single layer sits at 0)."""
    return np.linspace(0.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)


def min_max(values: np.ndarray) -> np.ndarray:
    span = values.max() - values.min()
    return np.zeros_like(values) if span == 0 else (values - values.min()) / span


def compare_profiles(student: Curve, teacher: Curve) -> ProfileComparison:
    """Compare a student's ``ℓ`` curve with its teacher's (see the module docstring).

    Raises:
        ConfigurationError: a curve of fewer than :data:`MIN_LAYERS` layers.
    """
    student_l, teacher_l = _intensity(student), _intensity(teacher)
    for side, values in (("student", student_l), ("teacher", teacher_l)):
        if values.size < MIN_LAYERS:
            raise ConfigurationError(
                f"the {side} profile has {values.size} layer(s); comparing the shapes of spectral profiles needs at "
                f"least {MIN_LAYERS} (with 2, min-max normalisation makes any two curves identical or opposite: Pearson "
                "±1, distance 0 or 1). Compare the per-layer intensities in profile.json directly"
            )
    teacher_on_student = np.interp(relative_depth(len(student_l)), relative_depth(len(teacher_l)), teacher_l)
    s_norm, t_norm = min_max(student_l), min_max(teacher_on_student)
    if s_norm.size > 1 and s_norm.std() > 0 and t_norm.std() > 0:
        pearson = float(np.corrcoef(s_norm, t_norm)[0, 1])
    else:
        pearson = float("nan")
    distance = np.abs(s_norm - t_norm)
    return ProfileComparison(pearson, float(distance.mean()), distance.tolist(), s_norm.tolist(), t_norm.tolist())
