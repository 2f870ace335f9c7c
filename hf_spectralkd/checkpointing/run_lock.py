"""One run per output folder: a lock file holding the owner's pid and host, kept fresh by a heartbeat.

A second run started on the same folder stops at once, while the lock of a run that died is taken
over (:class:`OutputDirLock`). :func:`acquire_run_lock` takes it on the main process and gives every
process the same answer.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import OutputDirLockedError

logger = logging.getLogger(__name__)

LOCK_FILE = ".hf_spectralkd.lock"


class OutputDirLock:
    """An exclusive, self-expiring lock on a run folder.

    The lock file records ``{"pid", "host", "started", "heartbeat"}``; a daemon thread rewrites the
    heartbeat every ``heartbeat_s`` seconds. A lock is stale, and is taken over with a warning, when
    its owner is a dead process on this host, or when its heartbeat is older than ``stale_after_s``
    (an owner on another host that stopped without cleaning up).

    Use as a context manager or call :meth:`acquire` / :meth:`release`. Not re-entrant: a run takes its
    folder's lock once (``SpectralDistillationTrainer.train``), and a second holder in the same process is
    refused like any other run.
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
        if self._held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(self._record(), handle)
            self._held = True
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name="output-dir-lock", daemon=True)
            self._thread.start()
            return self
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
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


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
    lock, message = None, ""
    if accelerator.is_main_process:
        try:
            lock = OutputDirLock(output_dir).acquire()
        except OutputDirLockedError as error:
            message = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        shared = [message]
        broadcast_object_list(shared, from_process=0)
        message = shared[0]
    if message:
        raise OutputDirLockedError(message)
    return lock
