"""The lake lock: one rewriting job at a time, and no rewrite under a running writer.

``<lake>/_keyturn/lock`` is locked with ``flock``: a job that replaces
existing files (reencrypt) takes it exclusively; jobs that only add new
files (encrypt, ingest) may take it shared, so they run side by side but
never while a rewrite (and its temp-file cleanup) runs. The lock is never
waited for: a second job fails at once with `LakeLockedError`, naming the
holder recorded in the file. The kernel drops the lock when its process
dies, so a crashed job never leaves the lake locked.

Only local lakes are supported for now; an object store needs a
conditional-write lock and comes with the S3 backend.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from keyturn.errors import LakeError, LakeLockedError
from keyturn.lake.layout import Lake

__all__ = ["LakeLock"]


class LakeLock:
    """Context manager holding the lake lock (exclusive or shared) for one job."""

    def __init__(self, lake: Lake, *, exclusive: bool = True, owner: str = "keyturn") -> None:
        if not lake.is_local:
            raise LakeError("the lake lock supports local lakes only for now")
        self.lake = lake
        self.exclusive = exclusive
        self.owner = owner
        self.path = lake.keyturn_path("lock")
        self._fd: int | None = None

    def acquire(self) -> LakeLock:
        if self._fd is not None:
            raise RuntimeError("lake lock already held by this object")
        lake_dir = self.lake.root
        if not os.path.isdir(lake_dir):
            raise LakeError(f"no lake at {self.lake.uri}: the directory does not exist")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LakeLockedError(f"the lake {self.lake.uri} is locked by another keyturn job{holder}") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self.exclusive:  # a shared holder must not overwrite the others' note
            note = json.dumps(
                {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            ).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> LakeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        note = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f" ({note['owner']}, pid {note['pid']} on {note['host']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""
