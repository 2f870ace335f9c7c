"""Failed writes of the run's files (a full disk, a read-only or lost mount, a quota) as one line.

:func:`write_failure` tells a failed write from a bug, whatever form the saver gave it;
:func:`raise_if_any_write_failed` turns one (on any process) into the one-line
:class:`~hf_spectralkd.errors.CheckpointSaveError` (a checkpoint) or
:class:`~hf_spectralkd.errors.WriteFailedError` (the final student), naming the folder, the cause and
the last complete checkpoint; :func:`reporting_write_failure` does the same for the files written after
training (metrics, trainer state, card, results, profiles), naming the file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any, Optional

from transformers.trainer_utils import get_last_checkpoint

from ..errors import CheckpointSaveError, WriteFailedError
from ..io.integrity import first_line

#: What to do after a failed write of a checkpoint, and of the final student (the run is trained to its end then).
FREE_SPACE = "Free space (or make the file system writable again) and resume with --resume_from_checkpoint true"
FREE_SPACE_FINISHED = ("Free space (or make the file system writable again) and run the same command with "
                       "--resume_from_checkpoint true: a checkpoint at the last step is saved as the final student "
                       "without training again")
#: What to do when a file written after the final student fails (the student is whole, its results are not), and
#: when one of an evaluation's files fails.
RESULTS_REMEDY = ("the trained student and the checkpoints are intact (`hf-spectralkd verify OUTPUT_DIR`); free space "
                  "(or make the file system writable again) and score it with --do_train false --do_eval true --student "
                  "OUTPUT_DIR to write its results")
EVALUATION_REMEDY = "free space (or make the file system writable again) and run the evaluation again"
#: What torch.save's C++ zip writer raises (a RuntimeError without the errno) when the disk fills under it: the
#: failed stream write, then the size check at the archive's end (both seen on a full tmpfs with torch 2.x).
_TORCH_WRITE_FAILURES = ("iostream error", "unexpected pos", "file write failed")
#: Below this, a file system counts as full in messages: a write that failed for want of space leaves less than a page.
_FULL_BELOW_BYTES = 1 << 20


def write_failure(error: BaseException, folder: str) -> Optional[str]:
    """Why writing under ``folder`` failed, in a few words, when ``error`` is a failed write; ``None`` when it is not.

    A full disk, a read-only or lost mount or a quota reaches the savers in three forms: an
    ``OSError`` from Python's own writes, a ``SafetensorError`` ("I/O error: No space left on device
    (os error 28)") from safetensors, and a ``RuntimeError`` without the errno from ``torch.save``'s
    C++ writer, for which the file system is asked what went wrong. Anything else is a bug and keeps its traceback.
    """
    if isinstance(error, OSError):
        return str(error)
    message = first_line(error)
    if type(error).__name__ == "SafetensorError" and "I/O error" in message:
        return message
    if isinstance(error, RuntimeError) and any(text in str(error) for text in _TORCH_WRITE_FAILURES):
        return file_system_state(folder) or f"torch.save could not write ({message})"
    return None


def file_system_state(folder: str) -> Optional[str]:
    """``"read-only file system"`` or ``"no space left on device (N bytes free)"`` for the file system of
    ``folder`` (or of its nearest existing parent), ``None`` when it is writable with room to spare."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    if stats.f_flag & os.ST_RDONLY:
        return "read-only file system"
    free = stats.f_bavail * stats.f_frsize
    return f"no space left on device ({free:,} bytes free)" if free < _FULL_BELOW_BYTES else None


@contextlib.contextmanager
def reporting_write_failure(output_dir: str, files: str, trained: bool = True):
    """Around writes of ``files`` (their names, for the message) in ``output_dir`` after the final student was
    saved (``trained``) or after an evaluation: a failed write (:func:`write_failure`) becomes one
    :class:`WriteFailedError` that names them and says what to do; a :class:`WriteFailedError` raised inside,
    or a bug, passes unchanged. The files' own writers rarely name them (a full disk fails at ``close``)."""
    try:
        yield
    except WriteFailedError:
        raise
    except Exception as error:  # noqa: BLE001 - only a failed write is reported; anything else is re-raised
        cause = write_failure(error, output_dir)
        if cause is None:
            raise
        remedy = RESULTS_REMEDY if trained else EVALUATION_REMEDY
        raise WriteFailedError(f"output_dir: could not write {files} in '{output_dir}': {cause}; {remedy}") from error


def raise_if_any_write_failed(accelerator: Any, args: Any, failure: Optional[BaseException], what: str, run_dir: str,
                              staging_root: Optional[str] = None) -> None:
    """Raise ``<what> in '<run_dir>': <cause>; <last checkpoint>. <remedy>`` on every process if one failed.

    ``staging_root`` (a checkpoint's; ``None`` for the final student) is removed to give the partial copy's space back.
    """
    failed = failure is not None
    if accelerator.num_processes > 1:
        import torch

        flag = torch.tensor(float(failed), device=args.device)
        failed = bool(accelerator.reduce(flag, reduction="sum") > 0)
    if not failed:
        return
    # Asked before the partial copy gives its space back: the file system as the failed write saw it.
    cause = write_failure(failure, run_dir) if failure is not None else "the save failed on another process"
    if args.should_save and staging_root is not None:
        shutil.rmtree(staging_root, ignore_errors=True)
    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    kept = f"{os.path.basename(last)} is the last complete checkpoint" if last else "no complete checkpoint exists yet"
    checkpoint = staging_root is not None
    error_type, remedy = (CheckpointSaveError, FREE_SPACE) if checkpoint else (WriteFailedError, FREE_SPACE_FINISHED)
    raise error_type(f"{what} in '{run_dir}': {cause}; {kept}. {remedy}") from failure
