"""The lock of an S3 lake: a lease object written with S3 conditional writes.

S3 has no ``flock`` and no rename, but it has conditional writes: a PUT with
``If-None-Match: *`` succeeds only if the key does not exist, and a PUT (or
DELETE) with ``If-Match: <etag>`` only if the object is still the one that
was read. ``<lake>/_keyturn/lock`` holds one JSON document::

    {"format": 1, "lake": "s3://...", "holders": [
        {"token": "<uuid>", "owner": "reencrypt ...", "mode": "exclusive" | "shared",
         "pid": 123, "host": "worker-1", "since": 1700000000.0, "expires": 1700000120.0}]}

Every change is a read-modify-write guarded by the ETag that was read
(compare-and-swap), so two jobs can never both believe they changed the
same version of the document; the loser re-reads and decides again.

- acquire: read; drop holders whose lease expired (a crashed job's lease is
  taken over once it expires, and the takeover is reported in
  `taken_over`); refuse at once (`LakeLockedError`, naming the holder) if a
  live holder conflicts (any holder for an exclusive request, an exclusive
  holder for a shared one); else add this holder (create with
  ``If-None-Match: *``, or replace with ``If-Match``).
- renew: a daemon thread extends this holder's expiry every `renew_every`
  seconds (default a third of the lease) while the job runs. If the entry
  is gone (the lease expired unrenewed and another job took over), the
  lock is *lost*: `release()` then raises `LakeLockLostError`, so the job
  does not report success.
- release: remove this holder; the last one out deletes the object
  (conditional DELETE; where a store refuses conditional deletes, an empty
  document is left, which means "unlocked").

Expiry compares holders' wall clocks: keep hosts NTP-synchronised, well
within the lease (default 120 s). A job paused for longer than its lease
(a stopped VM) can overlap the job that took over; the renewal thread
notices when it resumes, but S3 offers no fencing of the job's other
writes. Arrow's filesystem API has no conditional put, so this uses boto3.
"""

from __future__ import annotations

import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from keyturn.errors import LakeError, LakeLockedError, LakeLockLostError
from keyturn.lake.s3 import S3Settings, s3_client, settings_of_filesystem, split_bucket_key

if TYPE_CHECKING:  # a lease is taken on a Lake (`Lake.lock()` builds it); the layout sits above the lock
    from keyturn.lake.layout import Lake

__all__ = ["S3LeaseLock", "DEFAULT_LEASE_SECONDS", "LOCK_FORMAT"]

DEFAULT_LEASE_SECONDS = 120.0
LOCK_FORMAT = 1
_CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"})


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "") or "")


