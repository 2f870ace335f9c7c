"""Figures of the paper's analyses (matplotlib, Agg backend: no display needed).

Every function returns the ``Figure`` and, given ``path``, saves it as a PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..features import tap_unit
from .compare import relative_depth
from .spectrum import SpectralProfile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, path: Optional[Union[str, Path]]):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
        _pyplot().close(fig)
    return fig


def _name(profile: SpectralProfile, fallback: str) -> str:
    return Path(profile.model_name).name if profile.model_name else fallback


def plot_intensity_bars(profile: SpectralProfile, path=None, title: Optional[str] = None):
    """``ℓ`` per layer as bars (SKD Fig. 1), layers numbered 1-based like the paper."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(profile.layers) + 2), 3.2))
    ax.bar([layer + 1 for layer in profile.layers], profile.intensity, color="#3b6ea8")
    ax.set_xlabel("stage (1-based)" if tap_unit(profile.family) == "stage" else "layer (1-based)")
    ax.set_ylabel("frequency intensity ℓ(X)")
    ax.set_title(title or f"Spectral intensity per layer: {_name(profile, 'model')}")
    return _finish(fig, path)


def plot_intensity_histogram(profile: SpectralProfile, path=None, bins: int = 10):
    """Histogram of the per-layer ``ℓ`` values (SKD Fig. 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.hist(profile.intensity, bins=min(bins, max(1, len(profile.intensity))), color="#3b6ea8", edgecolor="white")
    ax.set_xlabel("frequency intensity ℓ(X)")
    ax.set_ylabel("number of layers")
    ax.set_title("Distribution of layer intensities")
    return _finish(fig, path)


def plot_spectrum_grid(profile: SpectralProfile, path=None, columns: int = 6):
    """``S(X)`` of every layer on ``fftfreq(C)[:C//2]`` (SKD Fig. 3): one small panel per layer."""
    plt = _pyplot()
    n = len(profile.layers)
    columns = min(columns, n)
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 1.8 * rows), squeeze=False)
    for ax, layer, spectrum in zip(axes.flat, profile.layers, profile.spectrum):
        spectrum = np.asarray(spectrum)
        half = len(spectrum) // 2 or 1
        ax.plot(np.fft.fftfreq(len(spectrum))[:half], spectrum[:half], color="#3b6ea8", linewidth=1)
        ax.set_title(f"layer {layer + 1}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"Channel spectrum S(X): {_name(profile, 'model')}", fontsize=10)
    return _finish(fig, path)


def plot_svd_energy(singular_energy_curves: np.ndarray, path=None, thresholds: Sequence[float] = (0.8, 0.9, 0.95, 0.99)):
    """Mean cumulative SVD energy of the last layer's token matrices, with the threshold ranks marked."""
    plt = _pyplot()
    curves = np.atleast_2d(singular_energy_curves)
    mean = curves.mean(axis=0)
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    ax.plot(np.arange(1, len(mean) + 1), mean, color="#3b6ea8")
    for t in thresholds:
        k = int(np.searchsorted(mean, t - 1e-12) + 1)
        ax.axhline(t, color="grey", linewidth=0.5, linestyle=":")
        ax.annotate(f"{int(t * 100)}%: {k}", (k, t), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("number of singular directions")
    ax.set_ylabel("cumulative energy")
    ax.set_title("Per-image SVD energy (last layer)")
    return _finish(fig, path)


def plot_profile_comparison(profiles: Sequence[SpectralProfile], labels: Sequence[str], path=None, title: Optional[str] = None):
    """Overlay min-max normalised ``ℓ`` curves on a relative-depth axis (teacher vs students)."""
    from .compare import min_max

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for profile, label in zip(profiles, labels):
        intensity = np.asarray(profile.intensity)
        ax.plot(relative_depth(len(intensity)), min_max(intensity), marker="o", markersize=3, label=label)
    ax.set_xlabel("relative depth (first layer 0, last layer 1)")
    ax.set_ylabel("normalised ℓ(X)")
    ax.set_title(title or "Spectral intensity profiles")
    ax.legend(fontsize=8)
    return _finish(fig, path)
