"""Feature taps: per-block feature maps of a vision transformer as ``B×C×H×W`` tensors.

Every spectral quantity in this library (the FFT alignment loss, the analysis toolkit) works on the
same kind of tensor (docs/method.md#feature-maps): the output of one transformer block (Swin: one stage), taken
from the residual stream *before* the model's final norm, with prefix tokens (CLS, distillation)
removed and the patch tokens laid out on their grid.

Supported families and where their taps come from (``outputs`` = forward output with
``output_hidden_states=True``):

========================  =====================================================================
family                    tap ``i`` (0-based)
========================  =====================================================================
``vit``                   ``outputs.hidden_states[i + 1]`` (``[0]`` is the patch embedding),
                          CLS token dropped, ``B×N×C`` → ``B×C×H×W``
``deit``                  same, dropping *two* prefix tokens (CLS and distillation token)
``swin``                  ``outputs.reshaped_hidden_states[i + 1]`` computed with
                          ``output_hidden_states_before_downsampling=True``: stage ``i`` at its
                          own resolution, *before* the next patch merging (the paper's stage
                          outputs; Swin-T and Swin-S then match stage by stage)
``timm_wrapper``          ``outputs.hidden_states[k]`` where the forward was asked only for the
                          requested blocks (``output_hidden_states=[...]``); timm's
                          ``forward_intermediates`` returns NCHW maps, prefix tokens removed. For
                          CaiT these are the self-attention blocks; class-attention blocks are
                          never features.
``lift_vit``              taps ``0 … L-2``: as ``vit`` (width C). Tap ``L-1``: the *lifted* patch
                          tokens ``outputs.lifted_tokens`` (``B×N×C_t`` → ``B×C_t×H×W``), the map
                          Lift distils and classifies; the raw last block output (width C) only
                          feeds the lift and is not a tap
``widelast_vit``          as ``vit``; tap ``L-1`` is the wide block's output (``B×C_w×H×W``), taps
                          ``0 … L-2`` are width C
========================  =====================================================================

Cost: every model is asked for the requested blocks only (ViT/DeiT and the timm wrapper accept a
list in ``output_hidden_states``; Swin's four stage outputs are small), so a teacher under no_grad
never holds the untapped block outputs. For a student, autograd keeps every block output for
backward anyway; the taps add one reshape (a view) per requested block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .errors import ConfigurationError
from .utils import unwrap_model

SUPPORTED_FAMILIES = ("vit", "deit", "swin", "timm_wrapper", "lift_vit", "widelast_vit")
_FAMILY_HELP = (
    "ViT (ViTForImageClassification), DeiT (DeiTForImageClassification), Swin (SwinForImageClassification) "
    "and timm models with `forward_intermediates` loaded through transformers' TimmWrapperForImageClassification "
    "(e.g. CaiT: AutoModelForImageClassification.from_pretrained('timm/cait_s24_224.fb_dist_in1k')), "
    "and the Lift and WideLast students of hf_spectralkd.students"
)
_NUM_PREFIX_TOKENS = {"vit": 1, "deit": 2, "lift_vit": 1, "widelast_vit": 1}
#: Families whose last tap is wider than the blocks before it: family → config field of its width.
_WIDE_LAST_TAP = {"lift_vit": "lift_size", "widelast_vit": "wide_hidden_size"}


@dataclass(frozen=True)
class TapInfo:
    """Static description of a model's feature taps at its configured input size.

    Attributes:
        family: one of :data:`SUPPORTED_FAMILIES`.
        num_layers: number of taps (blocks, or stages for Swin).
        channels: ``C`` of each tap.
        grids: ``(H, W)`` patch grid of each tap for an input of ``image_size``.
        image_size: ``(height, width)`` in pixels the model is configured for.
    """

    family: str
    num_layers: int
    channels: tuple[int, ...]
    grids: tuple[tuple[int, int], ...]
    image_size: tuple[int, int]

    def shape(self, layer: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of tap ``layer``."""
        return (self.channels[layer], *self.grids[layer])


