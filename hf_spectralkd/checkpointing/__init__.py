"""Checkpoints that are complete or absent, verified before a resume, and one run per output folder.

* :mod:`.atomic`: :class:`AtomicCheckpointWriter` (staging folder, flush, one rename; the trainer's parts' state).
* :mod:`.manifest`: checksum manifests, :func:`verify_checkpoint`, and :func:`resolve_resume`, the resume point.
* :mod:`.reload`: weights reloaded through ``from_pretrained`` (huggingface/transformers#48805).
* :mod:`.run_lock`: :class:`OutputDirLock`, the lock that keeps a second run out of a folder.
* :mod:`.write_errors`: a failed write (full disk, read-only mount) of a checkpoint or the final student as one line.
"""

from .atomic import STAGING_DIR, AtomicCheckpointWriter, publish_staged_folder
from .manifest import (
    MANIFEST_FILE,
    checkpoint_folders,
    file_sha256,
    is_checkpoint_folder,
    manifest_problems,
    newest_verified_checkpoint,
    resolve_resume,
    verify_checkpoint,
    write_manifest,
)
from .reload import OTHER_CHECKPOINT, load_weights_from_folder, single_file_checkpoint
from .run_lock import LOCK_FILE, OutputDirLock, acquire_run_lock
from .write_errors import file_system_state, write_failure

__all__ = [
    "LOCK_FILE",
    "MANIFEST_FILE",
    "OTHER_CHECKPOINT",
    "STAGING_DIR",
    "AtomicCheckpointWriter",
    "OutputDirLock",
    "acquire_run_lock",
    "checkpoint_folders",
    "file_sha256",
    "file_system_state",
    "is_checkpoint_folder",
    "load_weights_from_folder",
    "manifest_problems",
    "newest_verified_checkpoint",
    "publish_staged_folder",
    "resolve_resume",
    "single_file_checkpoint",
    "verify_checkpoint",
    "write_failure",
    "write_manifest",
]
