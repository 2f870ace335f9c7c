"""Preemption: SIGTERM ends a run at a step boundary, with a checkpoint of exactly that step.

Schedulers (Slurm, Kubernetes, torchrun's agent) send SIGTERM to the job's whole process group,
DataLoader workers included. transformers 5.23's own handler (``enable_jit_checkpoint``) fails
there twice, both measured:

* torch installs a C handler in every DataLoader worker that lets a SIGTERM from anyone but the
  parent kill the worker; the main process then stops with "DataLoader worker (pid …) is killed by
  signal: Terminated", a traceback, exit code 1 and no checkpoint.
* its checkpoint is written from ``on_pre_optimizer_step`` or ``on_step_begin``, inside step N+1:
  ``checkpoint-N`` then holds step N's weights with the RNG state and image counts of step N+1
  (after a resume 4 images too many were counted and, with dropout, the weights differed from an
  uninterrupted run's), while the run reported "stopped at step N+1".

Here the signal handler only records the request (:class:`PreemptionWatch`); the trainer looks at it
after each optimizer step, where a regular checkpoint would be written, saves ``checkpoint-N``
with everything of step N (weights, optimizer, RNG, data position, image counts) and stops.
Workers ignore SIGTERM and SIGINT (:class:`IgnoreStopSignals`), so only the main process decides.
(torch's handler is in place from the worker's start until its ``worker_init_fn`` runs: a signal in
those few milliseconds of a worker's start-up still kills it.)
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)


class PreemptionWatch:
    """Records a SIGTERM while installed; :meth:`requested` tells every process the same answer.

    The handler does nothing but set a flag, so a signal that arrives during a forward pass, an
    evaluation or a checkpoint write never interrupts it: the run stops at the next step boundary.
    """

    def __init__(self) -> None:
        self.received = False  # set by the handler in this process
        self._previous: Optional[Callable] = None
        self._installed = False

    def _record(self, signum, frame) -> None:
        if not self.received:
            self.received = True
            logger.warning("SIGTERM received: saving a checkpoint at the end of the current step, then stopping")

    def install(self) -> None:
        """Handle SIGTERM in this process until :meth:`restore` (a no-op outside the main thread)."""
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self.received = False
        self._previous = signal.signal(signal.SIGTERM, self._record)
        self._installed = True

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def requested(self, accelerator) -> bool:
        """Whether any process received SIGTERM: a collective with several processes (call it at the same
        step on all of them), so that all save the same step and none waits in a step the others left.

        One 1-element reduction per optimizer step. With the default ``logging_nan_inf_filter`` the
        Trainer already reads each step's loss on the host, so the host waits for the device there anyway.
        """
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(float(self.received), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn``: the worker ignores SIGTERM and SIGINT, then runs ``inner``.

    A process-group signal then reaches only the main process's logic, which shuts its workers down
    itself. Picklable (the ``spawn`` and ``forkserver`` start methods send it to the worker).
    """

    def __init__(self, inner: Optional[Callable[[int], None]] = None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def ignore_stop_signals_in_workers(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """Make ``loader``'s workers ignore SIGTERM/SIGINT, keeping its own ``worker_init_fn`` (run after).

    ``loader`` may be accelerate's wrapper, which iterates the DataLoader it holds (``base_dataloader``);
    a loader rebuilt from it on resume (``skip_first_batches``) copies the wrapped ``worker_init_fn``.
    """
    target = getattr(loader, "base_dataloader", loader)
    if target.num_workers > 0 and not isinstance(target.worker_init_fn, IgnoreStopSignals):
        target.worker_init_fn = IgnoreStopSignals(target.worker_init_fn)
    return loader


def take_sigterm_from_jit_checkpoint(callback_handler) -> PreemptionWatch:
    """Take SIGTERM from transformers' JIT checkpoint (it saves inside a step; see the module docstring).

    ``Trainer.__init__`` installed its handler already, for the trainer's lifetime: remove its callback and give
    the signal its previous handler back. The returned watch is installed only while the trainer trains.
    """
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    for callback in list(callback_handler.callbacks):
        if isinstance(callback, JITCheckpointCallback):
            callback_handler.remove_callback(callback)
            manager = callback.jit_manager
            if manager is not None and manager._original_sigterm_handler is not None:
                signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
    return PreemptionWatch()
