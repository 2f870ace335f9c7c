"""The tap adapters' base class, the registry (model → adapter) and the functions every caller uses.

The family of a model is decided here and only here: :func:`adapter_for` unwraps the model once
(DDP, DeepSpeed, ``torch.compile``) and looks its ``config.model_type`` up among the registered
adapters. Callers never branch on family names; they call :func:`describe_taps`,
:func:`feature_forward_kwargs`, :func:`extract_features` (or :func:`forward_with_features`), or ask
:func:`tap_unit` how a family's taps are called.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigurationError
from ..utils import unwrap_model


@dataclass(frozen=True)
class TapInfo:
    """Measured description of a model's feature taps at its configured input size.

    Attributes:
        family: the adapter's family (the model's ``config.model_type``).
        num_layers: number of taps (blocks, or stages for hierarchical models).
        channels: ``C`` of each tap.
        grids: ``(H, W)`` of each tap for an input of ``image_size``.
        image_size: ``(height, width)`` in pixels the model is configured for.
        unit: what one tap is, ``"block"`` or ``"stage"`` (for messages and the layer selection rule).
    """

    family: str
    num_layers: int
    channels: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    image_size: tuple[int, int]
    unit: str = "block"

    def shape(self, layer: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of tap ``layer``."""
        return (self.channels[layer], *self.grids[layer])


def pair(value: Any) -> tuple[int, int]:
    """``224`` or ``(224, 224)`` or ``[224, 224]`` → ``(224, 224)``."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


class TapAdapter:
    """How to tap one model family. Subclass it, fill in the methods, register an instance.

    Every method receives the *unwrapped* model (the registry unwraps once). ``layers`` are 0-based
    tap indices, non-empty, in the caller's order (duplicates allowed).

    Attributes:
        family: the ``config.model_type`` this adapter serves (the registry key).
        description: how the family is named in the "unsupported model" message.
        unit: ``"block"`` (taps share one grid) or ``"stage"`` (hierarchical: one tap per resolution).
    """

    family: str = ""
    description: str = ""
    unit: str = "block"

    def check(self, model: nn.Module) -> None:
        """Raise ``ConfigurationError`` if this model of the family cannot be tapped (default: all can)."""

    def num_taps(self, model: nn.Module) -> int:
        """How many taps the model has (its blocks or stages); only the default :meth:`measure` asks."""
        raise NotImplementedError

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        """``(channels, height, width)`` of the input the model is configured for."""
        config = model.config
        return (int(getattr(config, "num_channels", 3)), *pair(config.image_size))

    def prefix_tokens(self, model: nn.Module) -> int:
        """Tokens in front of the patch tokens in a block output (CLS, distillation token); 0 for maps."""
        return 0

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments that make the forward return the block outputs ``layers`` need."""
        raise NotImplementedError

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        """The ``B×C×H×W`` map of every entry of ``layers`` from ``outputs`` (a forward with :meth:`forward_kwargs`).

        ``grid`` is the ``(H, W)`` patch grid for token families fed a non-square input.
        """
        raise NotImplementedError

    def measure(self, model: nn.Module, pixel_values: torch.Tensor, layers: Optional[Sequence[int]]) -> list[torch.Tensor]:
        """The maps of ``layers`` (``None``: every tap) for ``pixel_values`` (on the meta device in :func:`describe_taps`)."""
        layers = range(self.num_taps(model)) if layers is None else layers
        outputs = model(pixel_values=pixel_values, **self.forward_kwargs(model, layers))
        return self.read(model, outputs, layers)


_ADAPTERS: dict[str, TapAdapter] = {}


def register(adapter: TapAdapter) -> TapAdapter:
    """Add ``adapter`` to the registry under its ``family`` (a later one of the same family replaces it)."""
    if not adapter.family:
        raise ValueError(f"{type(adapter).__name__}.family is empty: set it to the config.model_type it serves")
    _ADAPTERS[adapter.family] = adapter
    return adapter


def supported_families() -> tuple[str, ...]:
    return tuple(_ADAPTERS)


_UNSUPPORTED: dict[str, str] = {}


def register_unsupported(reasons: dict[str, str]) -> None:
    """Record why known families (``config.model_type`` → one-line reason) cannot be tapped, for the message."""
    _UNSUPPORTED.update(reasons)


def _supported_help() -> str:
    descriptions = [adapter.description or adapter.family for adapter in _ADAPTERS.values()]
    return ", ".join(descriptions[:-1]) + f" and {descriptions[-1]}" if len(descriptions) > 1 else "".join(descriptions)


