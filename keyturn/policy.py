"""How a reader classifies a row by its key version.

`KeyPolicy` is a picklable snapshot of the registry (no secrets): version ->
state and KEK id, plus the active version. `classify` maps a row's version
to a `ReadStatus`; only `current` and `stale` rows are ever decrypted.

`VersionRules` says what a reader does with rows it cannot place: rows
without key-version metadata (`missing`) and rows whose version or DEK the
key home does not know (`unknown`) are either quarantined (routed to the
version-mismatch side output, bytes kept) or rejected (`VersionMismatchError`),
as ``version_tracking.on_missing_version`` / ``on_unknown_version`` say.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from keyturn.errors import DecryptionError, VersionMismatchError
from keyturn.directory import DekEntry, entry_matches
from keyturn.format import Envelope, parse_envelope
from keyturn.registry.base import KeyRegistry, KeyState, KeyVersion
from keyturn.scope import KekRef, Location

__all__ = [
    "ReadStatus",
    "KeyPolicy",
    "RowKeys",
    "PairKeys",
    "VersionRules",
    "classify_rows",
    "classify_keys",
    "classify_pair",
    "count_statuses",
    "StatusCounts",
]


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


@dataclass(frozen=True, slots=True)
class RowKeys:
    """Per-row outcome of classification: status, effective key version, and DEK contract revision.

    `versions[i]` is the key version that wraps row i's DEK *now*: the
    directory's, when classification had directory entries, else the row's
    own. `revisions[i]` is the dataset-contract revision the DEK was born
    under (None without a directory, or for a DEK registered without a
    revision: every contract column is required of the row).
    """

    status: list[ReadStatus]
    versions: list[int | None]
    revisions: list[int | None]


def classify_rows(
    policy: KeyPolicy,
    versions: Sequence[int | None],
    envelopes: Sequence[bytes | None],
    *,
    entries: Mapping[bytes, DekEntry | None] | None = None,
    location: Location | None = None,
) -> list[ReadStatus]:
    """Status of each row from its version metadata and DEK envelope (see `classify_keys`)."""
    return classify_keys(policy, versions, envelopes, entries=entries, location=location).status


@dataclass(frozen=True, slots=True)
class PairKeys:
    """The outcome of classifying one (version, envelope) pair: see `RowKeys` for the fields."""

    status: ReadStatus
    version: int | None
    revision: int | None


def classify_pair(
    policy: KeyPolicy,
    version: int | None,
    envelope: bytes | None,
    *,
    entries: Mapping[bytes, DekEntry | None] | None = None,
    location: Location | None = None,
) -> PairKeys:
    """Classify the rows that carry `version` and `envelope` (the rules of `classify_keys`)."""
    if version is None or envelope is None:
        return PairKeys(ReadStatus.MISSING, version, None)
    try:
        birth = parse_envelope(envelope)
    except DecryptionError:
        return PairKeys(ReadStatus.CORRUPT, version, None)
    if birth.key_version != version:
        return PairKeys(ReadStatus.CORRUPT, version, None)
    current, revision = birth, None
    if entries is not None:
        entry = entries.get(birth.dek_id)
        if entry is None:
            return PairKeys(ReadStatus.UNKNOWN, version, None)
        if not _entry_matches(entry, birth, location):
            return PairKeys(ReadStatus.CORRUPT, version, None)
        try:
            current = parse_envelope(entry.envelope)
        except DecryptionError:
            return PairKeys(ReadStatus.CORRUPT, version, None)
        # a DEK registered without a contract revision (0) needs every contract column: the strictest reading
        revision = entry.contract_revision or None
    row_status = policy.classify(current.key_version)
    if row_status.readable and policy.kek_ids.get(current.key_version) != current.kek_id:
        return PairKeys(ReadStatus.CORRUPT, current.key_version, revision)
    return PairKeys(row_status, current.key_version, revision)


def classify_keys(
    policy: KeyPolicy,
    versions: Sequence[int | None],
    envelopes: Sequence[bytes | None],
    *,
    entries: Mapping[bytes, DekEntry | None] | None = None,
    location: Location | None = None,
) -> RowKeys:
    """Classify every row; each distinct (version, envelope) pair is worked out once (`classify_pair`).

    Missing metadata gives `missing`. An envelope that does not parse, or
    whose key version differs from the row's version field, gives `corrupt`.
    With directory `entries` (dek_id -> entry or None, see
    `DekReader.entries`) and the data's `location`: a DEK the directory does
    not know is `unknown`; an entry that does not match the row's (birth)
    envelope or location is `corrupt`; otherwise the policy classifies the
    *entry's* key version, so a DEK rewrapped in the directory is current
    without any change to the row. Without entries the row's own envelope
    decides. Either way a readable version whose KEK is not the registry's
    KEK for it gives `corrupt` (so a tampered KEK id never reaches the KMS).
    """
    if len(versions) != len(envelopes):
        raise ValueError("versions and envelopes must have one entry per row")
    if entries is not None and location is None:
        raise ValueError("classifying against directory entries needs the data's location")
    pairs = list(zip(versions, envelopes))
    by_pair = {
        pair: classify_pair(policy, *pair, entries=entries, location=location) for pair in dict.fromkeys(pairs)
    }
    if len(by_pair) == 1:  # the common case: one DEK, one version
        (found,) = by_pair.values()
        n = len(pairs)
        return RowKeys([found.status] * n, [found.version] * n, [found.revision] * n)
    rows = list(map(by_pair.__getitem__, pairs))
    return RowKeys([r.status for r in rows], [r.version for r in rows], [r.revision for r in rows])


def _entry_matches(entry: DekEntry, birth: Envelope, location: Location | None) -> bool:
    return location is not None and entry_matches(entry, birth, location)


def count_statuses(status: Sequence[ReadStatus]) -> dict[str, int]:
    """Rows per status value, every status present (zeros included), in `ReadStatus` order."""
    out = {s.value: 0 for s in ReadStatus}
    for value, rows in Counter(status).items():
        out[ReadStatus(value).value] += rows
    return out


class StatusCounts:
    """For results that carry one `ReadStatus` per row (or record) in `status`: `counts()`."""

    status: list[ReadStatus]

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present (zeros included)."""
        return count_statuses(self.status)


