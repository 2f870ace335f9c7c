"""Losses of SpectralKD (arXiv 2412.19055, eqs. 6-15; docs/method.md).

The whole objective is :func:`distillation_objective`, with one feature weight ``beta`` (the
paper's β = the reference code's β·w_fft)::

    L = (1 - alpha) · CE_ε(z_s, y) + alpha · T² · KL(p_t^T ‖ p_s^T) + beta · L_feat

``L_feat`` is :func:`spectral_alignment_loss` (the pair-averaged MSE between the ortho-normalised
2-D spectra over H, W of channel-aligned student and teacher feature maps) or its spatial variant
:func:`mse_alignment_loss`. Everything here is a pure function of tensors; the trainer only runs
the models and logs the components.

Fast path. The ortho ``rfft2`` is linear and unitary, so (a) the loss of a pair equals the loss of
the spectrum of the *difference* ``d = F_s - F_t`` (one transform instead of two) and (b) by
Parseval no transform is needed at all: with the half spectrum ``rfft2`` keeps, the columns
``1 … ⌈W/2⌉-1`` stand for two conjugate columns of the full spectrum while the DC column (and the
Nyquist column when ``W`` is even) stand for one, hence, per ``H×W`` map,

    Σ_half |D|² = ( ‖d‖² + ‖Σ_w d[:, w]‖² / W + [W even] ‖Σ_w (-1)^w d[:, w]‖² / W ) / 2

The DC (Nyquist) column of the 2-D spectrum is the ortho 1-D FFT over H of the row sums
(alternating row sums), scaled by ``1/√W``; Parseval over H gives the two correction terms. The
result equals the FFT form to float32 rounding and is what :func:`spectral_alignment_loss` uses by
default (``implementation="closed_form"``); ``implementation="rfft2"`` runs the literal transform of
the difference. docs/method.md derives the identity step by step.

Maps on different token grids are first brought onto their common grid (:mod:`hf_spectralkd.grids`,
``grid_alignment``): by default the larger map's spectrum is cropped to the smaller grid's band,
which is the same as resampling it by ideal Fourier interpolation; maps on one grid are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F

from .grids import GridAlignment, to_common_grid

FeatureLoss = Literal["fft", "mse"]
DistillationType = Literal["soft", "hard", "none"]
SpectralImplementation = Literal["closed_form", "rfft2"]


# --------------------------------------------------------------------------------------------------
# Channel alignment
# --------------------------------------------------------------------------------------------------
# Internally maps are handled channels-last (B×H×W×C): feature maps built from token sequences
# (ViT/DeiT, timm's NCHW intermediates, Swin's reshaped states) are NCHW *views* of channels-last
# memory, so permuting back is free and every reduction below runs over contiguous memory.
def _pool_last_axis(features: torch.Tensor, channels: int) -> torch.Tensor:
    """Adaptive average pooling of the last axis (``...×C_in`` → ``...×channels``)."""
    in_channels = features.shape[-1]
    if channels == in_channels:
        return features
    if channels > in_channels:
        raise ValueError(f"cannot pool {in_channels} channels up to {channels}")
    if in_channels % channels == 0:
        window = in_channels // channels
        if window <= 8:  # strided adds beat a mean over a tiny innermost axis by ~5x on CPU
            pooled = features[..., 0::window]
            for offset in range(1, window):
                pooled = pooled + features[..., offset::window]
            return pooled * (1.0 / window)
        return features.reshape(*features.shape[:-1], channels, window).mean(dim=-1)
    flat = features.reshape(-1, 1, in_channels)
    return F.adaptive_avg_pool1d(flat, channels).reshape(*features.shape[:-1], channels)


def pool_channels(features: torch.Tensor, channels: int) -> torch.Tensor:
    """Adaptive average pooling along the channel axis: ``B×C_in×H×W`` → ``B×channels×H×W``.

    Window ``i`` averages input channels ``[⌊i·C_in/C⌋, ⌈(i+1)·C_in/C⌉)`` (PyTorch's adaptive pooling
    rule; the reference code's 3-D adaptive pool over the 4-D map gives the same windows). When
    ``C_in`` is a multiple of ``channels`` the windows are disjoint and equal: 384 → 192 averages
    channels ``2i`` and ``2i+1``.
    """
    return _pool_last_axis(features.permute(0, 2, 3, 1), channels).permute(0, 3, 1, 2)


def align_channels(
    student_features: torch.Tensor, teacher_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the wider of two ``B×C×H×W`` maps down to the narrower width (parameter-free).

    The teacher is pooled when it is wider (the usual case), the student otherwise (paper eq. 6).
    """
    width = min(student_features.shape[1], teacher_features.shape[1])
    return pool_channels(student_features, width), pool_channels(teacher_features, width)


def _check_pairs(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor], grid_alignment: GridAlignment
) -> None:
    if len(student_features) != len(teacher_features):
        raise ValueError(
            f"student_features and teacher_features must pair up: got {len(student_features)} student and "
            f"{len(teacher_features)} teacher feature maps"
        )
    if len(student_features) == 0:
        raise ValueError("feature alignment needs at least one (student, teacher) feature pair")
    for j, (s, t) in enumerate(zip(student_features, teacher_features)):
        if s.dim() != 4 or t.dim() != 4:
            raise ValueError(
                f"feature pair {j}: expected B×C×H×W tensors, got student {tuple(s.shape)} and teacher {tuple(t.shape)}"
            )
        if s.shape[0] != t.shape[0] or (grid_alignment == "error" and s.shape[2:] != t.shape[2:]):
            raise ValueError(
                f"feature pair {j}: student map is {tuple(s.shape[2:])} (H×W) with batch {s.shape[0]} but teacher "
                f"map is {tuple(t.shape[2:])} with batch {t.shape[0]}; paired layers must have the same batch, and "
                "with grid_alignment='error' the same spatial size"
            )


