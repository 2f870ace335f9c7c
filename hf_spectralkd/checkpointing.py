"""Checkpoints that are complete or absent, reloads that restore the weights, one run per folder.

* :class:`AtomicCheckpointMixin` (mixed into the trainer): every ``checkpoint-N`` is written into
  ``<output_dir>/.checkpoint-staging/`` and renamed into place after its files are flushed, so a
  crash, a kill or a full disk mid-save never leaves a ``checkpoint-N`` that resume would trust. A
  failed write (:func:`write_failure`), of a checkpoint or of the final student, stops the run with
  :class:`~hf_spectralkd.errors.CheckpointSaveError` / :class:`~hf_spectralkd.errors.WriteFailedError`
  naming the folder, the cause and the last complete checkpoint.
* Reloads go through ``from_pretrained``: transformers 5.23 restores ViT-family checkpoints with a
  raw ``load_state_dict`` whose keys (the in-memory names) do not match the saved ones (the Hub
  names), so a resumed run silently restarts from its initial weights
  (huggingface/transformers#48805). ``from_pretrained`` converts the keys.
* A checksum manifest (``checkpoint_manifest.json``: size and SHA-256 of every file) is written
  into each checkpoint before its rename, so :func:`verify_checkpoint` catches silent corruption (a
  flipped byte), not only truncation. ``--resume_from_checkpoint true`` resumes from
  :func:`newest_verified_checkpoint`: a damaged newest checkpoint (a partial ``rsync``, a disk
  error) is skipped with a warning instead of crashing the resumed run.
* :class:`OutputDirLock`: a lock file in ``output_dir`` holding the owner's pid and host, kept
  fresh by a heartbeat, so a second run started on the same folder stops at once while the lock of
  a run that died is taken over, by one process only when several try at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from torch import nn
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    get_last_checkpoint,
    rotate_checkpoints,
)

from .errors import CheckpointSaveError, ConfigurationError, OutputDirLockedError, WriteFailedError
from .integrity import (
    damaged,
    first_line,
    has_weights,
    loading_problems,
    model_folder_problems,
    read_json,
    saved_model_problems,
    torch_file_problem,
)

try:
    import fcntl
except ImportError:  # Windows: no flock; the take-over of a stale lock is then not serialised
    fcntl = None
from .utils import unwrap_model

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
LOCK_FILE = ".hf_spectralkd.lock"
MANIFEST_FILE = "checkpoint_manifest.json"
TRAINER_STATE_FILE = "trainer_state.json"
#: Files the Trainer reloads with ``torch.load(weights_only=True)`` on resume (rng_state_<rank>.pth under DDP).
_TORCH_STATE_PATTERN = re.compile(r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth)$")
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: What to do about a damaged checkpoint.
OTHER_CHECKPOINT = ("resume from an earlier checkpoint-* (`hf-spectralkd verify OUTPUT_DIR` lists those that load), or "
                    "copy the checkpoint again")
#: What to do after a failed write of a checkpoint, and of the final student (the run is trained to its end then).
FREE_SPACE = "Free space (or make the file system writable again) and resume with --resume_from_checkpoint true"
FREE_SPACE_FINISHED = ("Free space (or make the file system writable again); the checkpoints are intact "
                       "(`hf-spectralkd verify OUTPUT_DIR`)")
#: What torch.save's C++ zip writer raises (a RuntimeError without the errno) when the disk fills under it: the
#: failed stream write, then the size check at the archive's end (both seen on a full tmpfs with torch 2.x).
_TORCH_WRITE_FAILURES = ("iostream error", "unexpected pos", "file write failed")
#: Below this, a file system counts as full in messages: a write that failed for want of space leaves less than a page.
_FULL_BELOW_BYTES = 1 << 20


# --------------------------------------------------------------------------------------------------
# Atomic checkpoints
# --------------------------------------------------------------------------------------------------
class AtomicCheckpointMixin:
    """``transformers.Trainer`` mixin: atomic ``checkpoint-N`` folders and key-converting reloads."""

    _staging_root: Optional[str] = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """Write ``checkpoint-N`` into the staging folder, flush it, then rename it into place."""
        run_dir = super()._get_output_dir(trial)
        staging_root = os.path.join(run_dir, STAGING_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        failure: Optional[BaseException] = None
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()
        extras = self._checkpoint_extras()  # on every process: it may sum over processes
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                for file_name, payload in extras.items():
                    with open(os.path.join(staged, file_name), "w", encoding="utf-8") as handle:
                        json.dump(payload, handle)
        except Exception as error:  # noqa: BLE001 - a full disk, a lost mount, a quota: report it, keep what is complete
            if write_failure(error, run_dir) is None:
                raise  # a bug keeps its traceback
            failure = error
        finally:
            self._staging_root = None
        # Every process has written its files (DDP: rng_state_<rank>.pth, DeepSpeed: its shards)
        # before the manifest is hashed and the folder renamed.
        self.accelerator.wait_for_everyone()
        if self.args.should_save and failure is None:
            try:
                publish_staged_folder(staged, final)
            except OSError as error:
                failure = error
        self._raise_if_any_write_failed(failure, f"checkpoint: could not write {name}", run_dir, staging_root)
        self.accelerator.wait_for_everyone()
        value = self.state.best_model_checkpoint
        if value and value.startswith(staging_root):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(value))
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _checkpoint_extras(self) -> dict:
        """JSON files (name → payload) added to every checkpoint; computed on every process, so collectives are allowed."""
        return {}

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """``Trainer._save`` (the weights, config and processor); a failed write of the final student is one line.

        Inside a checkpoint (``_staging_root`` set) its failures are left to :meth:`_save_checkpoint`.
        """
        if self._staging_root is not None:
            return super()._save(output_dir, state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        failure: Optional[BaseException] = None
        try:
            super()._save(output_dir, state_dict)
        except Exception as error:  # noqa: BLE001 - see _save_checkpoint
            if write_failure(error, folder) is None:
                raise
            failure = error
        self._raise_if_any_write_failed(failure, "output_dir: could not write the final student", folder)

    def _raise_if_any_write_failed(self, failure: Optional[BaseException], what: str, run_dir: str,
                                   staging_root: Optional[str] = None) -> None:
        """Raise ``<what> in '<run_dir>': <cause>; <last checkpoint>. <remedy>`` on every process if one failed."""
        failed = failure is not None
        if self.accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(float(failed), device=self.args.device)
            failed = bool(self.accelerator.reduce(flag, reduction="sum") > 0)
        if not failed:
            return
        # Asked before the partial copy gives its space back: the file system as the failed write saw it.
        cause = write_failure(failure, run_dir) if failure is not None else "the save failed on another process"
        if self.args.should_save and staging_root is not None:
            shutil.rmtree(staging_root, ignore_errors=True)
        last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
        kept = f"{os.path.basename(last)} is the last complete checkpoint" if last else "no complete checkpoint exists yet"
        checkpoint = staging_root is not None
        error_type, remedy = (CheckpointSaveError, FREE_SPACE) if checkpoint else (WriteFailedError, FREE_SPACE_FINISHED)
        raise error_type(f"{what} in '{run_dir}': {cause}; {kept}. {remedy}") from failure

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not _single_file_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_weights_from_folder(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not _single_file_checkpoint(best):
            return super()._load_best_model()
        logger.info("Loading best model from %s (score: %s).", best, self.state.best_metric)
        load_weights_from_folder(self.model, best, argument="load_best_model_at_end")


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


def _single_file_checkpoint(folder: Optional[str]) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "model.safetensors"))


def load_weights_from_folder(model: nn.Module, folder: str, argument: str = "resume_from_checkpoint") -> None:
    """Copy the weights saved in ``folder`` (``save_pretrained`` layout) into ``model``, strictly.

    Raises :class:`~hf_spectralkd.errors.DamagedFileError` naming ``argument`` if a weights file is
    damaged or lacks tensors: ``from_pretrained`` would re-initialise those and
    ``load_state_dict(strict=True)`` could not tell.
    """
    problems = model_folder_problems(folder)
    if problems:
        raise damaged(argument, folder, problems, OTHER_CHECKPOINT)
    target = unwrap_model(model)
    reloaded, info = type(target).from_pretrained(folder, config=target.config, output_loading_info=True,
                                                  ignore_mismatched_sizes=True)
    problems = loading_problems(info, reloaded)
    if problems:
        raise damaged(argument, folder, problems, OTHER_CHECKPOINT)
    target.load_state_dict(reloaded.state_dict(), strict=True)
    del reloaded


# --------------------------------------------------------------------------------------------------
# Checksum manifest and verification
# --------------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str) -> Path:
    """Write ``checkpoint_manifest.json``: the size and SHA-256 of every other file under ``folder``.

    Hashing is cheap next to the save itself, so every checkpoint gets one: a DeiT-Tiny checkpoint
    with its AdamW state (68.8 MB) hashes in 0.074 s on the 2-core development machine
    (``bench/manifest.py``; SHA-256 runs at about 1 GB/s where the CPU has SHA instructions).
    """
    root = Path(folder)
    files = {
        path.relative_to(root).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST_FILE
    }
    target, staged = root / MANIFEST_FILE, root / f"{MANIFEST_FILE}.tmp"
    staged.write_text(json.dumps({"format": 1, "algorithm": "sha256", "files": files}, indent=1), encoding="utf-8")
    os.replace(staged, target)
    return target


def manifest_problems(folder: Path) -> list[str]:
    """Files of ``folder`` that are missing or differ from its manifest; ``[]`` without a manifest."""
    if not (folder / MANIFEST_FILE).exists():
        return []
    manifest, problem = read_json(folder / MANIFEST_FILE)
    if problem:
        return [problem]
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        return [f"{MANIFEST_FILE} has no valid list of files"]
    problems = []
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != entry.get("size"):
            problems.append(f"{name} has {size:,} bytes, {MANIFEST_FILE} says {entry.get('size')}")
        elif file_sha256(path) != entry.get("sha256"):
            problems.append(f"{name} has changed since it was saved (its SHA-256 differs from {MANIFEST_FILE})")
    return problems


def verify_checkpoint(folder) -> list[str]:
    """Everything that would stop ``folder`` from resuming a run exactly; ``[]`` if it is sound.

    Checks that ``trainer_state.json`` parses, that ``config.json`` and every weights file named by
    the index are whole (:mod:`~hf_spectralkd.integrity`), that the optimizer, scheduler, scaler and
    RNG states load, and that every file matches the checksum manifest (when the checkpoint has one:
    those written before manifests existed are checked for structure only).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder.name} is not a folder"]
    problems = []
    state, problem = read_json(folder / TRAINER_STATE_FILE)
    if problem:
        problems.append(problem)
    elif not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        problems.append(f"{TRAINER_STATE_FILE} has no global_step")
    # DeepSpeed and FSDP keep the model in their own sub-folders, covered by the manifest only.
    sharded_elsewhere = any(p.is_dir() and (p.name.startswith("global_step") or p.name.startswith("pytorch_model_fsdp"))
                            for p in folder.iterdir())
    if has_weights(folder) or not sharded_elsewhere:
        problems += saved_model_problems(folder)
    for path in sorted(folder.iterdir()):
        if _TORCH_STATE_PATTERN.match(path.name):
            problem = torch_file_problem(path)
            if problem:
                problems.append(problem)
    # One problem per file: a truncated file is reported by the structural check above, not again
    # as a size that differs from the manifest.
    reported = {problem.split(" ", 1)[0] for problem in problems}
    problems += [p for p in manifest_problems(folder) if p.split(" ", 1)[0] not in reported]
    return problems


