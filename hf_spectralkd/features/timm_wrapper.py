"""timm models loaded through transformers' ``TimmWrapperForImageClassification``.

Tap ``i`` is entry ``i`` of the timm model's ``feature_info`` (blocks for ViT-likes such as CaiT or
DINOv2, stages for hierarchical models such as EfficientViT). The forward is asked for the requested
taps only (``output_hidden_states=[...]``); timm's ``forward_intermediates`` returns them as NCHW
maps with its prefix tokens already removed. For CaiT the taps are the self-attention blocks;
class-attention blocks are never features.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigurationError
from .registry import TapAdapter, pair


class TimmWrapperAdapter(TapAdapter):
    """``TimmWrapperForImageClassification`` around a timm model with ``forward_intermediates``."""

    family = "timm_wrapper"
    description = (
        "timm models with `forward_intermediates` loaded through transformers' TimmWrapperForImageClassification "
        "(e.g. CaiT: AutoModelForImageClassification.from_pretrained('timm/cait_s24_224.fb_dist_in1k'))"
    )

    def check(self, model: nn.Module) -> None:
        if not hasattr(model.timm_model, "forward_intermediates"):
            raise ConfigurationError(
                f"timm model '{model.config.architecture}' has no `forward_intermediates`, so its block outputs "
                "cannot be tapped; use a timm model that has it (ViT-likes such as CaiT, DeiT, DINOv2)."
            )

    def num_taps(self, model: nn.Module) -> int:
        return len(model.timm_model.feature_info)

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        # The patch embedding knows the size a ViT-like was built for (model_args may change it);
        # other timm models only state it in their pretrained config.
        timm_model = model.timm_model
        default = tuple(timm_model.pretrained_cfg.get("input_size", (3, 224, 224)))
        patch_embed = getattr(timm_model, "patch_embed", None)
        if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
            return (int(default[0]), *pair(patch_embed.img_size))
        return (int(default[0]), *pair(default[1:]))

    def prefix_tokens(self, model: nn.Module) -> int:
        return 0  # forward_intermediates drops them

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        return {"output_hidden_states": sorted(set(int(i) for i in layers))}

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        hidden = outputs.hidden_states
        if hidden is None:
            raise ValueError("outputs carry no hidden_states; run the forward with feature_forward_kwargs(model, layers)")
        requested = sorted(set(int(i) for i in layers))
        if len(hidden) == len(requested):  # forward was asked for exactly these taps
            position = {layer: k for k, layer in enumerate(requested)}
            return [hidden[position[int(i)]] for i in layers]
        return [hidden[int(i)] for i in layers]  # forward returned every tap
