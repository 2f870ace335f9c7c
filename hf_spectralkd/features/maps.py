"""Map-shaped families (convolutional and hierarchical models): one tap per stage (or block) output.

Tap ``i`` is entry ``i + offset`` of the family's stage-output tuple (``outputs.hidden_states``, or
``outputs.reshaped_hidden_states`` for the Swin kin and Hiera, whose ``hidden_states`` are token
sequences), ``offset`` skipping the stem or embedding output where the tuple starts with it. Entries
are ``B×C×H×W`` maps already, or ``B×H×W×C`` (Hiera) and permuted. The per-family facts are in
:mod:`.families`; the number of taps is the measured length of the tuple, never a count from the config.
The stage outputs are small, so the forward is asked for all of them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .registry import TapAdapter, pair

#: Input side for families whose config states no input size (convolutional families take any size):
#: the side their ImageNet checkpoints are evaluated at.
DEFAULT_SIDE = 224


class MapAdapter(TapAdapter):
    """Stage (or block) outputs that are maps.

    Args:
        family: the ``config.model_type`` served.
        description: how messages name the family.
        offset: index of tap 0 in the tuple (1 when the tuple starts with the stem or embedding output).
        source: ``"hidden_states"`` or ``"reshaped_hidden_states"``.
        channels_last: the entries are ``B×H×W×C`` (Hiera).
        before_downsampling: ask for stage outputs before patch merging (Swin), so stage ``i`` is at its own
            resolution; families whose forward does not pass the flag on give the stage after its merging.
        unit: ``"stage"`` (one tap per resolution) or ``"block"`` (several blocks share a resolution).
    """

    def __init__(self, family: str, description: str, offset: int = 1, source: str = "hidden_states",
                 channels_last: bool = False, before_downsampling: bool = False, unit: str = "stage"):
        self.family, self.description, self.unit = family, description, unit
        self.offset, self.source = offset, source
        self.channels_last, self.before_downsampling = channels_last, before_downsampling

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        config = model.config
        size = getattr(config, "image_size", None) or DEFAULT_SIDE
        return (int(getattr(config, "num_channels", 3) or 3), *pair(size))

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"output_hidden_states": True}
        if self.before_downsampling:
            kwargs["output_hidden_states_before_downsampling"] = True
        return kwargs

    def _stage_outputs(self, outputs: Any) -> Sequence[torch.Tensor]:
        maps = getattr(outputs, self.source, None)
        if maps is None:
            raise ValueError(f"outputs carry no {self.source}; run the forward with feature_forward_kwargs")
        return maps[self.offset:]

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        maps = self._stage_outputs(outputs)
        return [maps[int(i)].permute(0, 3, 1, 2) if self.channels_last else maps[int(i)] for i in layers]

    def measure(self, model: nn.Module, pixel_values: torch.Tensor, layers: Optional[Sequence[int]]) -> list[torch.Tensor]:
        outputs = model(pixel_values=pixel_values, **self.forward_kwargs(model, layers or []))
        layers = range(len(self._stage_outputs(outputs))) if layers is None else layers
        return self.read(model, outputs, layers)