def checkpoint_folders(output_dir) -> list[Path]:
    """The ``checkpoint-N`` folders of a run, oldest first (by N, as the Trainer orders them)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether ``folder`` is itself a ``checkpoint-N`` (by its name, or by the manifest only checkpoints have)."""
    return bool(_CHECKPOINT_PATTERN.match(folder.name)) or (folder / MANIFEST_FILE).is_file()


def newest_verified_checkpoint(output_dir: str, argument: str = "resume_from_checkpoint") -> str:
    """The newest ``checkpoint-N`` of ``output_dir`` that :func:`verify_checkpoint` accepts.

    Each newer, damaged checkpoint is skipped with a warning; the run then trains the skipped steps
    again, exactly as the first time (resume is exact from any checkpoint). Raises
    :class:`~hf_spectralkd.errors.ConfigurationError` when there is no checkpoint, and
    :class:`~hf_spectralkd.errors.DamagedFileError` listing each one's problems when none verifies.
    """
    candidates = checkpoint_folders(output_dir)
    if not candidates:
        raise ConfigurationError(f"{argument}: no checkpoint-* folder in '{output_dir}' to resume from")
    rejected: list[str] = []
    for folder in reversed(candidates):
        problems = verify_checkpoint(folder)
        if not problems:
            if rejected:
                logger.warning("resuming from %s, the newest checkpoint of '%s' that verifies; the steps after it are "
                               "trained again", folder.name, output_dir)
            return str(folder)
        rejected.append(f"{folder.name}: {'; '.join(problems)}")
        logger.warning("%s in '%s' is damaged (%s); skipping it and trying the checkpoint before it",
                       folder.name, output_dir, "; ".join(problems))
    raise damaged(argument, output_dir, [" | ".join(rejected)],
                  "no checkpoint can be resumed; copy them again, or start over with --overwrite_output_dir true")


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


