"""Feature taps: per-block feature maps of a vision model as ``B×C×H×W`` tensors.

Every spectral quantity in this library (the FFT alignment loss, the analysis toolkit) works on the
same kind of tensor (docs/method.md#feature-maps): the output of one transformer block (Swin: one
stage), taken from the residual stream *before* the model's final norm, with prefix tokens (CLS,
distillation) removed and the patch tokens laid out on their grid.

One :class:`TapAdapter` per model family says how to ask the model for its block outputs, how to
read them as maps and what its prefix tokens are; the registry (``registry.py``) picks the adapter
from ``config.model_type``. Families (``outputs`` = forward output with the adapter's kwargs):

========================  ====================================  ==========================================
family                    adapter (module)                      tap ``i`` (0-based)
========================  ====================================  ==========================================
``vit``, ``deit``         ``ViTAdapter``, ``DeiTAdapter``        ``outputs.hidden_states[i + 1]``, prefix
                          (``vit.py``)                          tokens dropped (ViT 1, DeiT 2)
``swin``                  ``SwinAdapter`` (``swin.py``)         stage ``i`` before patch merging
``timm_wrapper``          ``TimmWrapperAdapter``                ``feature_info`` entry ``i`` from timm's
                          (``timm_wrapper.py``)                 ``forward_intermediates``
``lift_vit``,             ``LiftAdapter``, ``WideLastAdapter``  as ViT; the last tap is the lifted tokens
``widelast_vit``          (``students.py``)                     (Lift) or the wide block (WideLast)
========================  ====================================  ==========================================

Cost: every model is asked for the requested blocks only (ViT/DeiT and the timm wrapper accept a
list in ``output_hidden_states``; Swin's stage outputs are small), so a teacher under no_grad never
holds the untapped block outputs. For a student, autograd keeps every block output for backward
anyway; the taps add one reshape (a view) per requested block.

Adding a family: one adapter module and its test (docs/taps.md).
"""

from __future__ import annotations

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
    supported_families,
    tap_unit,
)
from .students import LiftAdapter, WideLastAdapter
from .swin import SwinAdapter
from .timm_wrapper import TimmWrapperAdapter
from .vit import DeiTAdapter, ViTAdapter, tokens_to_grid

# Registration order is the order the "unsupported model" message names the families in.
for _adapter in (ViTAdapter(), DeiTAdapter(), SwinAdapter(), TimmWrapperAdapter(), LiftAdapter(), WideLastAdapter()):
    register(_adapter)
del _adapter

SUPPORTED_FAMILIES = supported_families()

__all__ = [
    "DeiTAdapter",
    "LiftAdapter",
    "SUPPORTED_FAMILIES",
    "SwinAdapter",
    "TapAdapter",
    "TapInfo",
    "TimmWrapperAdapter",
    "ViTAdapter",
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
