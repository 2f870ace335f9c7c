"""Swin: stage outputs are already maps (``reshaped_hidden_states``), one tap per stage.

Tap ``i`` is ``outputs.reshaped_hidden_states[i + 1]`` computed with
``output_hidden_states_before_downsampling=True``: stage ``i`` at its own resolution, *before* the
next patch merging (the paper's stage outputs; Swin-T and Swin-S then match stage by stage). The
four stage outputs are small, so the forward is asked for all of them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .registry import TapAdapter


class SwinAdapter(TapAdapter):
    """``SwinForImageClassification``: one ``B×C_s×H_s×W_s`` tap per stage."""

    family = "swin"
    description = "Swin (SwinForImageClassification)"
    unit = "stage"

    def num_taps(self, model: nn.Module) -> int:
        return len(model.config.depths)

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        return {"output_hidden_states": True, "output_hidden_states_before_downsampling": True}

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        maps = outputs.reshaped_hidden_states
        if maps is None:
            raise ValueError("outputs carry no reshaped_hidden_states; run the forward with feature_forward_kwargs")
        return [maps[int(i) + 1] for i in layers]
