"""Repeated augmentation for map-style datasets: DeiT's ``RASampler``, laid out for accelerate.

DeiT (Touvron et al., 2021; ``samplers.RASampler`` of its reference code) trains with each image
repeated 3 times per "epoch" under different augmentations: every epoch it draws a random
permutation of the ``N`` indices, repeats each index ``R`` times in place
(``i, i, i, j, j, j, …``), and process ``r`` of ``W`` takes every ``W``-th entry starting at ``r``,
keeping only ``⌊N / (W·B)⌋·B`` of them. An epoch therefore still holds about ``N`` samples over all
processes, made of about ``N / R`` distinct images each seen ``R`` times, and the copies of one
image land on different processes at the same step (or side by side in one process's batch).

:class:`RepeatedAugmentationSampler` yields that same assignment as one sequence in the layout
accelerate's ``BatchSamplerShard`` splits (batch ``k`` of ``B`` to process ``k % W``), so the
Trainer's usual sharding hands process ``r`` exactly DeiT's share ``r``. Each item is an
``(index, copy)`` pair: the dataset seeds the augmentation of copy ``c`` of image ``i`` with ``c``
too, so the ``R`` copies differ.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

from .transforms import sample_seed


def samples_per_process(dataset_size: int, num_processes: int, batch_size: int, gradient_accumulation_steps: int = 1) -> int:
    """Samples each process takes per epoch: whole optimizer steps only, at least one step (DeiT drops the rest)."""
    step = num_processes * batch_size * gradient_accumulation_steps
    return max(1, dataset_size // step) * batch_size * gradient_accumulation_steps


def repeated_assignment(dataset_size: int, repeats: int, num_processes: int, per_process: int,
                        generator: torch.Generator) -> list[torch.Tensor]:
    """DeiT's per-process lists: ``num_processes`` tensors of ``per_process × 2`` ``(index, copy)`` rows."""
    indices = torch.randperm(dataset_size, generator=generator).repeat_interleave(repeats)
    copies = torch.arange(repeats).repeat(dataset_size)
    pairs = torch.stack([indices, copies], dim=1)
    needed = num_processes * per_process
    if len(pairs) < needed:  # a tiny dataset: wrap around, as DeiT pads with its first entries
        pairs = pairs.repeat(-(-needed // len(pairs)), 1)
    return [pairs[rank::num_processes][:per_process] for rank in range(num_processes)]


class RepeatedAugmentationSampler(torch.utils.data.Sampler):
    """Each image ``repeats`` times per epoch, each copy augmented differently (DeiT's repeated augmentation).

    Args:
        dataset_size: ``N``.
        repeats: ``R`` (3 in DeiT).
        num_processes, batch_size, gradient_accumulation_steps: ``W``, the per-process batch ``B``
            and the accumulation steps; an epoch holds ``⌊N / (W·B·GA)⌋`` optimizer steps.
        seed: permutation seed, combined with the epoch.
        epoch: returns the current epoch (the dataset's, set by ``DatasetEpochCallback`` also when a
            run resumes mid-epoch); without it, :meth:`set_epoch` sets it.
    """

    def __init__(self, dataset_size: int, repeats: int, num_processes: int, batch_size: int,
                 gradient_accumulation_steps: int = 1, seed: int = 0, epoch: Optional[Callable[[], int]] = None):
        self.dataset_size, self.repeats = int(dataset_size), int(repeats)
        self.num_processes, self.batch_size = int(num_processes), int(batch_size)
        self.per_process = samples_per_process(self.dataset_size, self.num_processes, self.batch_size,
                                               gradient_accumulation_steps)
        self.seed, self._epoch_fn, self._epoch = int(seed), epoch, 0

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch_fn()) if self._epoch_fn is not None else self._epoch

    def __len__(self) -> int:
        return self.num_processes * self.per_process

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(sample_seed(self.seed, "repeated_augmentation", self.epoch))
        shares = repeated_assignment(self.dataset_size, self.repeats, self.num_processes, self.per_process, generator)
        # Interleave the shares batch by batch: accelerate gives batch k of the sequence to process k % W.
        for start in range(0, self.per_process, self.batch_size):
            for share in shares:
                for index, copy in share[start : start + self.batch_size].tolist():
                    yield index, copy
