"""Every image counted: attempted and undecodable images per mode, logged, checkpointed, and a limit.

:class:`ImageCounter` (a part of the trainer) adds to every log the images the training run has read
and skipped so far (``train_images``, ``skipped_images``, totals of the whole run over all
processes, continued across a resume through ``image_counts.json`` in each checkpoint) and, after an
evaluation, the images it scored and skipped (``eval_images``, ``eval_skipped_images``). It warns
once above 1 % undecodable images and stops the run above ``max_skipped_fraction``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from ..data import share_above
from ..errors import TooManyBadImagesError

logger = logging.getLogger(__name__)

IMAGE_COUNTS_FILE = "image_counts.json"


class ImageCounter:
    """Attempted and undecodable images per mode (``"train"``, ``"eval"``).

    Args:
        accelerator: sums the counts over processes (:meth:`training_totals` and the logs are collectives).
        device: where the sums are made (the trainer's ``args.device``).
        max_skipped_fraction: the share of undecodable images above which the run stops.
    """

    def __init__(self, accelerator: Any, device: Any, max_skipped_fraction: float):
        self.accelerator, self.device, self.max_skipped_fraction = accelerator, device, max_skipped_fraction
        # Images per mode as [attempted, undecodable]: this process's since they were last summed.
        self._pending = {"train": [0, 0], "eval": [0, 0]}
        self._train_totals = [0, 0]  # the whole run's, over all processes
        self._warned: set[str] = set()

    def count(self, mode: str, inputs: dict[str, Any]) -> None:
        """Add a batch: its images plus those its collator dropped as undecodable (host integers, no sync)."""
        skipped = int(inputs.get("num_skipped", 0))
        counts = self._pending[mode]
        counts[0] += int(inputs.get("num_images", len(inputs["pixel_values"]) + skipped))
        counts[1] += skipped

    def state_dict(self) -> dict[str, int]:
        """The training totals of the whole run, saved in every checkpoint (a collective)."""
        attempted, skipped = self.training_totals()
        return {"train_images": attempted, "skipped_images": skipped}

    def load_state_dict(self, state: Optional[dict[str, int]]) -> None:
        """Continue the totals of a checkpoint's :meth:`state_dict` (zeros for ``None``: a run from the start)."""
        state = state or {}
        self._train_totals = [int(state.get("train_images", 0)), int(state.get("skipped_images", 0))]

    def add_to_log(self, logs: dict[str, float], mode: Optional[str]) -> None:
        """Add the counts to a training log or an evaluation's metrics, and apply the limit (collective)."""
        # an evaluation's metrics carry "<prefix>_runtime" ("eval_runtime", or "teacher_runtime" ...)
        evaluation = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime") and not k.startswith("train")), None)
        if mode == "train":
            attempted, skipped = self.training_totals()
            logs["skipped_images"], logs["train_images"] = skipped, attempted
            self._check("training", attempted, skipped)
        elif evaluation is not None:
            attempted, skipped = self._sum("eval")
            logs[f"{evaluation}_images"], logs[f"{evaluation}_skipped_images"] = attempted - skipped, skipped
            self._check("evaluation", attempted, skipped)

    def training_totals(self) -> tuple[int, int]:
        """``(attempted, undecodable)`` training images of the whole run, over all processes (collective)."""
        attempted, skipped = self._sum("train")
        self._train_totals[0] += attempted
        self._train_totals[1] += skipped
        return self._train_totals[0], self._train_totals[1]

    def _sum(self, mode: str) -> tuple[int, int]:
        """``(attempted, undecodable)`` of ``mode`` over all processes since the last call (collective)."""
        local = torch.tensor(self._pending[mode], dtype=torch.float64, device=self.device)
        self._pending[mode] = [0, 0]
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return int(total[0].item()), int(total[1].item())

    def _check(self, what: str, attempted: int, skipped: int) -> None:
        """Warn above 1 % undecodable images, stop above ``max_skipped_fraction`` (the same decision on every rank).

        An evaluation covers its whole split; training so far is a sample of it (``share_above``).
        """
        whole_split, limit = what == "evaluation", self.max_skipped_fraction
        message = f"{skipped:,} of {attempted:,} {what} images ({skipped / max(attempted, 1):.1%}) could not be decoded"
        if share_above(skipped, attempted, limit, whole_split):
            raise TooManyBadImagesError(
                f"max_skipped_fraction: {message}, above the limit of {limit:.1%}; fix or remove the bad files "
                "(text, truncated or missing images), or raise --max_skipped_fraction"
            )
        if share_above(skipped, attempted, 0.01, whole_split) and what not in self._warned:
            self._warned.add(what)
            logger.warning("%s and were skipped (the run stops above --max_skipped_fraction, %.1f %%)", message, 100 * limit)
