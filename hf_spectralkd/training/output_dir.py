"""The output folder of a run: refused when it holds another run, cleared on ``--overwrite_output_dir``, locked.

All are applied by ``SpectralDistillationTrainer.train``, the clearing while it holds the folder's lock
(:class:`OutputDirHold`), which a whole run (training, final save, evaluation, results) keeps through
``SpectralDistillationTrainer.holding_output_dir``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from ..checkpointing import OutputDirLock, acquire_run_lock
from ..errors import ConfigurationError

logger = logging.getLogger(__name__)


def check_writable(output_dir: str, argument: str = "output_dir") -> Path:
    """Refuse an ``output_dir`` that cannot be created or written (checked before any data is cached in it)."""
    path = Path(output_dir)
    probe_dir = path
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    if probe_dir.exists() and not probe_dir.is_dir():
        raise ConfigurationError(f"{argument}: '{output_dir}' is inside a file ('{probe_dir}'), not a folder")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise ConfigurationError(f"{argument}: '{output_dir}' is not writable (no write permission on '{probe_dir}')")
    return path


def check_output_dir(output_dir: str, overwrite: bool, resume: Any, argument: str = "output_dir") -> None:
    """Refuse an unwritable folder, or one holding another run unless overwriting or resuming."""
    path = check_writable(output_dir, argument)
    if overwrite and resume and Path(resume).resolve().is_relative_to(path.resolve()):
        raise ConfigurationError(
            f"overwrite_output_dir: true would delete the checkpoint resumed from ('{resume}'); drop "
            "--overwrite_output_dir to continue that run, or drop --resume_from_checkpoint to start over"
        )
    if path.is_dir() and not overwrite and not resume:
        previous = sorted(p.name for p in path.iterdir() if p.name.startswith("checkpoint-") or p.name == "trainer_state.json")
        if previous:
            raise ConfigurationError(
                f"{argument}: '{output_dir}' already holds a run ({', '.join(previous[:3])}); pass "
                "--resume_from_checkpoint true to continue it, --overwrite_output_dir true to start over, or choose "
                "another --output_dir"
            )


#: What a finished or interrupted run leaves in its output folder beside its checkpoints: the final student, its
#: card and the run's records. ``--overwrite_output_dir`` removes them with the checkpoints, so that neither a resume
#: nor a reader of the folder can take the previous run for the new one.
PREVIOUS_RUN_FILES = (
    "model.safetensors", "model.safetensors.index.json", "config.json", "preprocessor_config.json", "README.md",
    "training_args.bin", "trainer_state.json", "results.json", "run_config.json", "all_results.json",
    "train_results.json", "eval_results.json", "spectral_profiles.json", "spectral_profiles.png",
    "spectral_dynamics.jsonl",
)


def clear_previous_run(output_dir: str) -> list[str]:
    """Delete the previous run of ``output_dir`` (``--overwrite_output_dir true``): its ``checkpoint-*`` folders, an
    unfinished save and :data:`PREVIOUS_RUN_FILES`. Call it holding the folder's lock. Returns what was removed.

    Without it a new run kept the old run's newer checkpoints, and a later ``--resume_from_checkpoint true``
    continued the *old* run's weights under the new run's name.
    """
    import re
    import shutil

    root = Path(output_dir)
    if not root.is_dir():
        return []
    removed = []
    for entry in sorted(root.iterdir()):
        folder = entry.is_dir() and not entry.is_symlink()
        if folder and (re.fullmatch(r"checkpoint-\d+", entry.name) or entry.name == ".checkpoint-staging"):
            shutil.rmtree(entry)
        elif entry.name in PREVIOUS_RUN_FILES or re.fullmatch(r"model-\d+-of-\d+\.safetensors", entry.name):
            entry.unlink()
        else:
            continue
        removed.append(entry.name)
    if removed:
        logger.warning("overwrite_output_dir: removed the previous run from '%s': %s", output_dir, ", ".join(removed))
    return removed


class OutputDirHold:
    """A trainer's hold on its output folder's lock (:class:`~hf_spectralkd.checkpointing.OutputDirLock`).

    :meth:`holding` takes the lock on entry and releases it on exit; nested inside another
    :meth:`holding` of the same trainer it keeps the outer hold, so that ``train()``, which holds
    the folder for itself, leaves a whole run's hold in place (the lock itself is not re-entrant:
    a second holder is a second run). A collective: every process enters it.

    Args:
        accelerator: the trainer's (the main process takes the lock, every process gets its answer).
        output_dir: the run folder.
    """

    def __init__(self, accelerator: Any, output_dir: str):
        self.accelerator, self.output_dir = accelerator, output_dir
        self._lock: Optional[OutputDirLock] = None
        self._depth = 0

    @contextlib.contextmanager
    def holding(self) -> Iterator[bool]:
        """Hold the lock for the block; yields whether this process holds the lock file (the main process)."""
        if self._depth == 0:
            self._lock = acquire_run_lock(self.accelerator, self.output_dir)
        self._depth += 1
        try:
            yield self._lock is not None
        finally:
            self._depth -= 1
            if self._depth == 0 and self._lock is not None:
                self._lock.release()  # never raises: the run's own error is the one reported
                self._lock = None
