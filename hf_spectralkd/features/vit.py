"""ViT and DeiT: block outputs are token sequences ``B×(P+N)×C`` with ``P`` prefix tokens in front.

Tap ``i`` is ``outputs.hidden_states[i + 1]`` (``[0]`` is the patch embedding), the prefix tokens
dropped and the ``N`` patch tokens laid out on their grid: ``B×N×C`` → ``B×C×H×W``. The prefix is
read from the model's embeddings: one token per prefix parameter it holds (ViT: CLS; DeiT: CLS and
the distillation token).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .registry import TapAdapter

#: Parameters of a transformers ViT-style ``embeddings`` module that are prepended to the patch tokens.
PREFIX_TOKEN_PARAMETERS = ("cls_token", "distillation_token")


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


class ViTAdapter(TapAdapter):
    """``ViTForImageClassification``: every block output, CLS dropped."""

    family = "vit"
    description = "ViT (ViTForImageClassification)"

    def num_taps(self, model: nn.Module) -> int:
        return int(model.config.num_hidden_layers)

    def prefix_tokens(self, model: nn.Module) -> int:
        embeddings = model.base_model.embeddings
        parameters = [getattr(embeddings, name, None) for name in PREFIX_TOKEN_PARAMETERS]
        # Each prefix parameter is 1×T×C: T tokens in front of the patch tokens. DeepSpeed ZeRO-3 empties
        # every partitioned parameter's shape and keeps the full one in ds_shape.
        return sum(int(getattr(p, "ds_shape", p.shape)[1]) for p in parameters if p is not None)

    def forward_kwargs(self, model: nn.Module, layers: Sequence[int]) -> dict[str, Any]:
        # ViT/DeiT (transformers >= 5.23) keep only the hidden states listed, by their index in the full
        # tuple (0 = embeddings); the others are None. A no_grad teacher then frees every untapped block
        # output as soon as the next block has used it (bench/memory.py measures the peak).
        return {"output_hidden_states": sorted(set(int(i) + 1 for i in layers))}

    def read(
        self, model: nn.Module, outputs: Any, layers: Sequence[int], grid: Optional[tuple[int, int]] = None
    ) -> list[torch.Tensor]:
        hidden = outputs.hidden_states
        if hidden is None:
            raise ValueError("outputs carry no hidden_states; run the forward with output_hidden_states=True")
        prefix = self.prefix_tokens(model)
        return [tokens_to_grid(hidden[int(i) + 1], prefix, grid) for i in layers]

    def measure(self, model: nn.Module, pixel_values: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        # The patch grid is the output grid of the patch projection (a convolution), caught on the way:
        # the token sequence alone cannot tell 8×32 from 16×16.
        caught: list[torch.Size] = []
        projection = model.base_model.embeddings.patch_embeddings.projection
        handle = projection.register_forward_hook(lambda module, args, output: caught.append(output.shape))
        try:
            outputs = model(pixel_values=pixel_values, **self.forward_kwargs(model, layers))
        finally:
            handle.remove()
        return self.read(model, outputs, layers, grid=(int(caught[0][-2]), int(caught[0][-1])))


class DeiTAdapter(ViTAdapter):
    """``DeiTForImageClassification(WithTeacher)``: as ViT, dropping CLS and the distillation token."""

    family = "deit"
    description = "DeiT (DeiTForImageClassification)"
