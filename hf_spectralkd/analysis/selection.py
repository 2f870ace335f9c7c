"""Choosing which layers to distil from the teacher's spectral profile (SKD §2.2.1).

The paper reads CaiT-S24's ``ℓ`` curve (U-shaped: high in the first and last blocks, low in the
middle, with a skewed histogram) and distils the information-rich blocks: the first 2 and last 6,
paired with DeiT-Tiny blocks {0, 1} and {6, ..., 11}. :func:`select_layers` turns that reading into
a rule:

1. **Rich layers.** Teacher layer ``t`` is information-rich when ``ℓ_t ≥ mean(ℓ)``. A skewed profile
   has few such layers; they are kept in order of intensity, at most ``k`` of them (default: as many
   as the student has layers).
2. **Anchoring.** Early rich layers (``t < T/2``) are paired from the start of the student
   (``s = t``), late ones from its end (``s = S - T + t``): the first teacher blocks supervise the
   first student blocks and the last supervise the last, as in the paper's map. When two teacher
   layers land on one student layer the richer wins.
3. **Flat profiles** (max/min of ``ℓ`` below ``1 + flat_tolerance``) carry no preference; the
   paper's default shape is used instead: ``k = ⌈2S/3⌉`` pairs, a quarter of them at the start and the
   rest at the end.
4. **Hierarchical models** (Swin) are paired stage by stage, as the paper does for Swin-T ← Swin-S.
   A hierarchical teacher of a student with blocks (a ViT) pairs every stage with the student block
   at the same relative depth, the last of the stage's share: stage ``t`` of ``T`` ↔ block
   ``⌈(t+1)·S/T⌉ - 1`` (a later stage wins a shared block).
5. **Equal grids** (only when both models' token grids are given, i.e. for runs with
   ``--grid_alignment error``, which reject any other pair): a pair whose grids differ moves to the
   nearest free student layer with the teacher layer's grid, or is dropped. A ViT student of a Swin
   teacher is thus paired with the stage whose grid it shares. Otherwise pairs may sit on different
   grids, which the loss compares on their shared grid (:mod:`hf_spectralkd.grids`).

Monotone profiles therefore select the end where the intensity is high: an increasing curve maps
the student's layers onto the teacher's last ones, a decreasing one onto its first ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..errors import ConfigurationError
from ..features import tap_unit
from .spectrum import SpectralProfile

Grid = tuple[int, int]


@dataclass(frozen=True)
class LayerSelection:
    """A proposed layer map: ``student_layers[i]`` is paired with ``teacher_layers[i]`` (ascending)."""

    student_layers: list[int]
    teacher_layers: list[int]
    rule: str

    def as_arguments(self) -> str:
        """The map as ``run_distill.py`` options."""
        return (
            f"--student_layers {' '.join(map(str, self.student_layers))} "
            f"--teacher_layers {' '.join(map(str, self.teacher_layers))}"
        )


def _student_slot(teacher_layer: int, teacher_depth: int, student_depth: int) -> int:
    if teacher_layer < teacher_depth / 2:
        return min(teacher_layer, student_depth - 1)
    return max(0, student_depth - teacher_depth + teacher_layer)


def _flat_default(teacher_depth: int, student_depth: int, k: Optional[int]) -> list[int]:
    pairs = min(k or math.ceil(2 * student_depth / 3), student_depth, teacher_depth)
    head = pairs // 4
    return list(range(head)) + list(range(teacher_depth - (pairs - head), teacher_depth))


def select_layers(
    teacher_profile: Union[SpectralProfile, Sequence[float]],
    student_num_layers: int,
    k: Optional[int] = None,
    flat_tolerance: float = 0.05,
    student_grids: Optional[Sequence[Grid]] = None,
    teacher_grids: Optional[Sequence[Grid]] = None,
    student_unit: Optional[str] = None,
) -> LayerSelection:
    """Propose a student↔teacher layer map from the teacher's ``ℓ`` curve (rule in the module docstring).

    Args:
        teacher_profile: a :class:`SpectralProfile` of all teacher layers, or the ``ℓ`` list itself.
        student_num_layers: number of student blocks (Swin: stages).
        k: maximum number of pairs; default ``student_num_layers``.
        flat_tolerance: relative spread below which the profile counts as flat.
        student_grids, teacher_grids: ``(H, W)`` token grid of every layer (``TapInfo.grids``); when both are
            given, only pairs on equal grids are proposed (rule 5).
        student_unit: what one student tap is (``TapInfo.unit``): ``"block"`` pairs a hierarchical teacher by
            relative depth (rule 4); ``None`` or ``"stage"``: stage by stage.

    Raises:
        ConfigurationError: with grids, when no teacher layer has a grid of the student's.
    """
    selection = _select_by_profile(teacher_profile, student_num_layers, k, flat_tolerance, student_unit)
    if student_grids is None or teacher_grids is None:
        return selection
    return _on_equal_grids(selection, list(student_grids), list(teacher_grids))


def _grid_text(grids: Sequence[Grid]) -> str:
    return ", ".join(f"{h}×{w}" for h, w in dict.fromkeys(tuple(g) for g in grids))


def _on_equal_grids(selection: LayerSelection, student_grids: list[Grid], teacher_grids: list[Grid]) -> LayerSelection:
    student_grids, teacher_grids = [tuple(g) for g in student_grids], [tuple(g) for g in teacher_grids]
    pairs: dict[int, int] = {}  # student layer -> teacher layer
    moved = []
    for s, t in zip(selection.student_layers, selection.teacher_layers):
        if student_grids[s] == teacher_grids[t] and s not in pairs:
            pairs[s] = t
        else:
            moved.append((s, t))
    dropped = 0
    for s, t in moved:
        free = [c for c in range(len(student_grids)) if student_grids[c] == teacher_grids[t] and c not in pairs]
        if free:
            pairs[min(free, key=lambda c: (abs(c - s), c))] = t
        else:
            dropped += 1
    if not pairs:
        raise ConfigurationError(
            f"layer_map: 'auto' found no teacher layer with a token grid of the student's (student grids "
            f"{_grid_text(student_grids)}; teacher grids {_grid_text(teacher_grids)}): paired layers need the same "
            "grid. Use a teacher with the student's grid, or distil logits only (--beta 0)"
        )
    rule = selection.rule
    if moved:
        rule += f"; on equal token grids only ({len(moved) - dropped} pair(s) moved, {dropped} dropped)"
    order = sorted(pairs)
    return LayerSelection(order, [pairs[s] for s in order], rule)


def _select_by_profile(
    teacher_profile: Union[SpectralProfile, Sequence[float]], student_num_layers: int, k: Optional[int],
    flat_tolerance: float, student_unit: Optional[str] = None,
) -> LayerSelection:
    if isinstance(teacher_profile, SpectralProfile):
        intensity, family = list(teacher_profile.intensity), teacher_profile.family
        if teacher_profile.layers != list(range(len(intensity))):
            raise ValueError("select_layers needs the profile of every teacher layer (spectral_profile with layers=None)")
    else:
        intensity, family = [float(v) for v in teacher_profile], None
    teacher_depth, student_depth = len(intensity), int(student_num_layers)
    if teacher_depth == 0 or student_depth <= 0:
        raise ValueError(f"select_layers: need a non-empty profile and student_num_layers > 0, got {teacher_depth} and {student_depth}")
    if k is not None and k <= 0:
        raise ValueError(f"k must be positive, got {k}")

    if tap_unit(family) == "stage" and student_unit == "block":
        slots = {math.ceil((t + 1) * student_depth / teacher_depth) - 1: t for t in range(teacher_depth)}  # later wins
        order = sorted(slots)[-k:] if k else sorted(slots)
        return LayerSelection(order, [slots[s] for s in order],
                              "hierarchical teacher: stage t of T ↔ student block ⌈(t+1)·S/T⌉ - 1")
    if tap_unit(family) == "stage":
        depth = min(teacher_depth, student_depth, k or student_depth)
        return LayerSelection(list(range(depth)), list(range(depth)), "hierarchical: stage i ↔ stage i")

    low, high = min(intensity), max(intensity)
    if low > 0 and high / low < 1 + flat_tolerance or high == low:
        teacher_layers = _flat_default(teacher_depth, student_depth, k)
        rule = f"flat profile (max/min < {1 + flat_tolerance}): paper default, first quarter and last three quarters"
    else:
        mean = sum(intensity) / teacher_depth
        rich = sorted((t for t in range(teacher_depth) if intensity[t] >= mean), key=lambda t: -intensity[t])
        limit = min(k or student_depth, student_depth)
        chosen: dict[int, int] = {}  # student slot -> teacher layer, richest first
        for t in rich:
            slot = _student_slot(t, teacher_depth, student_depth)
            if slot not in chosen and len(chosen) < limit:
                chosen[slot] = t
        teacher_layers = sorted(chosen.values())
        rule = f"rich layers (ℓ ≥ mean {mean:.4g}), early ones anchored to the student's start, late ones to its end"
    student_layers = [_student_slot(t, teacher_depth, student_depth) for t in teacher_layers]
    order = sorted(range(len(student_layers)), key=lambda i: student_layers[i])
    return LayerSelection([student_layers[i] for i in order], [teacher_layers[i] for i in order], rule)
