"""Feature taps: per-block feature maps of a vision model as ``B×C×H×W`` tensors.

Every spectral quantity in this library (the FFT alignment loss, the analysis toolkit) works on the
same kind of tensor (docs/method.md#feature-maps): the output of one transformer block (Swin: one
stage), taken from the residual stream *before* the model's final norm, with prefix tokens (CLS,
distillation) removed and the patch tokens laid out on their grid.

A :class:`TapAdapter` per model family says how to ask the model for its block outputs, how to
read them as maps and what its prefix tokens are; the registry (``registry.py``) picks the adapter
from ``config.model_type``. Two generic adapters serve the transformers classifiers, one instance per
family with its few facts (``families.py``, the list with the reasons for the families left out):

========================  ====================================  ==========================================
families                  adapter (module)                      tap ``i`` (0-based)
========================  ====================================  ==========================================
ViT, DeiT, BEiT, DINOv2,  ``TokenAdapter`` (``tokens.py``)      ``outputs.hidden_states[i + 1]``, prefix
CLIP, SigLIP, LeViT, …                                          tokens dropped (CLS, distillation, registers)
Swin, ConvNeXt, ResNet,   ``MapAdapter`` (``maps.py``)          stage ``i`` of ``hidden_states`` (or
PVTv2, Hiera, …                                                 ``reshaped_hidden_states``), stem skipped
``timm_wrapper``          ``TimmWrapperAdapter``                ``feature_info`` entry ``i`` from timm's
                          (``timm_wrapper.py``)                 ``forward_intermediates``
``lift_vit``,             ``LiftAdapter``, ``WideLastAdapter``  as ViT; the last tap is the lifted tokens
``widelast_vit``          (``students.py``)                     (Lift) or the wide block (WideLast)
========================  ====================================  ==========================================

Cost: token families are asked for the requested blocks only (``output_hidden_states`` as a list, where
the model supports it; timm likewise); stage outputs are small and asked for all at once. A teacher under
no_grad then never holds the untapped block outputs. For a student, autograd keeps every block output for
backward anyway; the taps add one reshape (a view) per requested block.

Adding a family: one adapter module and its test (docs/taps.md).
"""

from __future__ import annotations

from .families import MAP_FAMILIES, TOKEN_FAMILIES, UNSUPPORTED
from .maps import MapAdapter
from .registry import (
    TapAdapter,
    TapInfo,
    adapter_for,
    describe_taps,
    extract_features,
    feature_forward_kwargs,
    forward_with_features,
    has_taps,
    model_family,
    register,
    register_unsupported,
    supported_families,
    tap_unit,
)
from .students import LiftAdapter, WideLastAdapter
from .timm_wrapper import TimmWrapperAdapter
from .tokens import TokenAdapter, tokens_to_grid

# Registration order is the order the "unsupported model" message names the families in.
for _adapter in (*TOKEN_FAMILIES, *MAP_FAMILIES, TimmWrapperAdapter(), LiftAdapter(), WideLastAdapter()):
    register(_adapter)
del _adapter
register_unsupported(UNSUPPORTED)

SUPPORTED_FAMILIES = supported_families()

__all__ = [
    "LiftAdapter",
    "MapAdapter",
    "SUPPORTED_FAMILIES",
    "TapAdapter",
    "TapInfo",
    "TimmWrapperAdapter",
    "TokenAdapter",
    "WideLastAdapter",
    "adapter_for",
    "describe_taps",
    "extract_features",
    "feature_forward_kwargs",
    "forward_with_features",
    "has_taps",
    "model_family",
    "register",
    "supported_families",
    "tap_unit",
    "tokens_to_grid",
]
