"""Atomic checkpoints: every ``checkpoint-N`` is complete or absent.

:class:`AtomicCheckpointWriter` (a part of the trainer) has the Trainer write ``checkpoint-N`` into
``<output_dir>/.checkpoint-staging/``, adds the state files of the trainer's parts, records the
checksum manifest (:mod:`.manifest`), flushes every file and renames the folder into place, so a
crash, a kill or a full disk mid-save never leaves a ``checkpoint-N`` that resume would trust. A
failed write (:func:`~.write_errors.write_failure`), of a checkpoint or of the final student
(:meth:`AtomicCheckpointWriter.save_final`), stops the run with
:class:`~hf_spectralkd.errors.CheckpointSaveError` / :class:`~hf_spectralkd.errors.WriteFailedError`
naming the folder, the cause and the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Iterator, Mapping, Optional

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .manifest import write_manifest
from .write_errors import raise_if_any_write_failed, write_failure

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"


class AtomicCheckpointWriter:
    """Writes each checkpoint into a staging folder and publishes it with one rename; restores the parts' state.

    Args:
        accelerator: the trainer's (barriers, and one failure decision for every process).
        args: the training arguments (``should_save``, ``device``, ``save_total_limit``).
        parts: file name → an object with ``state_dict()`` (JSON-serialisable; called on every process, so it may
            be a collective) and, if its state is restored on resume, ``load_state_dict(payload or None)``.
            This is the one way state beyond the Trainer's own goes into a checkpoint and back.
    """

    def __init__(self, accelerator: Any, args: Any, parts: Mapping[str, Any]):
        self.accelerator, self.args, self.parts = accelerator, args, dict(parts)
        #: While :meth:`save` runs, the folder the Trainer's ``_save_checkpoint`` writes into (see :meth:`run_dir`).
        self._staging_root: Optional[str] = None

    def run_dir(self, default: str) -> str:
        """The folder ``Trainer._save_checkpoint`` puts ``checkpoint-N`` in: the staging folder during :meth:`save`."""
        return self._staging_root if self._staging_root is not None else default

    @contextlib.contextmanager
    def _staging(self, staging_root: str) -> Iterator[None]:
        self._staging_root = staging_root
        try:
            yield
        finally:
            self._staging_root = None

    def save(self, run_dir: str, state: Any, write: Callable[[], None]) -> None:
        """Write ``checkpoint-<state.global_step>`` with ``write`` (the Trainer's save), then publish it atomically."""
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        failure: Optional[BaseException] = None
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        payloads = {file_name: part.state_dict() for file_name, part in self.parts.items()}  # every process
        try:
            with self._staging(staging_root):
                write()
            if self.args.should_save:
                for file_name, payload in payloads.items():
                    with open(os.path.join(staged, file_name), "w", encoding="utf-8") as handle:
                        json.dump(payload, handle)
        except Exception as error:  # noqa: BLE001 - a full disk, a lost mount, a quota: report it, keep what is complete
            if write_failure(error, run_dir) is None:
                if self.args.should_save:  # nothing half-written stays behind, even for a bug
                    shutil.rmtree(staged, ignore_errors=True)
                raise  # a bug keeps its traceback
            failure = error
        # Every process has written its files (DDP: rng_state_<rank>.pth, DeepSpeed: its shards)
        # before the manifest is hashed and the folder renamed.
        self.accelerator.wait_for_everyone()
        if self.args.should_save and failure is None:
            try:
                publish_staged_folder(staged, final)
            except OSError as error:
                failure = error
        raise_if_any_write_failed(self.accelerator, self.args, failure, f"checkpoint: could not write {name}", run_dir,
                                  staging_root)
        self.accelerator.wait_for_everyone()
        best = state.best_model_checkpoint
        if best and best.startswith(staging_root):
            state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)

    def restore(self, checkpoint: Optional[str]) -> None:
        """Give each part the state saved in ``checkpoint`` (``None`` without a checkpoint or its file)."""
        for file_name, part in self.parts.items():
            if not hasattr(part, "load_state_dict"):
                continue
            path = os.path.join(str(checkpoint), file_name) if checkpoint else None
            payload = None
            if path and os.path.isfile(path):
                with open(path, encoding="utf-8") as handle:
                    payload = json.load(handle)
            part.load_state_dict(payload)

    def save_final(self, folder: str, write: Callable[[], None]) -> None:
        """Run ``write`` (``Trainer._save``: weights, config, processor); a failed write of the final student into
        ``folder`` is one line on every process. Inside :meth:`save` its failures are the checkpoint's."""
        if self._staging_root is not None:
            return write()
        failure: Optional[BaseException] = None
        try:
            write()
        except Exception as error:  # noqa: BLE001 - see save
            if write_failure(error, folder) is None:
                raise
            failure = error
        raise_if_any_write_failed(self.accelerator, self.args, failure, "output_dir: could not write the final student",
                                  folder)


def publish_staged_folder(staged: str, final: str) -> None:
    """Record ``staged``'s checksums, flush every file to disk, then rename it to ``final`` (replacing an older copy).

    The manifest is written before the rename, not after it, so that it is part of what the rename
    makes visible at once: a crash between a rename and a later manifest write would leave a
    checkpoint that verification could only check for structure.
    """
    write_manifest(staged)
    if os.path.exists(final):
        shutil.rmtree(final)
    _fsync_tree(staged)
    os.replace(staged, final)
    _fsync_dir(os.path.dirname(final))
    shutil.rmtree(os.path.dirname(staged), ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    # Without the flush, a power loss after the rename can leave a complete-looking folder whose
    # files are empty: the rename reaches the disk before the data on common filesystems.
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb+") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)
