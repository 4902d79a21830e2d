"""Structured side-output events: audit, version mismatch, quarantine.

One `AuditEvent` is emitted per scope (one partition's records in one bundle,
or one control-plane action), never per record. `VersionMismatchEvent` and
`QuarantineRecord` feed the `version_mismatch` and `quarantine` side outputs.

Event ids are deterministic. `build_event` and `build_mismatch` hash a
canonical, length-prefixed encoding (`keyturn.context.encode_context`) of the
event's *content* (action or reason, dataset, partition, versions, counts and
`scope_key`) with SHA-256 and keep 32 hex characters. The time, the actor,
the free-text reason and the KMS request ids are left out, so a retried Beam
bundle that sees the same input (callers derive `scope_key` from the input)
produces the same id, and downstream sinks can drop the duplicate.

No key material, ever: these types only hold names, counts, versions and ids.
Callers pass counts and identifiers, never keys, wrapped or plain. The one
byte field, `QuarantineRecord.payload`, holds the *input* bytes that could not
be processed (ciphertext or unparseable data), and `detail` is a short code-like
explanation that must never quote key bytes.

Each type's `to_dict()` matches its Avro schema in `schemas/` field for field
(`keyturn.schemas.load_schema("audit_event")` and friends), and `from_dict` inverts it.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from keyturn.context import encode_context

__all__ = [
    "AuditAction",
    "AuditEvent",
    "audit_event_id",
    "build_event",
    "MismatchReason",
    "VersionMismatchEvent",
    "build_mismatch",
    "QuarantineRecord",
    "build_quarantine",
    "PAYLOAD_FORMATS",
    "QUARANTINE_REASONS",
    "EVENT_ID_HEX_CHARS",
    "utc_now",
    "format_time",
]

EVENT_ID_HEX_CHARS = 32
MAX_VERSION = 0xFFFF_FFFF  # key versions are u32 on the wire
MAX_COUNT = (1 << 63) - 1  # Avro long
MAX_DETAIL_CHARS = 1024
PAYLOAD_FORMATS: frozenset[str] = frozenset({"arrow_ipc", "avro", "raw"})
QUARANTINE_REASONS: frozenset[str] = frozenset(
    {"corrupt", "unparseable", "unknown_version", "missing_version", "retired_version"}
)
"""The reason codes keyturn itself emits; other lowercase codes are allowed."""

_EVENT_ID_RE = re.compile(r"[0-9a-f]{32}")
_CODE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_ID_DOMAIN_AUDIT = "keyturn/v1/audit-event"
_ID_DOMAIN_MISMATCH = "keyturn/v1/version-mismatch"


class AuditAction(str, enum.Enum):
    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    REWRAP = "rewrap"
    REENCRYPT = "reencrypt"
    ROTATE = "rotate"
    RETIRE = "retire"
    SCHEDULE_DELETION = "schedule_deletion"
    REINSTATE = "reinstate"
    QUARANTINE = "quarantine"
    CONTRACT = "contract"  # a dataset contract changed (keyturn dataset add-column)


class MismatchReason(str, enum.Enum):
    STALE = "stale"  # readable, older than current
    RETIRED = "retired"  # policy refuses it
    UNKNOWN = "unknown"  # not in the registry
    MISSING = "missing"  # no version metadata


# --------------------------------------------------------------------------- time


def utc_now() -> datetime:
    """The default clock: the current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with microseconds and a ``Z``; naive datetimes are refused."""
    if not isinstance(moment, datetime):
        raise TypeError(f"clock must return a datetime, got {type(moment).__name__}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("clock returned a naive datetime; return a timezone-aware one (UTC)")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _check_time(name: str, value: object) -> None:
    _check_str(name, value, nonempty=True)
    try:
        parsed = datetime.fromisoformat(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{name} must be an ISO-8601 timestamp, got {value!r}") from None
    if parsed.tzinfo is None or parsed.utcoffset() != timezone.utc.utcoffset(None):
        raise ValueError(f"{name} must be in UTC (end in 'Z' or '+00:00'), got {value!r}")


# --------------------------------------------------------------------- validation


def _check_str(name: str, value: object, *, nonempty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")
    if nonempty and not value:
        raise ValueError(f"{name} must not be empty")


def _check_int(name: str, value: object, *, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")


def _check_version(name: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    _check_int(name, value, lo=0, hi=MAX_VERSION)


def _check_event_id(value: object) -> None:
    _check_str("event_id", value)
    if not _EVENT_ID_RE.fullmatch(value):  # type: ignore[arg-type]
        raise ValueError(f"event_id must be {EVENT_ID_HEX_CHARS} lowercase hex chars, got {value!r}")


def _normalize_counts(counts: object) -> dict[str, int]:
    if not isinstance(counts, Mapping):
        raise TypeError(f"counts must be a mapping of str to int, got {type(counts).__name__}")
    out: dict[str, int] = {}
    for key in sorted(counts, key=lambda k: (not isinstance(k, str), str(k))):
        if not isinstance(key, str):
            raise TypeError(f"counts keys must be str, got {type(key).__name__}")
        if not _CODE_RE.fullmatch(key):
            raise ValueError(f"counts key {key!r} must be lowercase snake_case, 1..64 chars (e.g. 'rows')")
        _check_int(f"counts[{key!r}]", counts[key], lo=0, hi=MAX_COUNT)
        out[key] = counts[key]
    return out


def _normalize_ids(ids: object) -> tuple[str, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError("kms_request_ids must be an iterable of str (not a single str)")
    out = tuple(ids)
    for i, item in enumerate(out):
        _check_str(f"kms_request_ids[{i}]", item, nonempty=True)
    return out


def _opt_int_text(value: int | None) -> str:
    # "" cannot be the text of an int, so None and every version stay distinct.
    return "" if value is None else str(value)


def _event_id(fields: Mapping[str, str | bytes]) -> str:
    return hashlib.sha256(encode_context(fields)).hexdigest()[:EVENT_ID_HEX_CHARS]


def _strict_fields(kind: str, data: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise TypeError(f"{kind}.from_dict needs a mapping, got {type(data).__name__}")
    missing = [n for n in names if n not in data]
    extra = sorted(str(k) for k in data if k not in names)
    if missing or extra:
        raise ValueError(f"{kind}.from_dict: missing fields {missing}, unexpected fields {extra}")
    return {n: data[n] for n in names}


# ----------------------------------------------------------------- audit events


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited action over one scope; validated on construction.

    `counts` is copied with sorted keys; treat it as read-only (the event id
    was computed from it). Hash and equality are by value.
    """

    event_id: str
    action: AuditAction
    actor: str
    at: str
    reason: str
    dataset: str
    partition: str
    version_from: int | None
    version_to: int | None
    counts: dict[str, int]
    kms_request_ids: tuple[str, ...]
    scope_key: str

    def __post_init__(self) -> None:
        _check_event_id(self.event_id)
        object.__setattr__(self, "action", AuditAction(self.action))
        _check_str("actor", self.actor, nonempty=True)
        _check_time("at", self.at)
        _check_str("reason", self.reason)
        _check_str("dataset", self.dataset, nonempty=True)
        _check_str("partition", self.partition)
        _check_version("version_from", self.version_from, optional=True)
        _check_version("version_to", self.version_to, optional=True)
        object.__setattr__(self, "counts", _normalize_counts(self.counts))
        object.__setattr__(self, "kms_request_ids", _normalize_ids(self.kms_request_ids))
        _check_str("scope_key", self.scope_key, nonempty=True)

    def __hash__(self) -> int:
        return hash((self.event_id, self.at, self.actor))

    def to_dict(self) -> dict[str, Any]:
        """A plain dict matching schemas/audit_event.avsc (and JSON-serializable)."""
        return {
            "event_id": self.event_id,
            "action": self.action.value,
            "actor": self.actor,
            "at": self.at,
            "reason": self.reason,
            "dataset": self.dataset,
            "partition": self.partition,
            "version_from": self.version_from,
            "version_to": self.version_to,
            "counts": dict(self.counts),
            "kms_request_ids": list(self.kms_request_ids),
            "scope_key": self.scope_key,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AuditEvent:
        """Inverse of `to_dict`; exactly the schema's fields, else `ValueError`."""
        return cls(**_strict_fields("AuditEvent", data, _AUDIT_FIELDS))


_AUDIT_FIELDS = tuple(AuditEvent.__dataclass_fields__)


def audit_event_id(
    action: AuditAction | str,
    *,
    dataset: str,
    partition: str,
    version_from: int | None,
    version_to: int | None,
    counts: Mapping[str, int],
    scope_key: str,
) -> str:
    """The deterministic id `build_event` assigns; same content, same id."""
    action = AuditAction(action)
    _check_str("dataset", dataset, nonempty=True)
    _check_str("partition", partition)
    _check_version("version_from", version_from, optional=True)
    _check_version("version_to", version_to, optional=True)
    _check_str("scope_key", scope_key, nonempty=True)
    norm = _normalize_counts(counts)
    return _event_id(
        {
            "domain": _ID_DOMAIN_AUDIT,
            "action": action.value,
            "dataset": dataset,
            "partition": partition,
            "version_from": _opt_int_text(version_from),
            "version_to": _opt_int_text(version_to),
            "counts": encode_context({k: str(v) for k, v in norm.items()}),
            "scope_key": scope_key,
        }
    )


def build_event(
    action: AuditAction | str,
    *,
    actor: str,
    reason: str,
    dataset: str,
    partition: str,
    version_from: int | None,
    version_to: int | None,
    counts: Mapping[str, int],
    kms_request_ids: Iterable[str] = (),
    scope_key: str,
    clock: Callable[[], datetime] = utc_now,
) -> AuditEvent:
    """Build an `AuditEvent` stamped by `clock`, with a deterministic id.

    The id covers action, dataset, partition, versions, counts and
    `scope_key`; not the time, actor, reason or KMS request ids. `scope_key`
    must identify the scope's input (e.g. a digest of the partition batch),
    so a retried bundle gets the same id. Pass counts and ids only, never keys.
    """
    event_id = audit_event_id(
        action,
        dataset=dataset,
        partition=partition,
        version_from=version_from,
        version_to=version_to,
        counts=counts,
        scope_key=scope_key,
    )
    return AuditEvent(
        event_id=event_id,
        action=AuditAction(action),
        actor=actor,
        at=format_time(clock()),
        reason=reason,
        dataset=dataset,
        partition=partition,
        version_from=version_from,
        version_to=version_to,
        counts=dict(counts),
        kms_request_ids=_normalize_ids(kms_request_ids),
        scope_key=scope_key,
    )


# --------------------------------------------------------- version-mismatch events


@dataclass(frozen=True, slots=True)
class VersionMismatchEvent:
    """Rows of one scope whose key version is not the current one.

    `found_version` is None exactly when `reason` is ``missing``; a ``stale``
    version is older than `current_version`.
    """

    event_id: str
    reason: MismatchReason
    dataset: str
    partition: str
    found_version: int | None
    current_version: int
    rows: int
    scope_key: str
    at: str

    def __post_init__(self) -> None:
        _check_event_id(self.event_id)
        object.__setattr__(self, "reason", MismatchReason(self.reason))
        _check_mismatch(
            self.reason, self.dataset, self.partition, self.found_version, self.current_version, self.rows, self.scope_key
        )
        _check_time("at", self.at)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict matching schemas/version_mismatch.avsc."""
        return {
            "event_id": self.event_id,
            "reason": self.reason.value,
            "dataset": self.dataset,
            "partition": self.partition,
            "found_version": self.found_version,
            "current_version": self.current_version,
            "rows": self.rows,
            "scope_key": self.scope_key,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VersionMismatchEvent:
        """Inverse of `to_dict`; exactly the schema's fields, else `ValueError`."""
        return cls(**_strict_fields("VersionMismatchEvent", data, _MISMATCH_FIELDS))


_MISMATCH_FIELDS = tuple(VersionMismatchEvent.__dataclass_fields__)


def _check_mismatch(
    reason: MismatchReason,
    dataset: object,
    partition: object,
    found_version: object,
    current_version: object,
    rows: object,
    scope_key: object,
) -> None:
    _check_str("dataset", dataset, nonempty=True)
    _check_str("partition", partition)
    _check_version("found_version", found_version, optional=True)
    _check_version("current_version", current_version, optional=False)
    _check_int("rows", rows, lo=0, hi=MAX_COUNT)
    _check_str("scope_key", scope_key, nonempty=True)
    if (reason is MismatchReason.MISSING) != (found_version is None):
        raise ValueError("found_version must be None exactly when reason is 'missing'")
    if reason is MismatchReason.STALE and not found_version < current_version:  # type: ignore[operator]
        raise ValueError(f"a stale version must be older than current: found {found_version}, current {current_version}")


def build_mismatch(
    reason: MismatchReason | str,
    *,
    dataset: str,
    partition: str,
    found_version: int | None,
    current_version: int,
    rows: int,
    scope_key: str,
    clock: Callable[[], datetime] = utc_now,
) -> VersionMismatchEvent:
    """Build a `VersionMismatchEvent` with a deterministic id.

    The id covers reason, dataset, partition, both versions, rows and
    `scope_key`, never the time.
    """
    reason = MismatchReason(reason)
    _check_mismatch(reason, dataset, partition, found_version, current_version, rows, scope_key)
    event_id = _event_id(
        {
            "domain": _ID_DOMAIN_MISMATCH,
            "reason": reason.value,
            "dataset": dataset,
            "partition": partition,
            "found_version": _opt_int_text(found_version),
            "current_version": str(current_version),
            "rows": str(rows),
            "scope_key": scope_key,
        }
    )
    return VersionMismatchEvent(
        event_id=event_id,
        reason=reason,
        dataset=dataset,
        partition=partition,
        found_version=found_version,
        current_version=current_version,
        rows=rows,
        scope_key=scope_key,
        at=format_time(clock()),
    )


# ------------------------------------------------------------------- quarantine


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """Input that could not be authenticated or parsed, kept whole.

    `reason` is a lowercase code (see `QUARANTINE_REASONS`); `detail` is a
    short explanation (at most 1024 chars) that must never quote key bytes;
    `payload` is the original input (`payload_format`: arrow_ipc, avro or
    raw), so nothing is dropped. `repr` leaves the payload out.
    """

    reason: str
    dataset: str
    partition: str
    detail: str
    payload: bytes = field(repr=False)
    payload_format: str
    rows: int
    at: str

    def __post_init__(self) -> None:
        _check_str("reason", self.reason, nonempty=True)
        if not _CODE_RE.fullmatch(self.reason):
            raise ValueError(f"reason must be a lowercase snake_case code such as 'corrupt', got {self.reason!r}")
        _check_str("dataset", self.dataset, nonempty=True)
        _check_str("partition", self.partition)
        _check_str("detail", self.detail)
        if len(self.detail) > MAX_DETAIL_CHARS:
            raise ValueError(f"detail must be at most {MAX_DETAIL_CHARS} chars, got {len(self.detail)}")
        if isinstance(self.payload, (bytearray, memoryview)):
            object.__setattr__(self, "payload", bytes(self.payload))
        if not isinstance(self.payload, bytes):
            raise TypeError(f"payload must be bytes, got {type(self.payload).__name__}")
        if self.payload_format not in PAYLOAD_FORMATS:
            raise ValueError(f"payload_format must be one of {sorted(PAYLOAD_FORMATS)}, got {self.payload_format!r}")
        _check_int("rows", self.rows, lo=0, hi=MAX_COUNT)
        _check_time("at", self.at)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict matching schemas/quarantine_record.avsc."""
        return {
            "reason": self.reason,
            "dataset": self.dataset,
            "partition": self.partition,
            "detail": self.detail,
            "payload": self.payload,
            "payload_format": self.payload_format,
            "rows": self.rows,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuarantineRecord:
        """Inverse of `to_dict`; exactly the schema's fields, else `ValueError`."""
        return cls(**_strict_fields("QuarantineRecord", data, _QUARANTINE_FIELDS))


_QUARANTINE_FIELDS = tuple(QuarantineRecord.__dataclass_fields__)


def build_quarantine(
    reason: str,
    *,
    dataset: str,
    partition: str,
    detail: str,
    payload: bytes,
    payload_format: str,
    rows: int,
    clock: Callable[[], datetime] = utc_now,
) -> QuarantineRecord:
    """Build a `QuarantineRecord` stamped by `clock`."""
    return QuarantineRecord(
        reason=reason,
        dataset=dataset,
        partition=partition,
        detail=detail,
        payload=payload,
        payload_format=payload_format,
        rows=rows,
        at=format_time(clock()),
    )
