"""Spectral analysis of vision transformers (SpectralKD §2 and its follow-ups).

* :func:`spectral_profile` → :class:`SpectralProfile` (``S`` and ``ℓ`` per layer)
* :func:`select_layers` → :class:`LayerSelection` (which layers to distil)
* :func:`compare_profiles` → :class:`ProfileComparison` (student vs teacher shape)
* entropy, activation/gradient magnitude, SVD energy rank and SEP in :mod:`.measures`
* :class:`SpectralDynamicsCallback`: the student's profile during training
"""

from .callback import SpectralDynamicsCallback
from .compare import ProfileComparison, compare_profiles
from .measures import (
    activation_gradient_magnitude,
    entropy_profile,
    spectral_energy_pattern,
    svd_energy_curves,
    svd_energy_ranks,
    svd_rank_summary,
    token_entropy,
)
from .selection import LayerSelection, select_layers
from .spectrum import (
    ProfileAccumulator,
    SpectralProfile,
    channel_spectrum_sum,
    spectral_profile,
)

__all__ = [
    "LayerSelection",
    "ProfileAccumulator",
    "ProfileComparison",
    "SpectralDynamicsCallback",
    "SpectralProfile",
    "activation_gradient_magnitude",
    "channel_spectrum_sum",
    "compare_profiles",
    "entropy_profile",
    "select_layers",
    "spectral_energy_pattern",
    "spectral_profile",
    "svd_energy_curves",
    "svd_energy_ranks",
    "svd_rank_summary",
    "token_entropy",
]
