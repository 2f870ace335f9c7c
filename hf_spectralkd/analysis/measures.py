"""The follow-up papers' layer measures (docs/method.md#analysis-measures).

* :func:`token_entropy` / :func:`entropy_profile` — Shannon entropy of each token's channel values
  (Distillation Dynamics, arXiv 2511.06848), with one global histogram range for all layers.
* :func:`activation_gradient_magnitude` — mean |activation| and |∂z/∂activation| per image and
  block (Distillation Dynamics).
* :func:`svd_energy_ranks` / :func:`svd_rank_summary` — per-image SVD energy rank of the last
  layer's token matrix (Encoding Mismatch, arXiv 2511.15572).
* :func:`spectral_energy_pattern` — the token-level Spectral Energy Pattern (SEP, Encoding Mismatch).

Feature maps are the ``B×C×H×W`` taps of ``hf_spectralkd.features`` (block outputs before the final norm,
prefix tokens removed). Pure tensor functions; the model-level helpers loop over batches.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..features import extract_features, feature_forward_kwargs
from ..utils import unwrap_model
from .spectrum import (
    Batches,
    collect_feature_maps,
    iterate_pixel_batches,
    resolve_layers,
)

SVD_THRESHOLDS = (0.80, 0.90, 0.95, 0.99)
SEP_THRESHOLDS = (50, 60, 70, 80, 90)


# --------------------------------------------------------------------------------------------------
# Entropy
# --------------------------------------------------------------------------------------------------
def token_entropy(features: torch.Tensor, low: float, high: float, bins: int = 100) -> torch.Tensor:
    """Entropy in bits of every token's channel histogram.

    Args:
        features: ``B×C×H×W`` map.
        low, high: histogram range shared by all layers (values outside are clipped into the edge bins).
        bins: equal-width bins on ``[low, high]``; the last bin includes ``high`` (as ``np.histogram``).

    Returns:
        ``B×H×W`` float64 tensor of ``-Σ p log2 p`` with ``p = counts / C`` over non-empty bins.
    """
    channels = features.shape[1]
    tokens = features.permute(0, 2, 3, 1).reshape(-1, channels).double()  # (B·H·W)×C
    width = (high - low) if high > low else 1.0
    index = ((tokens - low) / width * bins).floor().clamp_(0, bins - 1).long()
    counts = torch.zeros(tokens.shape[0], bins, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, index, torch.ones_like(tokens))
    p = counts / channels
    entropy = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))).sum(dim=1)
    batch, _, height, width_ = features.shape
    return entropy.reshape(batch, height, width_)


def entropy_profile(
    model: nn.Module,
    pixel_values: Batches,
    layers: Optional[Sequence[int]] = None,
    batch_size: int = 32,
    bins: int = 100,
    value_range: Optional[tuple[float, float]] = None,
) -> list[float]:
    """Mean token entropy (bits) per layer, with the reference's single global range.

    Two passes over the images: the first finds ``min``/``max`` over every layer, the second
    histograms each token in ``bins`` bins of that range. ``pixel_values`` must be a tensor or a
    re-iterable (e.g. a list of batches) since it is read twice. A caller that already knows the
    range (``value_range=(low, high)``, e.g. from :func:`feature_value_range` during another pass)
    skips the first pass.
    """
    layers = resolve_layers(model, layers)
    model.eval()
    if value_range is None:
        low, high = math.inf, -math.inf
        for batch in iterate_pixel_batches(pixel_values, batch_size):
            low, high = feature_value_range(collect_feature_maps(model, batch, layers), (low, high))
    else:
        low, high = value_range
    sums, counts = [0.0] * len(layers), [0] * len(layers)
    for batch in iterate_pixel_batches(pixel_values, batch_size):
        for i, features in enumerate(collect_feature_maps(model, batch, layers)):
            entropy = token_entropy(features, low, high, bins)
            sums[i] += float(entropy.sum())
            counts[i] += entropy.numel()
    return [s / n for s, n in zip(sums, counts)]


def feature_value_range(
    maps: Sequence[torch.Tensor], running: tuple[float, float] = (math.inf, -math.inf)
) -> tuple[float, float]:
    """``(min, max)`` over every value of ``maps``, folded into a ``running`` range."""
    low, high = running
    for features in maps:
        low, high = min(low, float(features.min())), max(high, float(features.max()))
    return low, high


# --------------------------------------------------------------------------------------------------
# Activation and gradient magnitude
# --------------------------------------------------------------------------------------------------
def mean_magnitude(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """``N×L`` mean absolute value per image of each of ``L`` maps (``N×…`` tensors)."""
    return torch.stack([m.detach().abs().flatten(1).mean(1) for m in maps], dim=1)


def activation_gradient_magnitude(
    model: nn.Module, pixel_values: torch.Tensor, layers: Optional[Sequence[int]] = None, targets: Optional[torch.Tensor] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per image and layer: mean ``|activation|`` and mean ``|∂z_target/∂activation|``.

    Args:
        pixel_values: ``N×3×H×W``; images are independent in a ViT, so one backward of the summed
            target logits gives every image's own gradient.
        targets: class per image (e.g. the true label); default the predicted class.

    Returns:
        ``(activation, gradient)``, each ``N×L`` (not averaged over images, as in the reference).
    """
    maps, grads = feature_maps_and_gradients(model, pixel_values, resolve_layers(model, layers), targets)
    return mean_magnitude(maps).cpu().numpy(), mean_magnitude(grads).cpu().numpy()


