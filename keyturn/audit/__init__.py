"""Audit side outputs and the hash-chained control-plane log.

`events` holds the structured events (audit, version mismatch, quarantine)
with deterministic ids; `chain` holds the append-only, hash-chained JSON Lines
log for control-plane events. Neither ever holds key material.
"""

from keyturn.audit.chain import GENESIS_PREV, AuditChain, ChainEntry, entry_hash, verify_chain
from keyturn.audit.events import (
    PAYLOAD_FORMATS,
    QUARANTINE_REASONS,
    AuditAction,
    AuditEvent,
    MismatchReason,
    QuarantineRecord,
    VersionMismatchEvent,
    audit_event_id,
    build_event,
    build_mismatch,
    build_quarantine,
    format_time,
    utc_now,
)

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
    "format_time",
    "utc_now",
    "AuditChain",
    "ChainEntry",
    "verify_chain",
    "entry_hash",
    "GENESIS_PREV",
]
