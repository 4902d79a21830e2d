"""How a reader classifies a row by its key version.

`KeyPolicy` is a picklable snapshot of the registry (no secrets): version ->
state and KEK id, plus the active version. `classify` maps a row's version
to a `ReadStatus`; only `current` and `stale` rows are ever decrypted.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from keyturn.errors import DecryptionError
from keyturn.format import parse_envelope
from keyturn.registry.base import KeyRegistry, KeyState, KeyVersion
from keyturn.scope import KekRef

__all__ = ["ReadStatus", "KeyPolicy", "classify_rows", "count_statuses"]


class ReadStatus(str, enum.Enum):
    CURRENT = "current"  # on the active version
    STALE = "stale"  # readable, on an older (decrypt_only) version
    RETIRED = "retired"  # retired or pending deletion: policy refuses it
    UNKNOWN = "unknown"  # version not in the registry
    MISSING = "missing"  # no version metadata
    CORRUPT = "corrupt"  # failed to parse or authenticate

    @property
    def readable(self) -> bool:
        return self is ReadStatus.CURRENT or self is ReadStatus.STALE  # identity: hot in per-row loops


@dataclass(frozen=True)
class KeyPolicy:
    """A snapshot of key versions for readers and rewriters."""

    active: KekRef
    states: Mapping[int, KeyState]
    kek_ids: Mapping[int, str]
    created_at: Mapping[int, datetime] = field(default_factory=dict)

    @classmethod
    def from_versions(cls, versions: list[KeyVersion]) -> KeyPolicy:
        active = [v for v in versions if v.state is KeyState.ACTIVE]
        if len(active) != 1:
            raise ValueError("a key policy needs exactly one active version")
        return cls(
            active=KekRef(active[0].version, active[0].kek_id),
            states={v.version: v.state for v in versions},
            kek_ids={v.version: v.kek_id for v in versions},
            created_at={v.version: v.created_at for v in versions},
        )

    @classmethod
    def from_registry(cls, registry: KeyRegistry) -> KeyPolicy:
        return cls.from_versions(registry.versions())

    def classify(self, version: int | None) -> ReadStatus:
        """The status of data under `version` (None means no version metadata)."""
        if version is None:
            return ReadStatus.MISSING
        state = self.states.get(version)
        if state is None:
            return ReadStatus.UNKNOWN
        if state is KeyState.ACTIVE:
            return ReadStatus.CURRENT
        if state is KeyState.DECRYPT_ONLY:
            return ReadStatus.STALE
        return ReadStatus.RETIRED

    def kek_for(self, version: int) -> KekRef:
        """The KEK reference of a known version (`KeyError` if unknown)."""
        return KekRef(version, self.kek_ids[version])


def classify_rows(policy: KeyPolicy, versions: Sequence[int | None], envelopes: Sequence[bytes | None]) -> list[ReadStatus]:
    """Status of each row from its version metadata and DEK envelope.

    Missing metadata gives `missing`. An envelope that does not parse, whose
    key version differs from the row's version field, or whose KEK id is not
    the registry's KEK for that version, gives `corrupt` (so a tampered KEK
    id never reaches the KMS). Otherwise the policy decides. Each distinct
    envelope is parsed once.
    """
    parsed: dict[bytes, tuple[int, str] | None] = {}

    def classify_one(version: int | None, env: bytes | None) -> ReadStatus:
        if version is None or env is None:
            return ReadStatus.MISSING
        if env not in parsed:
            try:
                envelope = parse_envelope(env)
                parsed[env] = (envelope.key_version, envelope.kek_id)
            except DecryptionError:
                parsed[env] = None
        key = parsed[env]
        if key is None or key[0] != version:
            return ReadStatus.CORRUPT
        row_status = policy.classify(version)
        if row_status.readable and policy.kek_ids.get(version) != key[1]:
            return ReadStatus.CORRUPT
        return row_status

    if len(versions) != len(envelopes):
        raise ValueError("versions and envelopes must have one entry per row")
    # rows share few (version, envelope) pairs: classify each pair once
    by_pair: dict[tuple[int | None, bytes | None], ReadStatus] = {}
    status: list[ReadStatus] = []
    for pair in zip(versions, envelopes):
        row_status = by_pair.get(pair)
        if row_status is None:
            row_status = by_pair[pair] = classify_one(*pair)
        status.append(row_status)
    return status


def count_statuses(status: Sequence[ReadStatus]) -> dict[str, int]:
    """Rows per status value, every status present (zeros included), in `ReadStatus` order."""
    out = {s.value: 0 for s in ReadStatus}
    for s in status:
        out[ReadStatus(s).value] += 1
    return out