# --------------------------------------------------------------------------------------------------
# One run per output folder
# --------------------------------------------------------------------------------------------------
class OutputDirLock:
    """An exclusive, self-expiring lock on a run folder.

    The lock file records ``{"pid", "host", "started", "heartbeat"}``; a daemon thread rewrites the
    heartbeat every ``heartbeat_s`` seconds. A lock is stale, and is taken over with a warning, when
    its owner is a dead process on this host, or when its heartbeat is older than ``stale_after_s``
    (an owner on another host that stopped without cleaning up).

    Judging a lock and replacing it happen under an ``flock`` of the run folder (:func:`_one_at_a_time`):
    without it, two processes that both judged the same lock stale could each remove what the other
    had just created and both go on (two or three of 6 processes held one lock in 6 of 100 rounds,
    ``tests/test_faults.py``). A lock file that cannot be written (a full disk) is removed again, so no
    empty lock is left to block the folder.

    Use as a context manager or call :meth:`acquire` / :meth:`release`. Re-entrant within a process
    (the recipe holds it, then ``Trainer.train`` asks again).
    """

    def __init__(self, output_dir: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.path = Path(output_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._held = False
        self._created = False  # this instance wrote the file (a re-entrant holder must not delete it)

    def _record(self) -> dict:
        now = time.time()
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": now, "heartbeat": now}

    def _read(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half written: judged by its age below

    def _is_stale(self, owner: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            return not _process_alive(owner["pid"])
        return age > self.stale_after_s

    def acquire(self) -> "OutputDirLock":
        if self._held:
            return self
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _one_at_a_time(self.path.parent):
                self._take()
        except OSError as error:  # a full disk or a read-only mount, before the run has written anything
            raise WriteFailedError(f"output_dir: cannot write the run's lock file in '{self.path.parent}': {error}; "
                                   "free space or choose another --output_dir") from error
        if self._created:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="output-dir-lock", daemon=True)
            self._thread.start()
        return self

    def _take(self) -> None:
        """Create the lock file, or take over a stale one; only one process at a time runs this."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue  # released meanwhile
                if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                    self._held = True  # this process already holds it (recipe, then Trainer.train)
                    return
                if not self._is_stale(owner):
                    raise OutputDirLockedError(
                        f"output_dir: '{self.path.parent}' is in use by another run (pid {owner.get('pid')} on "
                        f"{owner.get('host')}); wait for it to finish or choose another --output_dir"
                    ) from None
                logger.warning("taking over the stale lock of a run that is gone (pid %s on %s) in %s",
                               owner.get("pid"), owner.get("host"), self.path.parent)
                self.path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(self._record(), handle)
            except BaseException:
                self.path.unlink(missing_ok=True)  # an empty lock would block the folder for stale_after_s
                raise
            self._held = self._created = True
            return
        raise OutputDirLockedError(f"output_dir: could not lock '{self.path.parent}' (the lock file keeps changing)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if not self._created:
            return
        self._created = False
        self._stop.set()
        owner = self._read()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                self.path.unlink(missing_ok=True)
            except OSError as error:  # a read-only remount: the run's own error must not be buried under this one
                logger.warning("could not remove the lock file %s (%s); the next run takes it over, its process being "
                               "gone", self.path, error.strerror or error)

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def _one_at_a_time(folder: Path):
    """Hold an exclusive ``flock`` on ``folder`` itself for the block (released by the kernel if the process dies).

    Where the file system refuses it (NFS refuses an flock on a folder, as do some FUSE mounts), the
    block runs unserialised, as before: a stale lock is then rarely taken over by two processes at once.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None and fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as error:
                logger.debug("no flock on %s (%s): the lock is taken without it", folder, error)
        yield
    finally:
        if fd is not None:
            os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def acquire_run_lock(accelerator, output_dir: str) -> Optional[OutputDirLock]:
    """Lock ``output_dir`` on the main process; every process raises if another run holds it.

    Returns the lock (main process) or ``None`` (other processes); release it when the run ends.
    """
    lock, failure = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputDirLock(output_dir).acquire()
        except (OutputDirLockedError, WriteFailedError) as error:
            failure = error
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [(type(failure), str(failure)) if failure is not None else None]
        broadcast_object_list(shared, from_process=0)
        if shared[0] is not None:
            error_type, message = shared[0]
            failure = failure or error_type(message)
    if failure is not None:
        raise failure
    return lock
