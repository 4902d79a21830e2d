"""`CloudWatchAuditSink`: audit events to CloudWatch Logs (config ``audit.sink: cloudwatch``).

Each `AuditEvent` becomes one log event whose message is the canonical JSON
of `AuditEvent.to_dict()` (sorted keys, no spaces) and whose timestamp is
the time it was appended (the sink's clock; the event's own ``at`` is in
the message), so replayed old events are not refused as too old. Audit events hold names, counts, versions and request
ids only, never key material; the sink accepts nothing else (a dict is
parsed with `AuditEvent.from_dict`, which refuses unknown fields).

Contracts:

- `append` buffers; the buffer is sent when it reaches `max_batch_events`
  events or would pass the PutLogEvents size limit (1 MiB, counting 26
  bytes per event), and on `flush()` / `close()` / leaving a ``with`` block.
  Events in one call are sorted by timestamp, as CloudWatch requires.
- The log group and stream are created on first use if missing (an
  existing one is fine), and again if a put finds them gone.
- Throttling, 5xx and connection errors are retried by botocore's standard
  mode. After that `AuditSinkError` is raised and the unsent events stay
  buffered, so a later `flush()` can retry them. If CloudWatch accepts a
  batch but rejects some of its events (a clock far off), the batch leaves
  the buffer and `AuditSinkError` names the rejected range. A retried put
  may deliver a batch twice; event ids are deterministic, so consumers drop
  duplicates by id.
- Thread-safe. Not picklable (it holds a client); build it where it is used.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from botocore.exceptions import BotoCoreError, ClientError

from keyturn.audit.events import AuditEvent
from keyturn.aws.clients import ClientOwner, ClientSettings, error_code, make_client
from keyturn.errors import AuditSinkError, ConfigError

if TYPE_CHECKING:
    from keyturn.config import KeyturnConfig

__all__ = ["CloudWatchAuditSink", "DEFAULT_LOG_STREAM", "MAX_BATCH_BYTES", "MAX_BATCH_EVENTS", "MAX_EVENT_BYTES", "event_message"]

DEFAULT_LOG_STREAM = "keyturn-audit"
MAX_BATCH_EVENTS = 10_000
MAX_BATCH_BYTES = 1_048_576
EVENT_OVERHEAD_BYTES = 26
MAX_EVENT_BYTES = 256 * 1024 - EVENT_OVERHEAD_BYTES


def event_message(event: AuditEvent) -> str:
    """The log message for `event`: canonical JSON of its `to_dict()`."""
    return json.dumps(event.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class CloudWatchAuditSink(ClientOwner):
    """Buffers `AuditEvent`s and writes them to one CloudWatch Logs stream in batches."""

    def __init__(
        self,
        log_group: str,
        log_stream: str | None = None,
        *,
        client: Any = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_batch_events: int = 500,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Write to `log_group`/`log_stream` (default ``keyturn-audit``) via the injected `client` or a new one.

        `clock` returns seconds since the epoch (the log event timestamps).
        """
        if not isinstance(log_group, str) or not log_group:
            raise ValueError("log_group must be a non-empty str")
        stream = DEFAULT_LOG_STREAM if log_stream is None else log_stream
        if not isinstance(stream, str) or not stream or ":" in stream or "*" in stream:
            raise ValueError("log_stream must be a non-empty str without ':' or '*'")
        if isinstance(max_batch_events, bool) or not isinstance(max_batch_events, int) or not 1 <= max_batch_events <= MAX_BATCH_EVENTS:
            raise ValueError(f"max_batch_events must be an int in 1..{MAX_BATCH_EVENTS}")
        if client is not None and (region is not None or endpoint_url is not None):
            raise ValueError("give an injected client or region/endpoint_url, not both")
        self.log_group = log_group
        self.log_stream = stream
        if client is None:
            client = make_client("logs", ClientSettings(region, endpoint_url, max_attempts, connect_timeout, read_timeout))
            self._owns_client = True
        else:
            self._owns_client = False
        self._client = client
        self._max_batch_events = max_batch_events
        self._clock = clock
        self._lock = threading.RLock()
        self._buffer: list[tuple[int, str]] = []
        self._buffer_bytes = 0
        self._ready = False
        self._closed = False
        self.sent = 0
        """Events delivered so far."""
        self.put_calls = 0
        """Successful PutLogEvents calls so far."""

    @classmethod
    def from_config(cls, cfg: KeyturnConfig, **kwargs: Any) -> CloudWatchAuditSink:
        """The sink a config with ``audit.sink: cloudwatch`` describes (region from ``key_hierarchy.cmk.region``).

        The endpoint is botocore's (``AWS_ENDPOINT_URL_CLOUDWATCH_LOGS`` /
        ``AWS_ENDPOINT_URL`` are honoured); `kwargs` go to the constructor.
        `ConfigError` for another sink.
        """
        audit = cfg.audit
        if audit.sink != "cloudwatch" or audit.log_group is None:
            raise ConfigError("audit.sink", f"is {audit.sink!r}; a CloudWatchAuditSink needs 'cloudwatch' and a log_group")
        if "client" not in kwargs:
            kwargs.setdefault("region", cfg.key_hierarchy.cmk.region)
        return cls(audit.log_group, audit.log_stream, **kwargs)

    # ------------------------------------------------------------------ public

    def append(self, event: AuditEvent | Mapping[str, Any]) -> None:
        """Buffer one event (an `AuditEvent`, or its dict form); sends a batch when the buffer is full.

        If that send fails, `AuditSinkError` is raised and this event stays
        buffered with the others.
        """
        if not isinstance(event, AuditEvent):
            if not isinstance(event, Mapping):
                raise TypeError(f"CloudWatchAuditSink.append takes an AuditEvent, got {type(event).__name__}")
            event = AuditEvent.from_dict(event)
        message = event_message(event)
        size = len(message.encode("utf-8"))
        if size > MAX_EVENT_BYTES:
            raise ValueError(f"audit event {event.event_id} is {size} bytes, over the CloudWatch limit {MAX_EVENT_BYTES}")
        with self._lock:
            if self._closed:
                raise AuditSinkError("CloudWatchAuditSink is closed")
            full = bool(self._buffer) and (
                len(self._buffer) >= self._max_batch_events
                or self._buffer_bytes + size + EVENT_OVERHEAD_BYTES > MAX_BATCH_BYTES
            )
            try:
                if full:
                    self._flush_locked()
            finally:  # buffered even if that flush failed: the error reaches the caller, the event is kept
                self._buffer.append((int(self._clock() * 1000), message))
                self._buffer_bytes += size + EVENT_OVERHEAD_BYTES
            if len(self._buffer) >= self._max_batch_events:
                self._flush_locked()

    def extend(self, events: Any) -> None:
        """`append` each of `events`."""
        for event in events:
            self.append(event)

    def flush(self) -> int:
        """Send every buffered event; return how many were sent. `AuditSinkError` keeps them buffered."""
        with self._lock:
            return self._flush_locked()

    @property
    def pending(self) -> int:
        """Events buffered but not yet sent."""
        with self._lock:
            return len(self._buffer)

    def close(self) -> None:
        """Flush, then refuse further events. Idempotent; the client is closed only if this sink built it."""
        with self._lock:
            if self._closed:
                return
            self._flush_locked()
            self._closed = True
        self._close_client()

    def __repr__(self) -> str:
        return f"CloudWatchAuditSink(group={self.log_group!r}, stream={self.log_stream!r}, pending={len(self._buffer)})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("CloudWatchAuditSink holds a live client and is not pickled; build it where events are written")

    # ------------------------------------------------------------------ plumbing

    def _call(self, operation: str, **params: Any) -> dict[str, Any]:
        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            code = error_code(exc)
            if code in ("ResourceAlreadyExistsException", "ResourceNotFoundException"):
                raise
            raise AuditSinkError(f"CloudWatch Logs {operation} failed ({code or 'unknown error'})") from exc
        except BotoCoreError as exc:
            raise AuditSinkError(f"CloudWatch Logs {operation} failed ({type(exc).__name__})") from exc

    def _create(self, operation: str, **params: Any) -> None:
        try:
            self._call(operation, **params)
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise AuditSinkError(f"CloudWatch Logs {operation} failed ({error_code(exc)})") from exc

    def _ensure_destination(self) -> None:
        self._create("create_log_group", logGroupName=self.log_group)
        self._create("create_log_stream", logGroupName=self.log_group, logStreamName=self.log_stream)
        self._ready = True

    def _put(self, batch: list[tuple[int, str]]) -> dict[str, Any] | None:
        """PutLogEvents for `batch`; returns CloudWatch's rejectedLogEventsInfo, if any."""
        events = [{"timestamp": ts, "message": message} for ts, message in sorted(batch, key=lambda e: e[0])]
        params = {"logGroupName": self.log_group, "logStreamName": self.log_stream, "logEvents": events}
        try:
            response = self._call("put_log_events", **params)
        except ClientError as exc:  # group or stream missing: create them and try once more
            if error_code(exc) != "ResourceNotFoundException":
                raise AuditSinkError(f"CloudWatch Logs put_log_events failed ({error_code(exc)})") from exc
            self._ensure_destination()
            try:
                response = self._call("put_log_events", **params)
            except ClientError as again:
                raise AuditSinkError(f"CloudWatch Logs put_log_events failed ({error_code(again)})") from again
        self.put_calls += 1
        return response.get("rejectedLogEventsInfo") or None

    def _flush_locked(self) -> int:
        if not self._buffer:
            return 0
        if not self._ready:
            self._ensure_destination()
        sent = 0
        while self._buffer:
            batch: list[tuple[int, str]] = []
            size = 0
            for ts, message in self._buffer:
                cost = len(message.encode("utf-8")) + EVENT_OVERHEAD_BYTES
                if batch and (len(batch) >= self._max_batch_events or size + cost > MAX_BATCH_BYTES):
                    break
                batch.append((ts, message))
                size += cost
            rejected = self._put(batch)
            del self._buffer[: len(batch)]
            self._buffer_bytes -= size
            sent += len(batch)
            self.sent += len(batch)
            if rejected:
                raise AuditSinkError(f"CloudWatch Logs rejected audit events: {json.dumps(rejected, sort_keys=True)}")
        return sent
