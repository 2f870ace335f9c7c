"""One run per output folder: a lock file holding the owner's pid and host, kept fresh by a heartbeat.

A second run started on the same folder stops at once, while the lock of a run that died is taken
over (:class:`OutputDirLock`), by one process only when several try at once. :func:`acquire_run_lock`
takes it on the main process and gives every process the same answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import OutputDirLockedError, WriteFailedError

try:
    import fcntl
except ImportError:  # Windows: no flock; the take-over of a stale lock is then not serialised
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_FILE = ".hf_spectralkd.lock"


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
    empty lock is left to block the folder; :meth:`release` never raises.

    Use as a context manager or call :meth:`acquire` / :meth:`release`. Not re-entrant: a run takes its
    folder's lock once (``SpectralDistillationTrainer.holding_output_dir``), a second holder in the same process is
    refused like any other run, and a second :meth:`acquire` of the same object raises ``RuntimeError``.
    """

    def __init__(self, output_dir: str, heartbeat_s: float = 30.0, stale_after_s: float = 300.0):
        self.path = Path(output_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._held = False

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
        if self._held:  # a second take by the same holder is a bug in the caller, never a second run to let through
            raise RuntimeError(f"OutputDirLock: the lock on '{self.path.parent}' is already held by this object; "
                               "it is not re-entrant (release it first, or hold it once for the whole run)")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _one_at_a_time(self.path.parent):
                self._take()
        except OSError as error:  # a full disk or a read-only mount, before the run has written anything
            raise WriteFailedError(f"output_dir: cannot write the run's lock file in '{self.path.parent}': {error}; "
                                   "free space or choose another --output_dir") from error
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
            self._held = True
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