def _when(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def describe_holder(holder: dict[str, Any]) -> str:
    return (
        f"{holder.get('owner', '?')}, {holder.get('mode', '?')}, pid {holder.get('pid', '?')} on "
        f"{holder.get('host', '?')}, lease until {_when(float(holder.get('expires', 0)))}"
    )


class S3LeaseLock:
    """Context manager holding the lease lock of an S3 lake (exclusive or shared) for one job."""

    def __init__(
        self,
        lake: Lake,
        *,
        exclusive: bool = True,
        owner: str = "keyturn",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        renew_every: float | None = None,
        clock: Callable[[], float] = time.time,
        client: Any = None,
        max_conflicts: int = 50,
    ) -> None:
        if not lake.is_s3:
            raise LakeError(f"S3LeaseLock needs an S3 lake, not {lake.uri}")
        if not lease_seconds > 0:
            raise ValueError("lease_seconds must be > 0")
        self.lake = lake
        self.exclusive = exclusive
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self.renew_every = float(renew_every) if renew_every is not None else self.lease_seconds / 3
        if not 0 < self.renew_every < self.lease_seconds:
            raise ValueError("renew_every must be > 0 and shorter than the lease")
        self.clock = clock
        self.max_conflicts = max_conflicts
        self.path = lake.keyturn_path("lock")
        self.bucket, self.key = split_bucket_key(self.path)
        if client is None:
            found = settings_of_filesystem(lake.fs)
            settings, creds = found if found is not None else (lake.s3 or S3Settings(), {})
            client = s3_client(lake.s3 or settings, creds)
        self._client = client
        self._token: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self.taken_over: list[dict[str, Any]] = []
        """Expired holders this acquisition removed (crashed or stalled jobs)."""
        self.renewals = 0
        """Successful renewals so far."""

    def __repr__(self) -> str:
        return f"S3LeaseLock({self.lake.uri!r}, {'exclusive' if self.exclusive else 'shared'}, held={self.held})"

    # ------------------------------------------------------------------ S3 document

    def _read(self) -> tuple[str | None, dict[str, Any] | None]:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key)
            body = response["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None, None
            raise LakeError(f"cannot read the lake lock s3://{self.path} ({_code(exc) or 'error'})") from exc
        except BotoCoreError as exc:
            raise LakeError(f"cannot read the lake lock s3://{self.path} ({type(exc).__name__})") from exc
        try:
            doc = json.loads(body or b"{}")
            holders = doc.get("holders", [])
            if not isinstance(holders, list) or not all(isinstance(h, dict) and "token" in h and "expires" in h for h in holders):
                raise ValueError("bad holders")
        except (ValueError, AttributeError, TypeError):
            raise LakeError(
                f"the lake lock s3://{self.path} is not a keyturn lease document; "
                "if no keyturn job is running, delete that object"
            ) from None
        return response.get("ETag"), {"format": LOCK_FORMAT, "lake": self.lake.uri, "holders": holders}

    def _write(self, doc: dict[str, Any], etag: str | None) -> bool:
        """Conditional PUT; True if it took, False if the object changed since it was read."""
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=self.key,
                Body=json.dumps(doc, sort_keys=True).encode(),
                ContentType="application/json",
                **condition,
            )
        except ClientError as exc:
            if _code(exc) in _CONFLICT_CODES:
                return False
            raise LakeError(f"cannot write the lake lock s3://{self.path} ({_code(exc) or 'error'})") from exc
        except BotoCoreError as exc:
            raise LakeError(f"cannot write the lake lock s3://{self.path} ({type(exc).__name__})") from exc
        return True

    def _delete(self, etag: str, doc: dict[str, Any]) -> bool:
        """Conditional DELETE of an emptied lock; an empty document where conditional deletes are refused."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except ClientError as exc:
            if _code(exc) in _CONFLICT_CODES:
                return False
            return self._write({**doc, "holders": []}, etag)
        except BotoCoreError as exc:
            raise LakeError(f"cannot release the lake lock s3://{self.path} ({type(exc).__name__})") from exc
        return True

    def _update(self, change: Callable[[str | None, dict[str, Any] | None], dict[str, Any] | None]) -> None:
        """Read-modify-write under the ETag until it takes; `change` returns the new document or None (no write)."""
        for attempt in range(self.max_conflicts + 1):
            etag, doc = self._read()
            new = change(etag, doc)
            if new is None:
                return
            if etag is not None and not new["holders"]:
                done = self._delete(etag, new)
            else:
                done = self._write(new, etag)
            if done:
                return
            time.sleep(random.uniform(0.005, 0.05) * min(attempt + 1, 8))
        raise LakeLockedError(f"the lake {self.lake.uri} lock is changing too fast to take (contention); try again")

    # ------------------------------------------------------------------ the lock

    def acquire(self) -> S3LeaseLock:
        if self._token is not None:
            raise RuntimeError("lake lock already held by this object")
        token = uuid.uuid4().hex
        mode = "exclusive" if self.exclusive else "shared"

        def take(etag: str | None, doc: dict[str, Any] | None) -> dict[str, Any]:
            now = self.clock()
            holders = doc["holders"] if doc else []
            live = [h for h in holders if float(h["expires"]) > now]
            self.taken_over = [h for h in holders if float(h["expires"]) <= now]
            blocking = live if self.exclusive else [h for h in live if h.get("mode") != "shared"]
            if blocking:
                raise LakeLockedError(
                    f"the lake {self.lake.uri} is locked by another keyturn job ({describe_holder(blocking[0])})"
                )
            me = {"token": token, "owner": self.owner, "mode": mode, "pid": os.getpid(),
                  "host": socket.gethostname(), "since": now, "expires": now + self.lease_seconds}
            return {"format": LOCK_FORMAT, "lake": self.lake.uri, "holders": live + [me]}

        self._update(take)
        self._token, self._lost = token, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="keyturn-lake-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Extend this holder's lease by `lease_seconds` from now; `LakeLockLostError` if it was taken over."""
        with self._mutex:
            token = self._token
            if token is None:
                raise RuntimeError("the lake lock is not held")
            if self._lost is not None:
                raise LakeLockLostError(self._lost)

            def extend(etag: str | None, doc: dict[str, Any] | None) -> dict[str, Any]:
                holders = doc["holders"] if doc else []
                if not any(h["token"] == token for h in holders):
                    self._lost = (
                        f"the lease on the lake lock of {self.lake.uri} was lost while this job ran "
                        "(it expired unrenewed and another job took the lake over); check the lake with "
                        "`keyturn status` and run the job again"
                    )
                    raise LakeLockLostError(self._lost)
                now = self.clock()
                mine = [{**h, "expires": now + self.lease_seconds} if h["token"] == token else h for h in holders]
                return {**doc, "holders": mine}  # type: ignore[dict-item]

            self._update(extend)
            self.renewals += 1

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                self.renew()
            except LakeLockLostError:
                return
            except (LakeError, RuntimeError):
                continue  # S3 unreachable for now: try again; the lease still runs

    def release(self) -> None:
        """Remove this holder (the last one deletes the object); `LakeLockLostError` if the lease was lost."""
        if self._token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            token, self._token = self._token, None
            lost = self._lost

            def drop(etag: str | None, doc: dict[str, Any] | None) -> dict[str, Any] | None:
                nonlocal lost
                holders = doc["holders"] if doc else []
                if not any(h["token"] == token for h in holders):
                    lost = lost or (
                        f"the lease on the lake lock of {self.lake.uri} was lost while this job ran "
                        "(another job took the lake over); check the lake with `keyturn status` and run the job again"
                    )
                    return None
                now = self.clock()
                rest = [h for h in holders if h["token"] != token and float(h["expires"]) > now]
                return {**doc, "holders": rest}  # type: ignore[dict-item]

            self._update(drop)
        if lost is not None:
            raise LakeLockLostError(lost)

    @property
    def held(self) -> bool:
        return self._token is not None

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def holders(self) -> list[dict[str, Any]]:
        """The holders in the lock object now (live or not), for status displays and tests."""
        _, doc = self._read()
        return list(doc["holders"]) if doc else []

    def __enter__(self) -> S3LeaseLock:
        return self.acquire()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            self.release()
        except LakeLockLostError:
            if exc_type is None:
                raise