_RULES = ("quarantine", "reject")
_RULE_WORDS = {
    ReadStatus.MISSING: ("with no key-version metadata", "version_tracking.on_missing_version"),
    ReadStatus.UNKNOWN: ("whose key version or DEK the key home does not know", "version_tracking.on_unknown_version"),
}


@dataclass(frozen=True)
class VersionRules:
    """What a reader does with `missing` and `unknown` rows: ``quarantine`` (the default) or ``reject``.

    ``quarantine`` keeps today's behaviour: the rows go to the version-mismatch
    side output with their encrypted bytes and a job reports them (exit code
    3). ``reject`` makes `check` raise `VersionMismatchError` as soon as such
    rows appear. Picklable, no secrets.
    """

    on_missing: str = "quarantine"
    on_unknown: str = "quarantine"

    def __post_init__(self) -> None:
        for name in ("on_missing", "on_unknown"):
            if getattr(self, name) not in _RULES:
                raise ValueError(f"{name} must be 'quarantine' or 'reject', got {getattr(self, name)!r}")

    @classmethod
    def from_config(cls, config: object) -> VersionRules:
        """The rules of a `keyturn.config.KeyturnConfig` (its ``version_tracking`` section)."""
        tracking = config.version_tracking  # type: ignore[attr-defined]
        return cls(on_missing=tracking.on_missing_version, on_unknown=tracking.on_unknown_version)

    @property
    def rejecting(self) -> frozenset[ReadStatus]:
        """The statuses these rules reject."""
        out = set()
        if self.on_missing == "reject":
            out.add(ReadStatus.MISSING)
        if self.on_unknown == "reject":
            out.add(ReadStatus.UNKNOWN)
        return frozenset(out)

    def violation(
        self, counts: Mapping[str, int] | Sequence[ReadStatus], *, dataset: str = "", partition: str | None = None
    ) -> VersionMismatchError | None:
        """The error `check` would raise for these rows (statuses, or counts by status value), else None."""
        if not self.rejecting:
            return None
        if not isinstance(counts, Mapping):
            counts = count_statuses(counts)
        for status in (ReadStatus.MISSING, ReadStatus.UNKNOWN):
            rows = int(counts.get(status.value, 0) or 0)
            if status in self.rejecting and rows > 0:
                what, setting = _RULE_WORDS[status]
                where = f" of dataset {dataset!r}" if dataset else ""
                if partition is not None:
                    where = f" in partition {partition!r}" + where
                return VersionMismatchError(
                    f"rejected {rows:,} {status.value} row(s) {what}{where} ({setting}: reject); "
                    "set it to quarantine to route such rows to the version-mismatch side output instead",
                    reason=status.value,
                    rows=rows,
                )
        return None

    def check(
        self, counts: Mapping[str, int] | Sequence[ReadStatus], *, dataset: str = "", partition: str | None = None
    ) -> None:
        """Raise `VersionMismatchError` when a rejected status has rows; do nothing otherwise."""
        error = self.violation(counts, dataset=dataset, partition=partition)
        if error is not None:
            raise error
