"""Every image counted: attempted and undecodable images per mode, logged, checkpointed, and a limit.

:class:`ImageCountsMixin` (mixed into the trainer) adds to every log the images the training run
has read and skipped so far (``train_images``, ``skipped_images``, totals of the whole run over all
processes, continued across a resume through ``image_counts.json`` in each checkpoint) and, after an
evaluation, the images it scored and skipped (``eval_images``, ``eval_skipped_images``). It warns
once above 1 % undecodable images and stops the run above ``args.max_skipped_fraction``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch

from .data import share_above
from .errors import TooManyBadImagesError

logger = logging.getLogger(__name__)

IMAGE_COUNTS_FILE = "image_counts.json"


class ImageCountsMixin:
    """``transformers.Trainer`` mixin: counts of attempted and undecodable images (see the module docstring)."""

    def _counts(self) -> dict[str, list[int]]:
        # Images per mode as [attempted, undecodable]: this process's since they were last summed.
        if not hasattr(self, "_image_counts"):
            self._image_counts = {"train": [0, 0], "eval": [0, 0]}
            self._train_image_totals = [0, 0]  # the whole run's, over all processes
            self._warned_skipped: set[str] = set()
        return self._image_counts

    def _count_images(self, mode: str, inputs: dict[str, Any]) -> None:
        """Add a batch: its images plus those its collator dropped as undecodable (host integers, no sync)."""
        skipped = int(inputs.get("num_skipped", 0))
        counts = self._counts()[mode]
        counts[0] += int(inputs.get("num_images", len(inputs["pixel_values"]) + skipped))
        counts[1] += skipped

    def _restore_image_counts(self, checkpoint: Optional[str]) -> None:
        """Continue the training totals recorded in ``checkpoint`` (zeros without one)."""
        self._counts()
        path = os.path.join(str(checkpoint), IMAGE_COUNTS_FILE) if checkpoint else None
        if not path or not os.path.isfile(path):
            self._train_image_totals = [0, 0]
            return
        with open(path, encoding="utf-8") as handle:
            counts = json.load(handle)
        self._train_image_totals = [int(counts.get("train_images", 0)), int(counts.get("skipped_images", 0))]

    def _log_image_counts(self, logs: dict[str, float], mode: Optional[str]) -> None:
        """Add the counts to a training log or an evaluation's metrics, and apply the limit (collective)."""
        # an evaluation's metrics carry "<prefix>_runtime" ("eval_runtime", or "teacher_runtime" ...)
        evaluation = next((k[: -len("_runtime")] for k in logs if k.endswith("_runtime") and not k.startswith("train")), None)
        if mode == "train":
            attempted, skipped = self.training_image_counts()
            logs["skipped_images"], logs["train_images"] = skipped, attempted
            self._check_skipped("training", attempted, skipped)
        elif evaluation is not None:
            attempted, skipped = self._sum_image_counts("eval")
            logs[f"{evaluation}_images"], logs[f"{evaluation}_skipped_images"] = attempted - skipped, skipped
            self._check_skipped("evaluation", attempted, skipped)

    def _sum_image_counts(self, mode: str) -> tuple[int, int]:
        """``(attempted, undecodable)`` of ``mode`` over all processes since the last call (collective)."""
        local = torch.tensor(self._counts()[mode], dtype=torch.float64, device=self.args.device)
        self._image_counts[mode] = [0, 0]
        total = self.accelerator.reduce(local, reduction="sum") if self.accelerator.num_processes > 1 else local
        return int(total[0].item()), int(total[1].item())

    def training_image_counts(self) -> tuple[int, int]:
        """``(attempted, undecodable)`` training images of the whole run, over all processes (collective)."""
        attempted, skipped = self._sum_image_counts("train")
        self._train_image_totals[0] += attempted
        self._train_image_totals[1] += skipped
        return self._train_image_totals[0], self._train_image_totals[1]

    def _check_skipped(self, what: str, attempted: int, skipped: int) -> None:
        """Warn above 1 % undecodable images, stop above ``max_skipped_fraction`` (the same decision on every rank).

        An evaluation covers its whole split; training so far is a sample of it (``share_above``).
        """
        whole_split, limit = what == "evaluation", self.args.max_skipped_fraction
        message = f"{skipped:,} of {attempted:,} {what} images ({skipped / max(attempted, 1):.1%}) could not be decoded"
        if share_above(skipped, attempted, limit, whole_split):
            raise TooManyBadImagesError(
                f"max_skipped_fraction: {message}, above the limit of {limit:.1%}; fix or remove the bad files "
                "(text, truncated or missing images), or raise --max_skipped_fraction"
            )
        if share_above(skipped, attempted, 0.01, whole_split) and what not in self._warned_skipped:
            self._warned_skipped.add(what)
            logger.warning("%s and were skipped (the run stops above --max_skipped_fraction, %.1f %%)", message, 100 * limit)

    def _checkpoint_extras(self) -> dict[str, Any]:
        """Saved in every checkpoint: the training image totals, so a resumed run continues them."""
        attempted, skipped = self.training_image_counts()
        # Cooperative: this mixin must come before AtomicCheckpointMixin, whose hook returns nothing.
        return {**super()._checkpoint_extras(), IMAGE_COUNTS_FILE: {"train_images": attempted, "skipped_images": skipped}}
