"""The lake lock: one rewriting job at a time, and no rewrite under a running writer.

A job that replaces existing files (reencrypt) takes the lock exclusively;
jobs that only add new files or read (encrypt, ingest, decrypt) take it
shared, so they run side by side but never while a rewrite (and its
temp-file cleanup) runs. The lock is never waited for: a second job fails
at once with `LakeLockedError`, naming the holder.

- Local lakes (`LakeLock`): ``<lake>/_keyturn/lock`` holds one JSON
  document listing the holders, each with its owner, mode, pid, host, the
  process's start time (``/proc/<pid>/stat``), the host's boot id and PID
  namespace. Every change is a read-modify-write under a brief ``flock``
  of that file (held for microseconds, never for the job), so a process
  that inherits the descriptor (a forked Beam worker) cannot keep the lake
  locked after its job ended. A holder whose process is gone is taken over
  at the next acquisition, with a note (`taken_over`, a log warning, and a
  ``took_over`` field in the new holder's entry): on the same host (same
  boot id and PID namespace) a holder is gone when its pid is not alive, is
  a zombie, or now belongs to a process that started at another time (the
  pid was reused), and every holder is gone once the host has rebooted
  (another boot id). A holder on another host or PID namespace cannot be
  checked and counts as live; the error names it and the file to remove if
  that job is gone. An unreadable document (a crash mid-write by a holder,
  or a lock file of an older keyturn that is no longer flock-held) holds no
  one.
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
import logging
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from keyturn.errors import LakeError, LakeLockedError
from keyturn.lake.s3lock import S3LeaseLock

if TYPE_CHECKING:  # a lock is taken on a Lake (`Lake.lock()` builds it); the layout sits above the lock
    from keyturn.lake.layout import Lake

__all__ = ["LakeLock", "open_lock", "LOCK_FORMAT", "holder_state"]

LOCK_FORMAT = 1
_MUTEX_WAIT_SECONDS = 5.0  # the flock guards a read-modify-write of a few hundred bytes
_log = logging.getLogger(__name__)


def open_lock(lake: Lake, *, exclusive: bool = True, owner: str = "keyturn", **options: Any) -> Any:
    """The lock for `lake`: `LakeLock` (local) or `S3LeaseLock` (S3; `options` go to it)."""
    if lake.is_local:
        if options:
            raise TypeError(f"the local lake lock takes no options ({', '.join(sorted(options))})")
        return LakeLock(lake, exclusive=exclusive, owner=owner)
    if lake.is_s3:
        return S3LeaseLock(lake, exclusive=exclusive, owner=owner, **options)
    raise LakeError(f"the lake lock supports local and S3 lakes, not {type(lake.fs).__name__} ({lake.uri})")


# ------------------------------------------------------------------ who is alive


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _boot_id() -> str | None:
    text = _read_text("/proc/sys/kernel/random/boot_id")
    return (text.strip() or None) if text is not None else None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of `pid` from /proc, or None if unavailable."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def _process_start(pid: int) -> str | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def process_identity() -> dict[str, Any]:
    """This process as a lock holder (or a staged run's owner) records it; `holder_state` reads it back."""
    pid = os.getpid()
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid_ns": _pid_namespace(),
        "start": _process_start(pid),
    }


def holder_state(holder: dict[str, Any], here: dict[str, Any] | None = None) -> str:
    """``alive``, ``gone`` (with certainty) or ``unknown`` (another host or PID namespace) for one holder entry."""
    here = here or process_identity()
    pid = holder.get("pid")
    if holder.get("host") != here["host"] or isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return "unknown"
    if holder.get("boot_id") and here["boot_id"] and holder["boot_id"] != here["boot_id"]:
        return "gone"  # the host rebooted since: every process of that boot is gone
    if holder.get("pid_ns") and here["pid_ns"] and holder["pid_ns"] != here["pid_ns"]:
        return "unknown"  # another container on this host: its pids are not ours to check
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass  # alive, someone else's
    except OSError:
        return "unknown"
    stat = _proc_stat(pid)
    if stat is None:
        return "alive"  # no /proc: a live pid is all we can tell
    state, start = stat
    if state in ("Z", "X"):
        return "gone"  # exited, not yet reaped
    if holder.get("start") and start != holder["start"]:
        return "gone"  # the pid now belongs to another process
    return "alive"


