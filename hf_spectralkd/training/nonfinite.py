"""Catch a NaN or infinite loss component without a host–device synchronisation in every step.

Reading a CUDA tensor's value on the host (``.item()``, ``bool(t)``) makes the host wait for every
queued kernel, which on a GPU stalls the next step's launch. :class:`NonFiniteWatch` keeps, on the
device, the first step at which each component went non-finite and its value; the host reads it
only at a check: every ``interval`` steps if asked (1 = every step, the strictest), at each logging
step, before every checkpoint and at the end of training. A checkpoint is therefore never written
after a non-finite loss, whatever the interval.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

from ..errors import NonFiniteLossError


class NonFiniteWatch:
    """First non-finite step and value per loss component, kept on the device.

    Args:
        names: the components' names, in the order of the ``components`` vectors passed to :meth:`update`.
    """

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self._first_step: Optional[torch.Tensor] = None  # C, -1 while finite
        self._first_value: Optional[torch.Tensor] = None  # C

    def update(self, components: torch.Tensor, step: int) -> None:
        """Record ``components`` (``C``, on any device) of optimizer step ``step``; no synchronisation."""
        if self._first_step is None:
            self._first_step = torch.full(components.shape, -1, dtype=torch.long, device=components.device)
            self._first_value = torch.zeros_like(components)
        new = ~torch.isfinite(components) & (self._first_step < 0)
        self._first_step = torch.where(new, torch.full_like(self._first_step, step), self._first_step)
        self._first_value = torch.where(new, components, self._first_value)

    def check(self, accelerator, detected_at: int, output_dir: str) -> None:
        """Raise :class:`NonFiniteLossError` on every process if any process saw a non-finite component.

        A collective when there are several processes: call it at the same points on all of them.
        """
        if self._first_step is None:
            return
        steps, values = self._first_step, self._first_value
        if accelerator.num_processes > 1:
            steps, values = accelerator.gather(steps[None]), accelerator.gather(values[None])  # P×C
        else:
            steps, values = steps[None], values[None]
        steps, values = steps.cpu().tolist(), values.cpu().tolist()  # the one synchronisation
        bad = [(step, name, value) for per_step, per_value in zip(steps, values)
               for step, name, value in zip(per_step, self.names, per_value) if step >= 0]
        if not bad:
            return
        first = min(step for step, _, _ in bad)
        terms = ", ".join(f"{name}={value:.4g}" for step, name, value in bad if step == first and not math.isfinite(value))
        when = (
            "Training stopped before the optimizer step"
            if detected_at == first
            else f"Detected at step {detected_at} (checked at each log and before each checkpoint; "
            "--nonfinite_check_interval 1 checks every step); no checkpoint was written after it"
        )
        last = _last_checkpoint(output_dir)
        kept = (
            f"the last checkpoint, {os.path.basename(last)} in {output_dir}, is intact. Lower the learning rate, check "
            "the inputs, or resume from it"
            if last else
            f"no checkpoint was written before it (nothing in {output_dir} to resume from). Lower the learning rate or "
            "check the inputs, and start again"
        )
        raise NonFiniteLossError(f"non-finite loss at step {first}: {terms or 'on another process'}. {when}; {kept}.")


def _last_checkpoint(output_dir: str) -> Optional[str]:
    """The newest ``checkpoint-N`` folder of ``output_dir``, or ``None`` (the run stopped before its first save)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