def _resolve(model: nn.Module) -> tuple[TapAdapter, nn.Module]:
    """``(adapter, unwrapped model)``, or a one-line ``ConfigurationError`` naming the supported families."""
    model = unwrap_model(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = _ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        name = type(model).__name__ if model_type is None else f"{type(model).__name__} (model_type='{model_type}')"
        reason = f": {_UNSUPPORTED[model_type]}" if model_type in _UNSUPPORTED else ""
        raise ConfigurationError(
            f"Unsupported model for spectral feature taps: {name}{reason}. Supported families: {_supported_help()} "
            "(docs/taps.md); distil logits only (--beta 0) with other teachers."
        )
    adapter.check(model)
    return adapter, model


def adapter_for(model: nn.Module) -> TapAdapter:
    """The tap adapter of ``model`` (wrappers are fine), or ``ConfigurationError`` naming the supported families."""
    return _resolve(model)[0]


def model_family(model: nn.Module) -> str:
    """The feature-tap family of ``model`` (its adapter's ``family``) or ``ConfigurationError``."""
    return _resolve(model)[0].family


def has_taps(model: nn.Module) -> bool:
    """Whether ``model`` belongs to a supported family (its block outputs can be tapped)."""
    try:
        _resolve(model)
    except ConfigurationError:
        return False
    return True


def tap_unit(family: Optional[str]) -> str:
    """What one tap of ``family`` is (``"block"`` or ``"stage"``); ``"block"`` for an unknown or missing family.

    For callers that hold only a family name, e.g. a spectral profile read from a file.
    """
    adapter = _ADAPTERS.get(family) if family is not None else None
    return adapter.unit if adapter is not None else "block"


# Unwrapped model → (config it was measured with, TapInfo). Weak keys: a model's entry goes with it.
_MEASURED: "weakref.WeakKeyDictionary[nn.Module, tuple[dict, TapInfo]]" = weakref.WeakKeyDictionary()


def describe_taps(model: nn.Module) -> TapInfo:
    """Channels and grid of every tap of ``model`` at its configured input size, measured (cached per model).

    The shapes come from one forward of a ``1×C×H×W`` input through a twin of the model built from
    its config on the meta device, read by the same adapter code as real taps; so they hold for
    models whose stages round up (timm ``efficientvit_m0`` at 224 px: 4×4 last stage, where
    ``224 // 64`` says 3×3). The meta device rather than a small real input because it touches
    neither the model (its weights, BatchNorm statistics, hooks, a DeepSpeed ZeRO-3 partition) nor
    memory: measured with transformers 5.23 / timm 1.0.31 on 2 CPU cores, building and running the
    twin takes 0.03 s for the test models and 0.4 s for CaiT-S24 at 224 px, and every supported
    family (every transformers family in families.py, measured tiny: 0.1-0.3 s each, MobileNetV2 with
    16 taps 1.7 s on a loaded machine; timm CaiT/DINOv2/EfficientViT, Lift, WideLast) runs on it.
    """
    adapter, model = _resolve(model)
    config = model.config.to_dict()
    cached = _MEASURED.get(model)
    if cached is not None and cached[0] == config:
        return cached[1]
    channels_in, height, width = adapter.input_size(model)
    with torch.device("meta"):
        # A fresh module of the same class: the config alone fixes the tap shapes; .eval() because
        # a train-mode BatchNorm refuses a batch of one (efficientvit_m0's head).
        twin = type(model)(copy.deepcopy(model.config)).eval()
        maps = adapter.measure(twin, torch.empty(1, channels_in, height, width), None)  # every tap
    info = TapInfo(
        family=adapter.family,
        num_layers=len(maps),
        channels=tuple(int(m.shape[1]) for m in maps),
        grids=tuple((int(m.shape[2]), int(m.shape[3])) for m in maps),
        image_size=(height, width),
        unit=adapter.unit,
    )
    _MEASURED[model] = (config, info)
    return info


def feature_forward_kwargs(model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments that make ``model``'s forward return the hidden states the taps need.

    Returns ``{}`` when ``layers`` is empty, so callers can always splat the result.
    """
    if not layers:
        return {}
    adapter, model = _resolve(model)
    return adapter.forward_kwargs(model, layers)


def extract_features(
    model: nn.Module,
    outputs: Any,
    layers: Sequence[int],
    grid: Optional[tuple[int, int]] = None,
) -> list[torch.Tensor]:
    """Feature maps of the requested taps from a forward output.

    Args:
        model: the model that produced ``outputs`` (wrappers are fine).
        outputs: its output, computed with :func:`feature_forward_kwargs` for a superset of ``layers``.
        layers: 0-based tap indices, in the order wanted.
        grid: ``(H, W)`` patch grid of the input for token families (ViT, DeiT, students) when the
            input is not square.

    Returns:
        One ``B×C×H×W`` tensor per entry of ``layers`` (same order, duplicates allowed).
    """
    adapter, model = _resolve(model)
    return adapter.read(model, outputs, layers, grid)


def forward_with_features(
    model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int], **kwargs: Any
) -> tuple[Any, list[torch.Tensor]]:
    """Run ``model`` once and return ``(outputs, feature maps of layers)``."""
    outputs = model(pixel_values=pixel_values, **feature_forward_kwargs(model, layers), **kwargs)
    return outputs, extract_features(model, outputs, layers) if layers else []
