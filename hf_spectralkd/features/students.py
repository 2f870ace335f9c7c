"""The project's own students (hf_spectralkd.students): Lift and WideLast, ViT token sequences.

UniformWide is a plain ``ViTForImageClassification`` and goes through the ViT adapter.

* ``widelast_vit``: as ViT; tap ``L-1`` is the wide block's output (``B×C_w×H×W``), taps
  ``0 … L-2`` are width C.
* ``lift_vit``: taps ``0 … L-2`` as ViT (width C). Tap ``L-1`` is the *lifted* patch tokens
  ``outputs.lifted_tokens`` (``B×N×C_t`` → ``B×C_t×H×W``), the map Lift distils and classifies;
  the raw last block output (width C) only feeds the lift and is not a tap.

The students' forward takes ``output_hidden_states`` as a flag only: it returns every block output
(autograd keeps them for backward anyway) and Lift's lifted tokens.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .tokens import TokenAdapter, tokens_to_grid


class WideLastAdapter(TokenAdapter):
    """``WideLastViTForImageClassification``: every block output, CLS dropped; the last one is wider."""

    def __init__(self, family: str = "widelast_vit",
                 description: str = "the WideLast student (WideLastViTForImageClassification of hf_spectralkd.students)"):
        super().__init__(family, description)

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        return {"output_hidden_states": True}


class LiftAdapter(WideLastAdapter):
    """``LiftViTForImageClassification``: blocks ``0 … L-2`` as ViT, tap ``L-1`` the lifted patch tokens."""

    def __init__(self):
        super().__init__("lift_vit", "the Lift student (LiftViTForImageClassification of hf_spectralkd.students)")

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        if outputs.hidden_states is None or getattr(outputs, "lifted_tokens", None) is None:
            raise ValueError("outputs carry no hidden_states/lifted_tokens; run the forward with output_hidden_states=True")
        last = model.config.num_hidden_layers - 1
        prefix = self.prefix_tokens(model)
        return [
            tokens_to_grid(outputs.lifted_tokens, 0, grid) if int(i) == last
            else tokens_to_grid(outputs.hidden_states[int(i) + 1], prefix, grid)
            for i in layers
        ]
