"""Paired feature maps on different token grids: bring both onto their shared grid (docs/method.md#maps-on-different-grids).

A student and a teacher of different families or input sizes tap maps on different ``H×W`` grids
(a ViT student's 14×14 against a teacher's 16×16, a CNN stage's 28×28, a teacher fed twice the
resolution). Each axis is handled on its own: the common grid is ``(min(H_s, H_t), min(W_s, W_t))``
and a map is resampled only along an axis where it is larger, so either map (or both, one per axis)
may be the one resampled. How, is ``--grid_alignment`` (:data:`GridAlignment`), decided here:

``spectral`` (default)
    The larger map's ortho 2-D spectrum is cropped to the smaller grid's frequencies and scaled by
    ``sqrt(h·w/(H·W))``; on an even smaller size the two bins ``±m/2`` of the larger spectrum are
    folded (added) into the smaller grid's Nyquist bin. That crop is exactly the ortho spectrum of the
    map resampled by ideal Fourier (band-limited) interpolation, i.e. ``R_H · x · R_Wᵀ`` with the real
    ``m×n`` matrix of :func:`band_limit_matrix` per axis, which is how it is computed: two small
    matmuls, then the equal-grid loss unchanged. Nothing of the shared band is lost or weighted anew.
``interpolate``
    ``F.interpolate(mode="area")``: the larger map is box-averaged onto the common grid (the common
    grid is the per-axis minimum, so every axis is only ever reduced and area averaging, which
    anti-aliases, always applies; for non-integer factors its windows overlap as in adaptive pooling).
``error``
    Pairs on different grids are refused before training (:func:`~hf_spectralkd.layer_map.build_layer_map`).

Equal grids never reach this module: the loss takes the same code path as before, bit for bit.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F

GridAlignment = Literal["spectral", "interpolate", "error"]
Grid = tuple[int, int]


def common_grid(a: Grid, b: Grid) -> Grid:
    """The grid two maps are compared on: the smaller size of each axis."""
    return min(a[0], b[0]), min(a[1], b[1])


@functools.lru_cache(maxsize=64)
def band_limit_matrix(small: int, large: int) -> torch.Tensor:
    """``small×large`` float64 matrix of ideal Fourier resampling of one axis from ``large`` to ``small < large`` points.

    ``R[j, n] = (1/N) Σ_{|k| ≤ ⌊M/2⌋} cos(2πk(j/M − n/N))`` (``M = small``, ``N = large``): the
    band-limited interpolant of the larger axis, keeping the frequencies ``|k| ≤ M/2`` (both ``±M/2``
    for an even ``M``, hence the fold), sampled at the ``M`` points of the smaller axis. So
    ``ortho_dft_M(R @ x) == sqrt(M/N) · crop(ortho_dft_N(x))`` (docs/method.md derives it). Cached;
    do not modify the result.
    """
    if not 0 < small < large:
        # small == large is no resampling at all (and for an even size ±N/2 are one bin, not two to fold)
        raise ValueError(f"band_limit_matrix resamples to fewer points: got {small} from {large}")
    j = torch.arange(small, dtype=torch.float64).view(-1, 1, 1)
    n = torch.arange(large, dtype=torch.float64).view(1, -1, 1)
    k = torch.arange(-(small // 2), small // 2 + 1, dtype=torch.float64).view(1, 1, -1)
    return torch.cos(2 * math.pi * k * (j / small - n / large)).sum(dim=-1) / large


def _spectral_resample(features: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Channels-last ``B×H×W×C`` → ``B×h×w×C`` by ideal Fourier interpolation (per axis, only where larger)."""
    height, width = features.shape[1:3]
    if grid[0] < height:
        rows = band_limit_matrix(grid[0], height).to(features.device, features.dtype)
        features = torch.einsum("jh,bhwc->bjwc", rows, features)
    if grid[1] < width:
        columns = band_limit_matrix(grid[1], width).to(features.device, features.dtype)
        features = torch.einsum("jw,bhwc->bhjc", columns, features)
    return features


def _area_resample(features: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Channels-last ``B×H×W×C`` → ``B×h×w×C`` by area (box) averaging, ``F.interpolate(mode="area")``."""
    if tuple(features.shape[1:3]) == tuple(grid):
        return features
    return F.interpolate(features.permute(0, 3, 1, 2), size=grid, mode="area").permute(0, 2, 3, 1)


def to_common_grid(
    student: torch.Tensor, teacher: torch.Tensor, alignment: GridAlignment = "spectral"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both channels-last ``B×H×W×C`` maps on their common grid (:func:`common_grid`), resampled by ``alignment``.

    Maps already on one grid are returned as they are. ``alignment="error"`` raises ``ValueError`` for
    maps on different grids (a run refuses such pairs before training).
    """
    student_grid, teacher_grid = tuple(student.shape[1:3]), tuple(teacher.shape[1:3])
    if student_grid == teacher_grid:
        return student, teacher
    if alignment == "error":
        raise ValueError(f"maps on different grids {student_grid} and {teacher_grid} with grid_alignment='error'")
    resample = {"spectral": _spectral_resample, "interpolate": _area_resample}.get(alignment)
    if resample is None:
        raise ValueError(f"grid_alignment must be 'spectral', 'interpolate' or 'error', got {alignment!r}")
    grid = common_grid(student_grid, teacher_grid)
    return resample(student, grid), resample(teacher, grid)