def feature_maps_and_gradients(
    model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int], targets: Optional[torch.Tensor] = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One eval-mode float32 forward + backward: the ``B×C×H×W`` maps of ``layers`` (detached) and
    ``∂z_target/∂map`` of the same shapes (see :func:`activation_gradient_magnitude`)."""
    model.eval()
    device = next(unwrap_model(model).parameters()).device
    pixel_values = pixel_values.to(device, torch.float32)
    with torch.enable_grad():
        outputs = model(pixel_values=pixel_values, **feature_forward_kwargs(model, layers))
        maps = extract_features(model, outputs, layers)
        logits = outputs.logits
        if targets is None:
            targets = logits.argmax(dim=-1)
        chosen = logits.gather(1, targets.to(device).view(-1, 1)).sum()
        # The maps are views (prefix dropped, tokens laid on the grid) of block outputs that the logits
        # depend on; differentiate with respect to those outputs and read the gradient through the view.
        bases = [m._base if m._base is not None else m for m in maps]
        grads = torch.autograd.grad(chosen, bases, allow_unused=True)
    return [m.detach() for m in maps], [_gradient_of_view(m, b, g) for m, b, g in zip(maps, bases, grads)]


def _gradient_of_view(view: torch.Tensor, base: torch.Tensor, base_grad: Optional[torch.Tensor]) -> torch.Tensor:
    if base_grad is None:
        return torch.zeros_like(view)
    if view is base:
        return base_grad
    if base_grad.stride() != base.stride():  # lay the gradient out like the block output it belongs to
        base_grad = torch.empty_strided(base.shape, base.stride(), dtype=base_grad.dtype, device=base_grad.device).copy_(base_grad)
    return base_grad.as_strided(view.shape, view.stride(), view.storage_offset() - base.storage_offset())


# --------------------------------------------------------------------------------------------------
# SVD energy rank
# --------------------------------------------------------------------------------------------------
def svd_energy_curves(tokens: torch.Tensor) -> torch.Tensor:
    """Cumulative share of energy ``Σ_{i≤k} σ_i² / Σ σ_i²`` per image: ``N×min(T, C)`` float64.

    ``tokens`` is ``N×T×C`` (or one ``T×C`` matrix), *not* centred, as in the reference.
    """
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0)
    energy = torch.linalg.svdvals(tokens.double()).pow(2)  # descending singular values
    return energy.cumsum(dim=-1) / energy.sum(dim=-1, keepdim=True).clamp_min(1e-300)


def svd_energy_ranks(tokens: torch.Tensor, thresholds: Sequence[float] = SVD_THRESHOLDS) -> np.ndarray:
    """Smallest number of singular directions holding ``t`` of the energy, per image.

    Args:
        tokens: ``N×T×C`` (images × tokens × channels) or one ``T×C`` matrix; *not* centred.

    Returns:
        ``N×len(thresholds)`` int array: ``1 + first index k with Σ_{i≤k} σ_i² / Σ σ_i² ≥ t``.
    """
    return energy_ranks(svd_energy_curves(tokens), thresholds)


def energy_ranks(cumulative: torch.Tensor, thresholds: Sequence[float] = SVD_THRESHOLDS) -> np.ndarray:
    """:func:`svd_energy_ranks` from curves already computed by :func:`svd_energy_curves` (``N×K``)."""
    # A tiny slack keeps a share of exactly t (e.g. 0.8 of a flat spectrum) from losing to rounding.
    ranks = [(cumulative < t - 1e-12).sum(dim=-1) + 1 for t in thresholds]
    return torch.stack(ranks, dim=-1).clamp_max(cumulative.shape[-1]).cpu().numpy()


def svd_rank_summary(per_image_ranks: np.ndarray, thresholds: Sequence[float] = SVD_THRESHOLDS, percentile: float = 99.0) -> dict[str, int]:
    """The reported statistic: the ``percentile``-th percentile over images (linear, rounded)."""
    values = np.percentile(np.asarray(per_image_ranks), percentile, axis=0, method="linear")
    return {f"{int(round(t * 100))}%": int(round(v)) for t, v in zip(thresholds, np.atleast_1d(values))}


def feature_tokens(features: torch.Tensor) -> torch.Tensor:
    """``B×C×H×W`` → ``B×(H·W)×C`` token matrices."""
    return features.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------
# Spectral Energy Pattern
# --------------------------------------------------------------------------------------------------
def spectral_energy_pattern(
    tokens: torch.Tensor, thresholds: Sequence[float] = SEP_THRESHOLDS, mode: Literal["full", "folded"] = "full"
) -> dict[str, dict[str, float]]:
    """Token-level SEP: how many FFT bins hold τ % of a token's channel energy, on the mean curve.

    Args:
        tokens: ``T×D`` tokens (any leading shape is flattened).
        mode: ``"full"`` (paper): ``e_k = |fft(x)_k|²`` for all ``D`` bins in natural order;
            ``"folded"``: the ``D//2+1`` rfft bins with conjugate pairs counted twice.

    Returns:
        ``{"50": {"bins": d, "fraction": d / n_bins}, ...}``: cumulative curves ``c_k`` are averaged over
        tokens first, then ``d = 1 + first k with mean c_k ≥ τ``.
    """
    tokens = tokens.reshape(-1, tokens.shape[-1]).double()
    dim = tokens.shape[-1]
    if mode == "full":
        energy = torch.fft.fft(tokens, dim=-1).abs().pow(2)
    elif mode == "folded":
        energy = torch.fft.rfft(tokens, dim=-1).abs().pow(2)
        paired_end = energy.shape[-1] - 1 if dim % 2 == 0 else energy.shape[-1]
        energy[:, 1:paired_end] *= 2  # each interior rfft bin stands for itself and its mirror
    else:
        raise ValueError(f"mode must be 'full' or 'folded', got {mode!r}")
    cumulative = 100.0 * energy.cumsum(dim=-1) / energy.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    mean_curve = cumulative.mean(dim=0)
    n_bins = energy.shape[-1]
    result = {}
    for tau in thresholds:
        bins = int((mean_curve < tau - 1e-9).sum()) + 1
        result[str(tau)] = {"bins": min(bins, n_bins), "fraction": min(bins, n_bins) / n_bins}
    return result


def last_layer_tokens(model: nn.Module, batches: Iterable[torch.Tensor], layer: int) -> torch.Tensor:
    """``N×T×C`` token matrices of one layer over some batches (for the SVD and SEP measures)."""
    chunks = [feature_tokens(collect_feature_maps(model.eval(), batch, [layer])[0]).cpu() for batch in batches]
    return torch.cat(chunks)
