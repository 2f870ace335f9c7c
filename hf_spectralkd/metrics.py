"""Top-1 / top-5 accuracy for the Trainer, computed locally (``evaluate.load`` needs the Hub).

``preprocess_logits_for_metrics`` reduces each batch's ``B×K`` logits to ``B×k`` top-k class
indices on the device, so evaluation gathers ``k`` integers per image instead of ``K`` floats.
"""

from __future__ import annotations

import numpy as np
import torch

TOP_K = 5


def topk_indices(logits: torch.Tensor | tuple, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``B×K`` logits → ``B×min(5, K)`` class indices, best first."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


def topk_accuracy(eval_prediction) -> dict[str, float]:
    """``{"top1": …, "top5": …}`` in [0, 1] from top-k indices and integer (or one-hot) labels."""
    indices = np.asarray(eval_prediction.predictions)
    labels = np.asarray(eval_prediction.label_ids)
    if labels.ndim == 2:  # soft/one-hot targets
        labels = labels.argmax(axis=-1)
    labels = labels.reshape(-1, 1)
    metrics = {"top1": float((indices[:, :1] == labels).any(axis=1).mean())}
    if indices.shape[1] >= TOP_K:
        metrics["top5"] = float((indices[:, :TOP_K] == labels).any(axis=1).mean())
    return metrics
