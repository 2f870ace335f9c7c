"""The order the training data is read in, and where a resumed run picks it up (a part of the trainer).

* DeiT's repeated-augmentation sampler for a map-style dataset that asks for repeats
  (:class:`~hf_spectralkd.data.RepeatedAugmentationSampler`);
* a stream that resumes itself (``ResumableImageStream.fast_forward``) is positioned at the
  checkpoint's step here and is not replayed through the DataLoader: skipping its trained batches
  would cost time that grows with the run. Map-style data is resumed by the Trainer as usual.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from ..data import RepeatedAugmentationSampler
from ..data.streaming import resumes_itself


class DataOrder:
    """Sampler and resume position of the training data.

    Args:
        args: the training arguments (world size, seed, accumulation, ``ignore_data_skip``).
    """

    def __init__(self, args: Any):
        self.args = args

    def sampler(self, dataset: Any, batch_size: int) -> Optional[torch.utils.data.Sampler]:
        """DeiT's repeated-augmentation sampler when ``dataset.repeated_augmentation > 1``; ``None``: the Trainer's own."""
        repeats = int(getattr(dataset, "repeated_augmentation", 1) or 1)
        if repeats <= 1 or isinstance(dataset, torch.utils.data.IterableDataset):
            return None
        return RepeatedAugmentationSampler(
            len(dataset), repeats, self.args.world_size, batch_size, self.args.gradient_accumulation_steps,
            seed=self.args.seed, epoch=lambda: getattr(dataset, "epoch", 0),
        )

    @staticmethod
    def batches_to_skip(dataset: Any, skipped_by_trainer: int) -> int:
        """The batches the Trainer replays on resume: none for a stream that resumes itself."""
        return 0 if resumes_itself(dataset) else skipped_by_trainer

    def resume(self, dataset: Any, checkpoint: Optional[str]) -> None:
        """Position a stream that resumes itself at ``checkpoint``'s step (the start without one); others unchanged."""
        if not hasattr(dataset, "fast_forward"):
            return
        with self.args.main_process_first(desc="stream layout"):
            getattr(dataset, "layout", None)  # footers, the cached layout, or one count, before workers start
        global_step = 0
        state_file = os.path.join(str(checkpoint), "trainer_state.json") if checkpoint else None
        if state_file and not self.args.ignore_data_skip and os.path.isfile(state_file):
            with open(state_file, encoding="utf-8") as handle:
                global_step = json.load(handle)["global_step"]
        dataset.fast_forward(global_step * self.args.gradient_accumulation_steps, self.args.per_device_train_batch_size)
