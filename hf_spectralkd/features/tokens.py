"""Token-sequence families (ViT and its kin): block outputs ``B×(P+N)×C`` with ``P`` prefix tokens in front.

Tap ``i`` is ``outputs.hidden_states[i + 1]`` (``[0]`` is the embedding output), the ``P`` prefix tokens
dropped and the ``N`` patch tokens laid out on their grid: ``B×N×C`` → ``B×C×H×W``. ``P`` is read from
the config through the family's facts (:mod:`.families`): the class tokens the family always has (CLS;
DeiT: CLS and distillation) plus ``config.num_register_tokens`` where the family has registers. The
grid is measured: the output grid of the patch projection, caught during the forward (a token count
alone cannot tell 8×32 from 16×16), and ``describe_taps`` checks that it holds the ``N`` tokens left
after the prefix.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .registry import TapAdapter, pair


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


def vision_config(model: nn.Module) -> Any:
    """The config that describes the image encoder: ``config.vision_config`` for CLIP-like towers, else ``config``."""
    return getattr(model.config, "vision_config", None) or model.config


class TokenAdapter(TapAdapter):
    """Every block output of a token-sequence classifier, prefix tokens dropped.

    Args:
        family: the ``config.model_type`` served.
        description: how messages name the family.
        class_tokens: tokens the family always puts in front of the patch tokens (CLS, distillation token).
        register_attribute: config attribute that adds more prefix tokens (DINOv2 registers), or ``None``.
        square_grids: the taps have their own square grids, shrinking stage by stage (LeViT, whose attention
            biases fix its input to the configured square): each tap's grid is ``√N × √N`` of its own tokens.
    """

    unit = "block"

    def __init__(self, family: str, description: str, class_tokens: int = 1, register_attribute: Optional[str] = None,
                 square_grids: bool = False):
        self.family, self.description = family, description
        self.class_tokens, self.register_attribute, self.square_grids = class_tokens, register_attribute, square_grids

    def input_size(self, model: nn.Module) -> tuple[int, int, int]:
        config = vision_config(model)
        return (int(getattr(config, "num_channels", 3)), *pair(config.image_size))

    def prefix_tokens(self, model: nn.Module) -> int:
        registers = getattr(vision_config(model), self.register_attribute, 0) if self.register_attribute else 0
        return self.class_tokens + int(registers or 0)

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        # transformers 5.23 models built on its output recorder keep only the hidden states listed, by their index
        # in the full tuple (0 = embeddings), and leave the others None: a no_grad teacher then frees every untapped
        # block output as soon as the next block has used it (bench/memory.py measures the peak). Families without
        # the recorder (data2vec-vision) treat the list as True and return all of them, read the same way.
        return {"output_hidden_states": sorted(set(int(i) + 1 for i in layers))}

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        hidden = outputs.hidden_states
        if hidden is None or any(hidden[int(i) + 1] is None for i in layers):
            raise ValueError("outputs carry no hidden_states for these taps; run the forward with feature_forward_kwargs")
        prefix = self.prefix_tokens(model)
        return [tokens_to_grid(hidden[int(i) + 1], prefix, None if self.square_grids else grid) for i in layers]

    def measure(self, model: nn.Module, pixel_values: torch.Tensor, layers: Optional[Sequence[int]]) -> list[torch.Tensor]:
        # The patch grid is the output grid of the first convolution the forward runs (the patch projection).
        caught: list[torch.Size] = []
        handles = [m.register_forward_hook(lambda module, args, output: caught.append(output.shape))
                   for m in model.modules() if isinstance(m, nn.Conv2d)]
        try:
            kwargs = {"output_hidden_states": True} if layers is None else self.forward_kwargs(model, layers)
            outputs = model(pixel_values=pixel_values, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        layers = range(len(outputs.hidden_states) - 1) if layers is None else layers
        return self.read(model, outputs, layers, grid=(int(caught[0][-2]), int(caught[0][-1])))
