"""The lake lock: one rewriting job at a time, and no rewrite under a running writer.

A job that replaces existing files (reencrypt) takes the lock exclusively;
jobs that only add new files or read (encrypt, ingest, decrypt) take it
shared, so they run side by side but never while a rewrite (and its
temp-file cleanup) runs. The lock is never waited for: a second job fails
at once with `LakeLockedError`, naming the holder.

- Local lakes (`LakeLock`): ``<lake>/_keyturn/lock`` is locked with
  ``flock``. The kernel drops the lock when its process dies, so a crashed
  job never leaves the lake locked.
- S3 lakes (`keyturn.lake.s3lock.S3LeaseLock`): a lease object at the same
  key, written with S3 conditional writes (``If-None-Match: *`` to create,
  ``If-Match: <etag>`` to change), holding each holder's owner, mode and
  expiry; renewed while the job runs; an expired lease is taken over.

`open_lock(lake, ...)` picks the right one; other filesystems are refused
(`LakeError`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

from keyturn.errors import LakeError, LakeLockedError
from keyturn.lake.layout import Lake

__all__ = ["LakeLock", "open_lock"]


def open_lock(lake: Lake, *, exclusive: bool = True, owner: str = "keyturn", **options: Any) -> Any:
    """The lock for `lake`: `LakeLock` (local, flock) or `S3LeaseLock` (S3; `options` go to it)."""
    if lake.is_local:
        if options:
            raise TypeError(f"the local lake lock takes no options ({', '.join(sorted(options))})")
        return LakeLock(lake, exclusive=exclusive, owner=owner)
    if lake.is_s3:
        from keyturn.lake.s3lock import S3LeaseLock

        return S3LeaseLock(lake, exclusive=exclusive, owner=owner, **options)
    raise LakeError(f"the lake lock supports local and S3 lakes, not {type(lake.fs).__name__} ({lake.uri})")


class LakeLock:
    """Context manager holding the lock of a local lake (exclusive or shared) for one job."""

    def __init__(self, lake: Lake, *, exclusive: bool = True, owner: str = "keyturn") -> None:
        if not lake.is_local:
            raise LakeError("LakeLock is the local lake lock; use lake.lock() for an S3 lake")
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