def model_family(model: nn.Module) -> str:
    """Return the feature-tap family of ``model`` or raise ``ConfigurationError`` naming the supported ones."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in SUPPORTED_FAMILIES:
        if model_type == "timm_wrapper" and not hasattr(model.timm_model, "forward_intermediates"):
            raise ConfigurationError(
                f"timm model '{config.architecture}' has no `forward_intermediates`, so its block outputs cannot be "
                f"tapped. Supported: {_FAMILY_HELP}."
            )
        return model_type
    name = type(model).__name__ if model_type is None else f"{type(model).__name__} (model_type='{model_type}')"
    raise ConfigurationError(f"Unsupported model for spectral feature taps: {name}. Supported families: {_FAMILY_HELP}.")


def has_taps(model: nn.Module) -> bool:
    """Whether ``model`` belongs to a supported family (its block outputs can be tapped)."""
    try:
        model_family(model)
    except ConfigurationError:
        return False
    return True


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def describe_taps(model: nn.Module) -> TapInfo:
    """Channels and grid of every tap of ``model``, derived from its config (no forward pass)."""
    family = model_family(model)
    model = unwrap_model(model)
    config = model.config
    if family in ("vit", "deit"):
        image_size, patch = _pair(config.image_size), _pair(config.patch_size)
        grid = (image_size[0] // patch[0], image_size[1] // patch[1])
        n = config.num_hidden_layers
        return TapInfo(family, n, (config.hidden_size,) * n, (grid,) * n, image_size)
    if family in _WIDE_LAST_TAP:
        image_size, patch = _pair(config.image_size), _pair(config.patch_size)
        grid = (image_size[0] // patch[0], image_size[1] // patch[1])
        n = config.num_hidden_layers
        channels = (config.hidden_size,) * (n - 1) + (int(getattr(config, _WIDE_LAST_TAP[family])),)
        return TapInfo(family, n, channels, (grid,) * n, image_size)
    if family == "swin":
        image_size, patch = _pair(config.image_size), _pair(config.patch_size)
        n = len(config.depths)
        channels = tuple(int(config.embed_dim * 2**s) for s in range(n))
        grids = tuple((image_size[0] // patch[0] // 2**s, image_size[1] // patch[1] // 2**s) for s in range(n))
        return TapInfo(family, n, channels, grids, image_size)
    # timm_wrapper: feature_info lists one entry per tap (blocks for ViT-likes, stages for hierarchical models).
    timm_model = model.timm_model
    info = list(timm_model.feature_info)
    patch_embed = getattr(timm_model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        image_size = _pair(patch_embed.img_size)
    else:
        image_size = _pair(timm_model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    channels = tuple(int(f["num_chs"]) for f in info)
    grids = tuple((image_size[0] // int(f["reduction"]), image_size[1] // int(f["reduction"])) for f in info)
    return TapInfo(family, len(info), channels, grids, image_size)


def feature_forward_kwargs(model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments that make ``model``'s forward return the hidden states the taps need.

    Returns ``{}`` when ``layers`` is empty, so callers can always splat the result.
    """
    if not layers:
        return {}
    family = model_family(model)
    if family == "timm_wrapper":
        return {"output_hidden_states": sorted(set(int(i) for i in layers))}
    if family == "swin":
        return {"output_hidden_states": True, "output_hidden_states_before_downsampling": True}
    if family in _WIDE_LAST_TAP:  # the students return every block output (references) and Lift's lifted tokens
        return {"output_hidden_states": True}
    # ViT/DeiT (transformers >= 5.23) keep only the hidden states listed, by their index in the full
    # tuple (0 = embeddings); the others are None. A no_grad teacher then frees every untapped block
    # output as soon as the next block has used it (bench/memory.py measures the peak).
    return {"output_hidden_states": sorted(set(int(i) + 1 for i in layers))}