def _when(epoch: object) -> str:
    try:
        return datetime.fromtimestamp(float(epoch), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def describe_holder(holder: dict[str, Any]) -> str:
    return (
        f"{holder.get('owner', '?')}, {holder.get('mode', '?')}, pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, since {_when(holder.get('since'))}"
    )


def _parse_holders(raw: bytes) -> list[dict[str, Any]] | None:
    """The holders of a lock document; None if it is not one (empty, damaged, or an older keyturn's note)."""
    text = raw.decode("utf-8", errors="replace").strip("\x00 \t\r\n")
    if not text:
        return []
    try:
        doc, _end = json.JSONDecoder().raw_decode(text)  # bytes after the document: a shorter rewrite, not yet truncated
    except ValueError:
        return None
    holders = doc.get("holders") if isinstance(doc, dict) else None
    if not isinstance(holders, list) or not all(isinstance(h, dict) and isinstance(h.get("token"), str) for h in holders):
        return None
    return holders


# ------------------------------------------------------------------ the lock


class LakeLock:
    """Context manager holding the lock of a local lake (exclusive or shared) for one job."""

    def __init__(self, lake: Lake, *, exclusive: bool = True, owner: str = "keyturn") -> None:
        if not lake.is_local:
            raise LakeError("LakeLock is the local lake lock; use lake.lock() for an S3 lake")
        self.lake = lake
        self.exclusive = exclusive
        self.owner = owner
        self.path = lake.keyturn_path("lock")
        self._token: str | None = None
        self.taken_over: list[dict[str, Any]] = []
        """Holders this acquisition removed because their process was gone (finished or crashed jobs)."""

    def __repr__(self) -> str:
        return f"LakeLock({self.lake.uri!r}, {'exclusive' if self.exclusive else 'shared'}, held={self.held})"

    def _update(self, change: Any) -> Any:
        """Run `change(holders) -> (new holders or None, result)` under the file's flock; write if asked."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + _MUTEX_WAIT_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:  # held for a whole job: an older keyturn's lock
                        raise LakeLockedError(
                            f"the lake {self.lake.uri} is locked by another keyturn job (it holds {self.path} "
                            "locked; an older keyturn version?)"
                        ) from None
                    time.sleep(0.01)
            size = os.fstat(fd).st_size
            holders = _parse_holders(os.pread(fd, max(size, 1), 0)) if size else []
            new, result = change(holders)
            if new is not None:
                doc = json.dumps({"format": LOCK_FORMAT, "holders": new}, sort_keys=True).encode() + b"\n"
                os.pwrite(fd, doc, 0)  # a crash here leaves the new document plus old bytes: raw_decode reads it
                os.ftruncate(fd, len(doc))
                os.fsync(fd)
            return result
        finally:
            os.close(fd)  # releases the flock

    def acquire(self) -> LakeLock:
        if self._token is not None:
            raise RuntimeError("lake lock already held by this object")
        if not os.path.isdir(self.lake.root):
            raise LakeError(f"no lake at {self.lake.uri}: the directory does not exist")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        token = uuid.uuid4().hex
        here = process_identity()

        def take(holders: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], None]:
            gone: list[dict[str, Any]] = []
            live: list[dict[str, Any]] = []
            for h in holders or []:
                (gone if holder_state(h, here) == "gone" else live).append(h)
            blocking = live if self.exclusive else [h for h in live if h.get("mode") != "shared"]
            if blocking:
                first = blocking[0]
                hint = "" if holder_state(first, here) == "alive" else (
                    f"; it runs elsewhere, so keyturn cannot tell whether it is still alive: if it is gone, delete {self.path}"
                )
                raise LakeLockedError(f"the lake {self.lake.uri} is locked by another keyturn job ({describe_holder(first)}){hint}")
            self.taken_over = gone
            me = {
                "token": token,
                "owner": self.owner,
                "mode": "exclusive" if self.exclusive else "shared",
                "since": time.time(),
                **here,
            }
            if gone:
                me["took_over"] = [describe_holder(h) for h in gone]
            return live + [me], None

        self._update(take)
        self._token = token
        for h in self.taken_over:
            _log.warning("lake %s: took over the lock of a keyturn job that is gone (%s)", self.lake.uri, describe_holder(h))
        return self

    def release(self) -> None:
        if self._token is None:
            return
        token, self._token = self._token, None

        def drop(holders: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]] | None, None]:
            rest = [h for h in holders or [] if h.get("token") != token]
            return (rest if holders is None or len(rest) != len(holders) else None), None

        try:
            self._update(drop)
        except FileNotFoundError:  # the lake (or its _keyturn directory) was removed meanwhile: nothing to release
            pass

    @property
    def held(self) -> bool:
        return self._token is not None

    def __enter__(self) -> LakeLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
