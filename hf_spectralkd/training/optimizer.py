"""The DeiT optimizer and schedule details the paper's recipe uses (docs/method.md#training-recipe).

* Weight decay on weight matrices only: no decay on 1-D tensors (biases, norms), position
  embeddings or prefix tokens, as DeiT and Swin training do.
* ``lr_schedule="deit"``: linear warmup from ``warmup_lr`` to the peak, then a cosine to ``min_lr``,
  the warmup counted inside the cosine (timm's ``t_initial = epochs``). The reference steps it per
  epoch; here it steps per optimizer step, a documented deviation.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

#: Parameters that DeiT/Swin training keeps out of weight decay, besides every 1-D tensor (biases, norms).
NO_DECAY_KEYWORDS = (
    "position_embeddings", "pos_embed", "cls_token", "distillation_token", "dist_token", "mask_token",
    "relative_position_bias_table", "absolute_pos_embed",
)


class DeiTOptimization:
    """DeiT's weight-decay groups and the optional DeiT cosine schedule, for the trainer's optimizer and scheduler.

    Args:
        args: the training arguments (``lr_schedule``, ``learning_rate``, ``warmup_lr``, ``min_lr``, warmup).
    """

    def __init__(self, args):
        self.args = args

    @staticmethod
    def decay_parameter_names(model: nn.Module) -> list[str]:
        """Weight decay on matrices only: no decay on 1-D tensors, position embeddings or prefix tokens."""
        return [
            name
            for name, param in model.named_parameters()
            if param.ndim > 1 and not any(keyword in name for keyword in NO_DECAY_KEYWORDS)
        ]

    def scheduler(self, optimizer: torch.optim.Optimizer, num_training_steps: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
        """DeiT's warmup + cosine for ``--lr_schedule deit``; ``None`` for the Trainer's own schedules."""
        if self.args.lr_schedule != "deit":
            return None
        return torch.optim.lr_scheduler.LambdaLR(optimizer, deit_lr_lambda(self.args, num_training_steps))


def deit_lr_lambda(args, num_training_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak rate at optimizer step ``t``: DeiT's warmup + cosine, per step.

    ``lr(t) = warmup_lr + t·(peak - warmup_lr)/W`` for ``t < W``, else
    ``min_lr + ½(peak - min_lr)(1 + cos(π·t/T))``; the warmup counts toward the cosine.
    """
    peak = args.learning_rate
    warmup = args.get_warmup_steps(num_training_steps)
    total = max(1, num_training_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            lr = args.warmup_lr + step * (peak - args.warmup_lr) / warmup
        else:
            lr = args.min_lr + 0.5 * (peak - args.min_lr) * (1.0 + math.cos(math.pi * min(step, total) / total))
        return lr / peak if peak > 0 else 0.0

    return multiplier