def tokens_to_grid(tokens: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``B×(P+N)×C`` token sequence → ``B×C×H×W`` map, dropping the ``P`` prefix tokens.

    ``grid`` defaults to a square ``√N × √N``; pass it for non-square inputs.
    """
    patches = tokens[:, num_prefix_tokens:, :]  # B×N×C
    batch, num_patches, channels = patches.shape
    if grid is None:
        side = math.isqrt(num_patches)
        if side * side != num_patches:
            raise ValueError(
                f"Cannot lay {num_patches} patch tokens on a square grid; pass `grid=(H, W)` for non-square inputs."
            )
        grid = (side, side)
    if grid[0] * grid[1] != num_patches:
        raise ValueError(f"grid {grid} does not hold {num_patches} patch tokens")
    return patches.transpose(1, 2).reshape(batch, channels, grid[0], grid[1])


def extract_features(
    model: nn.Module,
    outputs: Any,
    layers: Sequence[int],
    grid: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """Feature maps of the requested taps from a forward output.

    Args:
        model: the model that produced ``outputs`` (wrappers are fine).
        outputs: its output, computed with :func:`feature_forward_kwargs` for a superset of ``layers``.
        layers: 0-based tap indices, in the order wanted.
        grid: ``(H, W)`` patch grid of the input for ViT/DeiT when the input is not square.

    Returns:
        One ``B×C×H×W`` tensor per entry of ``layers`` (same order, duplicates allowed).
    """
    family = model_family(model)
    if family == "timm_wrapper":
        hidden = outputs.hidden_states
        if hidden is None:
            raise ValueError("outputs carry no hidden_states; run the forward with feature_forward_kwargs(model, layers)")
        requested = sorted(set(int(i) for i in layers))
        if len(hidden) == len(requested):  # forward was asked for exactly these blocks
            position = {layer: k for k, layer in enumerate(requested)}
            return [hidden[position[int(i)]] for i in layers]
        return [hidden[int(i)] for i in layers]  # forward returned every block
    if family == "swin":
        maps = outputs.reshaped_hidden_states
        if maps is None:
            raise ValueError("outputs carry no reshaped_hidden_states; run the forward with feature_forward_kwargs")
        return [maps[int(i) + 1] for i in layers]
    if family == "lift_vit":
        return _lift_features(model, outputs, layers, grid)
    hidden = outputs.hidden_states
    if hidden is None:
        raise ValueError("outputs carry no hidden_states; run the forward with output_hidden_states=True")
    prefix = _NUM_PREFIX_TOKENS[family]
    return [tokens_to_grid(hidden[int(i) + 1], prefix, grid) for i in layers]


def _lift_features(model: nn.Module, outputs: Any, layers: Sequence[int], grid: tuple[int, int] | None) -> list[torch.Tensor]:
    """Lift taps: blocks ``0 … L-2`` from ``hidden_states`` (CLS dropped), block ``L-1`` = the lifted tokens."""
    last = unwrap_model(model).config.num_hidden_layers - 1
    if outputs.hidden_states is None or getattr(outputs, "lifted_tokens", None) is None:
        raise ValueError("outputs carry no hidden_states/lifted_tokens; run the forward with output_hidden_states=True")
    return [
        tokens_to_grid(outputs.lifted_tokens, 0, grid) if int(i) == last else tokens_to_grid(outputs.hidden_states[int(i) + 1], 1, grid)
        for i in layers
    ]


def forward_with_features(
    model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int], **kwargs: Any
) -> tuple[Any, list[torch.Tensor]]:
    """Run ``model`` once and return ``(outputs, feature maps of layers)``."""
    outputs = model(pixel_values=pixel_values, **feature_forward_kwargs(model, layers), **kwargs)
    return outputs, extract_features(model, outputs, layers) if layers else []