def _aligned_differences(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
    grid_alignment: GridAlignment = "spectral",
) -> list[torch.Tensor]:
    """Per pair ``d_j = pool(F_s) - pool(F_t)`` in float32, channels-last ``B×h×w×C`` each.

    ``h×w`` is the pair's common grid (:mod:`hf_spectralkd.grids`): maps on one grid are used as they
    are, otherwise the larger along each axis is resampled by ``grid_alignment`` after pooling
    (pooling acts on channels, resampling on space: they commute, and pooling first is cheaper).
    """
    _check_pairs(student_features, teacher_features, grid_alignment)
    differences = []
    for s, t in zip(student_features, teacher_features):
        s_last, t_last = s.float().permute(0, 2, 3, 1), t.float().permute(0, 2, 3, 1)
        width = min(s_last.shape[-1], t_last.shape[-1])
        s_last, t_last = to_common_grid(_pool_last_axis(s_last, width), _pool_last_axis(t_last, width), grid_alignment)
        differences.append(s_last - t_last)
    return differences


# --------------------------------------------------------------------------------------------------
# Spectral (FFT) alignment
# --------------------------------------------------------------------------------------------------
def half_spectrum_energy(differences: torch.Tensor) -> torch.Tensor:
    """``Σ |rfft2(d, norm="ortho")|²`` over the spatial axes of a channels-last map, without a transform.

    Args:
        differences: ``B×H×W×C`` real tensor (spatial axes 1 and 2).

    Returns:
        Scalar: the energy summed over batch and channels (see the module docstring for the identity).
    """
    width = differences.shape[2]
    energy = differences.pow(2).sum() + differences.sum(dim=2).pow(2).sum() / width  # full + DC column
    if width % 2 == 0:
        nyquist = differences[:, :, 0::2].sum(dim=2) - differences[:, :, 1::2].sum(dim=2)  # B×H×C
        energy = energy + nyquist.pow(2).sum() / width
    return energy / 2


