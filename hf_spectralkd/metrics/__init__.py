"""Evaluation metrics: ``evaluate`` modules shipped inside the package and loaded by path.

``evaluate.load("accuracy")`` fetches the metric's script from the Hub; the modules here are loaded
from the installed package (:func:`load_metric`), so evaluation works offline and always runs the
code that was tested:

- ``accuracy_topk/``: top-1 / top-5 accuracy with a 95 % percentile-bootstrap interval over images;
- ``agreement/``: teacher–student top-1 agreement and mean KL(teacher ‖ student).

:class:`TopKAccuracy` is the Trainer's ``compute_metrics``. ``preprocess_logits_for_metrics``
(:func:`topk_indices`) first reduces each batch's ``B×K`` logits to ``B×k`` top-k class indices on the
device, so evaluation gathers ``k`` integers per image instead of ``K`` floats.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .bootstrap import CONFIDENCE_LEVEL, N_RESAMPLES, SEED, percentile_bootstrap  # noqa: F401 - public

TOP_K = 5
METRICS_DIR = Path(__file__).parent
METRICS = ("accuracy_topk", "agreement")
#: Per-image results of a run's final evaluation (labels and top-k predictions), beside eval_results.json:
#: what ``ablate`` pairs runs by.
PREDICTIONS_FILE = "eval_predictions.npz"


@lru_cache(maxsize=None)
def load_metric(name: str):
    """The shipped ``evaluate`` module ``name`` (one of :data:`METRICS`), loaded from its path: never the Hub.

    ``keep_in_memory``: ``compute`` otherwise writes the inputs to an Arrow file under a fixed name,
    which the processes of a distributed evaluation (each computing on the gathered predictions) share.
    """
    if name not in METRICS:
        raise ValueError(f"name: expected one of {METRICS}, got {name!r}")
    import evaluate

    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"), keep_in_memory=True)


def topk_indices(logits: torch.Tensor | tuple, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``B×K`` logits → ``B×min(5, K)`` class indices, best first."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


class TopKAccuracy:
    """The Trainer's ``compute_metrics``: ``top1``, ``top5`` and their 95 % intervals (``top1_ci_low``, …)
    from top-k indices and integer (or one-hot) labels, through the ``accuracy_topk`` module.

    The last evaluation's labels and top-k indices stay available (:meth:`save_predictions`) so that
    runs can be compared image by image.
    """

    def __init__(self, confidence_level: float = CONFIDENCE_LEVEL, n_resamples: int = N_RESAMPLES, seed: int = SEED):
        self.options = {"confidence_level": confidence_level, "n_resamples": n_resamples, "seed": seed}
        self.labels: Optional[np.ndarray] = None
        self.top_k: Optional[np.ndarray] = None

    def __call__(self, eval_prediction) -> dict[str, float]:
        top_k = np.asarray(eval_prediction.predictions)
        labels = np.asarray(eval_prediction.label_ids)
        if labels.ndim == 2:  # soft/one-hot targets
            labels = labels.argmax(axis=-1)
        self.labels, self.top_k = labels.reshape(-1), top_k.reshape(len(labels), -1)
        return load_metric("accuracy_topk").compute(predictions=self.top_k, references=self.labels, **self.options)

    def save_predictions(self, folder: str | Path) -> Optional[Path]:
        """Write :data:`PREDICTIONS_FILE` in ``folder`` (``None`` before any evaluation)."""
        if self.labels is None:
            return None
        return save_predictions(folder, self.labels, self.top_k)


def save_predictions(folder: str | Path, labels: np.ndarray, top_k: np.ndarray) -> Path:
    """``labels`` (``N``) and ``top_k`` (``N×k`` class indices, best first) as :data:`PREDICTIONS_FILE`."""
    path = Path(folder) / PREDICTIONS_FILE
    np.savez_compressed(path, labels=np.asarray(labels, dtype=np.int64), top_k=np.asarray(top_k, dtype=np.int64))
    return path


def load_predictions(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(labels N, top_k N×k)`` from a run folder's :data:`PREDICTIONS_FILE`."""
    with np.load(Path(folder) / PREDICTIONS_FILE) as saved:
        return saved["labels"], saved["top_k"]