def _spectral_pair_loss_closed_form(difference: torch.Tensor) -> torch.Tensor:
    batch, height, width, channels = difference.shape
    num_elements = batch * channels * height * (width // 2 + 1) * 2  # real + imaginary parts
    return half_spectrum_energy(difference) / num_elements


def _spectral_pair_loss_rfft2(difference: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.rfft2(difference, dim=(1, 2), norm="ortho")  # B×H×(W//2+1)×C complex
    return torch.view_as_real(spectrum).pow(2).mean()


def spectral_alignment_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    implementation: SpectralImplementation = "closed_form",
    grid_alignment: GridAlignment = "spectral",
) -> torch.Tensor:
    """SpectralKD feature loss ``L_FFT`` (SKD eqs. 6-13).

    For each pair ``j`` (``F_s``: ``B×C_s×H×W``, ``F_t``: ``B×C_t×H×W``, equal ``B, H, W``): pool the
    wider map along channels to ``C = min(C_s, C_t)``, cast to float32, take ``rfft2`` over ``(H, W)``
    with ``norm="ortho"`` (``B×C×H×(W//2+1)`` complex), stack real and imaginary parts and take the
    MSE over all ``B·C·H·(W//2+1)·2`` elements. Returns the unweighted mean over pairs, a float32
    scalar. Gradients reach both inputs (compute the teacher's maps under no_grad).

    Args:
        student_features: ``P`` student maps, ``B×C_s×H×W`` each.
        teacher_features: ``P`` teacher maps, paired with ``student_features`` by position.
        implementation: ``"closed_form"`` (default) evaluates the quantity without a transform
            (Parseval, see the module docstring); ``"rfft2"`` runs ``rfft2`` on the difference of
            the aligned maps. Both give the same number to float32 rounding.
        grid_alignment: for a pair on different grids (``H_s×W_s`` ≠ ``H_t×W_t``): ``"spectral"``
            compares the spectra on the shared band, i.e. on the common grid ``min(H)×min(W)``
            (the larger map's spectrum cropped, see :mod:`hf_spectralkd.grids`); ``"interpolate"``
            area-averages the larger map onto that grid; ``"error"`` raises. Equal grids: no effect.

    Raises:
        ValueError: if the lists differ in length, are empty, or a pair differs in batch (or in H×W
            with ``grid_alignment="error"``); the message names the pair index and both sizes.
    """
    pair_losses = {"closed_form": _spectral_pair_loss_closed_form, "rfft2": _spectral_pair_loss_rfft2}
    if implementation not in pair_losses:
        raise ValueError(f"implementation must be 'closed_form' or 'rfft2', got {implementation!r}")
    pair_loss = pair_losses[implementation]
    differences = _aligned_differences(student_features, teacher_features, grid_alignment)
    # Per pair rather than stacked: stacking same-shape pairs costs a copy of every difference and
    # measured slower on CPU than the per-pair reductions it would save (bench/README.md).
    return torch.stack([pair_loss(d) for d in differences]).mean()


def mse_alignment_loss(
    student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
    grid_alignment: GridAlignment = "spectral",
) -> torch.Tensor:
    """Spatial-domain variant (EM ``--use-mse-loss``): same alignment (channels and grids), MSE over ``B·C·h·w``,
    mean over pairs."""
    differences = _aligned_differences(student_features, teacher_features, grid_alignment)
    return torch.stack([d.pow(2).mean() for d in differences]).mean()


def feature_alignment_loss(
    student_features: Sequence[torch.Tensor],
    teacher_features: Sequence[torch.Tensor],
    kind: FeatureLoss = "fft",
    grid_alignment: GridAlignment = "spectral",
) -> torch.Tensor:
    """Dispatch to :func:`spectral_alignment_loss` (``"fft"``) or :func:`mse_alignment_loss` (``"mse"``)."""
    if kind == "fft":
        return spectral_alignment_loss(student_features, teacher_features, grid_alignment=grid_alignment)
    if kind == "mse":
        return mse_alignment_loss(student_features, teacher_features, grid_alignment)
    raise ValueError(f"feature_loss must be 'fft' or 'mse', got {kind!r}")


# --------------------------------------------------------------------------------------------------
# Logit losses
# --------------------------------------------------------------------------------------------------
def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Base cross-entropy ``CE_ε`` in float32.

    Args:
        logits: ``B×K``.
        labels: ``B`` class indices (smoothed with ``label_smoothing``), or ``B×K`` soft targets
            (mixup/cutmix; used as given, since timm's Mixup already folds smoothing into them).
    """
    logits = logits.float()
    if labels.dim() == logits.dim() and labels.is_floating_point():
        return -(labels.float() * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return F.cross_entropy(logits, labels.long(), label_smoothing=label_smoothing)


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, summed over classes, mean over the batch (float32)."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return kl * temperature**2


def hard_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """DeiT hard distillation: ``CE(z_s, argmax z_t)`` without smoothing."""
    return F.cross_entropy(student_logits.float(), teacher_logits.argmax(dim=-1))


@dataclass(frozen=True)
class LossComponents:
    """The objective and its unweighted terms, each a float32 scalar.

    ``total = w_ce·ce + w_kd·kd + beta·feature`` with the weights of :func:`distillation_objective`;
    a term that is not part of the objective is ``0``.
    """

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor
    feature: torch.Tensor


def distillation_objective(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: Optional[torch.Tensor] = None,
    student_maps: Sequence[torch.Tensor] = (),
    teacher_maps: Sequence[torch.Tensor] = (),
    *,
    alpha: float = 0.9,
    beta: float = 0.2,
    temperature: float = 1.0,
    distillation_type: DistillationType = "soft",
    feature_loss: FeatureLoss = "fft",
    label_smoothing: float = 0.1,
    grid_alignment: GridAlignment = "spectral",
) -> LossComponents:
    """The SpectralKD objective ``(1-α)·CE_ε + α·KD + β·L_feat`` and its components.

    Args:
        student_logits: ``B×K``.
        labels: ``B`` class indices, or ``B×K`` soft targets (mixup/cutmix).
        teacher_logits: ``B×K`` (already in the student's label order), or ``None`` when the
            objective has no KD term.
        student_maps, teacher_maps: ``P`` paired feature maps ``B×C×H×W`` (may be empty).
        alpha: KD weight; the cross-entropy gets ``1 - alpha``. Without a KD term (``distillation_type
            == "none"``, ``alpha == 0`` or no ``teacher_logits``) the cross-entropy has weight 1.
        beta: weight of the feature loss; ignored when no maps are given.
        distillation_type: ``"soft"`` (``T²·KL``), ``"hard"`` (CE to the teacher's argmax) or ``"none"``.
        feature_loss: ``"fft"`` (:func:`spectral_alignment_loss`) or ``"mse"`` (:func:`mse_alignment_loss`).
        grid_alignment: how a pair on different token grids is compared (:mod:`hf_spectralkd.grids`).

    Returns:
        :class:`LossComponents` with the weighted ``total`` and the raw ``ce``, ``kd``, ``feature``.
    """
    if distillation_type not in ("soft", "hard", "none"):
        raise ValueError(f"distillation_type must be 'soft', 'hard' or 'none', got {distillation_type!r}")
    if len(student_maps) != len(teacher_maps):
        raise ValueError(f"got {len(student_maps)} student and {len(teacher_maps)} teacher feature maps")
    ce = classification_loss(student_logits, labels, label_smoothing)
    zero = ce.new_zeros(())
    with_kd = distillation_type != "none" and alpha > 0 and teacher_logits is not None
    kd = zero
    if with_kd:
        kd = (
            soft_kd_loss(student_logits, teacher_logits, temperature)
            if distillation_type == "soft"
            else hard_kd_loss(student_logits, teacher_logits)
        )
    feature = feature_alignment_loss(student_maps, teacher_maps, feature_loss, grid_alignment) if student_maps else zero
    total = ((1.0 - alpha) * ce + alpha * kd if with_kd else ce) + (beta * feature if student_maps else 0.0)
    return LossComponents(total=total, ce=ce, kd=kd, feature=feature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 0.9,
    temperature: float = 1.0,
    kind: Literal["soft", "hard"] = "soft",
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """Logit part of the objective, ``(1-α)·CE_ε(z_s, y) + α·KD(z_s, z_t)``: :func:`distillation_objective`
    without feature maps, as a float32 scalar."""
    if kind not in ("soft", "hard"):
        raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
    return distillation_objective(
        student_logits, labels, teacher_logits, alpha=alpha, temperature=temperature, distillation_type=kind,
        label_smoothing=label_smoothing,
    ).total
