"""The DEK directory: every DEK keyturn ever generated, with its current wrapping.

The directory lives in the key registry (the key home), not in the lake, so
nothing a lake file says can change which DEKs exist or which key version
wraps them. Its model is Confluent's DEK Registry.

One `DekEntry` per DEK:

- ``dek_id``, ``dataset``, ``partition``: where the DEK may be used (the same
  values the KMS binds the wrapped DEK to);
- ``envelope``: the *current* DEK envelope (docs/FORMAT.md section 5), and
  ``key_version``, the key version that wraps it now. `keyturn rewrap`
  replaces both, atomically, per entry;
- ``birth_version`` and ``birth_commitment``: the key version that wrapped
  the DEK when it was generated, and the envelope's key commitment. The
  envelope a row carries (``_keyturn_dek``) is this birth envelope; it keeps
  a row self-describing while its birth KEK version exists, and lets
  `keyturn directory rebuild` recreate a lost entry;
- ``created_at``, ``actor``, ``contract_revision`` (the dataset contract's
  revision when the DEK was made: columns added to the contract later are
  not required of rows under it).

Contracts shared by every backend (SQLite and DynamoDB):

- a scope registers a DEK *before* it seals a cell under it
  (`register_deks`); registering the same entry twice is a no-op, the same
  dek_id with another birth envelope is refused (`DirectoryError`);
- a DEK is registered only under a readable key version whose KEK is the
  one its envelope names;
- `replace_wrapping` is compare-and-set on the current envelope: it moves
  one entry only if nobody moved it first, so a crashed or concurrent
  rewrap never loses an entry or leaves it half-written;
  `replace_wrappings` makes up to `swap_batch` such swaps in one write
  (SQLite: one transaction, so a rewrap of many DEKs commits once per batch,
  not once per DEK; DynamoDB: one conditional write per swap, `swap_batch`
  1). Each swap of a batch still succeeds or loses its race on its own; in
  one transaction, an error (`DirectoryError`, an outage) makes none of them;
- a key version cannot be retired or scheduled for deletion while any entry
  is wrapped under it (`dek_count`, checked inside the registry's write);
- `lookup_deks` answers many dek ids in one round trip.

`check_entry` is the one place an entry is validated against its envelope.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol, runtime_checkable

from keyturn.errors import ContractError, DecryptionError, DirectoryError
from keyturn.format import Envelope, parse_envelope

__all__ = [
    "DekEntry",
    "DekDirectory",
    "check_entry",
    "entry_matches",
    "new_entry",
    "rewrapped_entry",
    "LOOKUP_BATCH",
    "WrappingSwap",
    "replace_one_by_one",
]

LOOKUP_BATCH = 100
"""Most dek ids one backend request asks for (DynamoDB BatchGetItem's own cap)."""


@dataclass(frozen=True, slots=True)
class DekEntry:
    """One registered DEK: where it belongs, its birth, and its current wrapping. Holds no key."""

    dek_id: bytes
    dataset: str
    partition: str
    key_version: int
    envelope: bytes
    birth_version: int
    birth_commitment: bytes
    created_at: datetime
    actor: str
    contract_revision: int = 0

    def __repr__(self) -> str:
        return (
            f"DekEntry(dek_id={self.dek_id.hex()}, {self.dataset!r}/{self.partition!r}, "
            f"version={self.key_version}, birth={self.birth_version})"
        )

    def parsed(self) -> Envelope:
        """The current envelope, parsed (`DecryptionError` if the stored bytes are damaged)."""
        return parse_envelope(self.envelope)


def new_entry(
    envelope_bytes: bytes,
    *,
    dataset: str,
    partition: str,
    created_at: datetime,
    actor: str,
    contract_revision: int = 0,
) -> DekEntry:
    """The entry for a DEK a scope just generated; its envelope is also its birth envelope."""
    envelope = parse_envelope(envelope_bytes)
    return DekEntry(
        dek_id=envelope.dek_id,
        dataset=dataset,
        partition=partition,
        key_version=envelope.key_version,
        envelope=bytes(envelope_bytes),
        birth_version=envelope.key_version,
        birth_commitment=envelope.commitment,
        created_at=created_at,
        actor=actor,
        contract_revision=contract_revision,
    )


def rewrapped_entry(entry: DekEntry, new_envelope: bytes) -> DekEntry:
    """`entry` with `new_envelope` (same DEK, another KEK version) as its current wrapping."""
    parsed = parse_envelope(new_envelope)
    return replace(entry, key_version=parsed.key_version, envelope=bytes(new_envelope))


def entry_matches(entry: DekEntry, birth: Envelope, location: object) -> bool:
    """Is `entry` the directory entry of the DEK whose birth envelope is `birth`, at `location` (dataset, partition)?"""
    return (
        entry.dek_id == birth.dek_id
        and entry.birth_version == birth.key_version
        and hmac.compare_digest(entry.birth_commitment, birth.commitment)
        and entry.dataset == getattr(location, "dataset", None)
        and entry.partition == getattr(location, "partition", None)
    )


def check_entry(entry: DekEntry, kek_ids: Mapping[int, str] | None = None) -> Envelope:
    """Validate `entry` against its own envelope; return the parsed current envelope.

    `DirectoryError` unless the envelope parses, names the entry's dek_id,
    key version and birth commitment, and (given `kek_ids`, version -> KEK
    id from the registry) names the registry's KEK for its version.
    """
    if not isinstance(entry, DekEntry):
        raise TypeError(f"expected a DekEntry, not {type(entry).__name__}")
    try:
        envelope = parse_envelope(entry.envelope)
    except DecryptionError:
        raise DirectoryError(f"DEK {entry.dek_id.hex()}: its envelope does not parse") from None
    if envelope.dek_id != entry.dek_id:
        raise DirectoryError(f"DEK {entry.dek_id.hex()}: its envelope names another dek_id")
    if envelope.key_version != entry.key_version:
        raise DirectoryError(
            f"DEK {entry.dek_id.hex()}: envelope is under version {envelope.key_version}, entry says {entry.key_version}"
        )
    if not hmac.compare_digest(envelope.commitment, entry.birth_commitment):
        raise DirectoryError(f"DEK {entry.dek_id.hex()}: envelope commitment differs from the birth commitment")
    if not entry.dataset or not isinstance(entry.partition, str):
        raise DirectoryError(f"DEK {entry.dek_id.hex()}: dataset must be non-empty and partition a str")
    if entry.birth_version < 1 or entry.contract_revision < 0:
        raise DirectoryError(f"DEK {entry.dek_id.hex()}: bad birth version or contract revision")
    if kek_ids is not None:
        expected = kek_ids.get(entry.key_version)
        if expected is None:
            raise DirectoryError(f"DEK {entry.dek_id.hex()}: key version {entry.key_version} is not in the registry")
        if expected != envelope.kek_id:
            raise DirectoryError(
                f"DEK {entry.dek_id.hex()}: envelope names KEK {envelope.kek_id!r}, "
                f"the registry's KEK for version {entry.key_version} is {expected!r}"
            )
    return envelope


@dataclass(frozen=True, slots=True)
class WrappingSwap:
    """One compare-and-set of a directory entry's envelope: `expected` (its current one) -> `new` (validated there)."""

    dek_id: bytes
    expected: bytes
    new: bytes


@runtime_checkable
class DekDirectory(Protocol):
    """Registered DEKs and their current wrappings (see the module docstring for the contracts)."""

    def register_deks(self, entries: Sequence[DekEntry]) -> None:
        """Register new DEKs in one write; a no-op for entries already registered identically."""
        ...

    def lookup_deks(self, dek_ids: Iterable[bytes]) -> dict[bytes, DekEntry]:
        """The entries of those dek ids that are registered (absent ids are simply left out)."""
        ...

    def list_deks(
        self, *, key_version: int | None = None, after: bytes | None = None, limit: int = 1000
    ) -> list[DekEntry]:
        """Entries in dek_id order, after `after`, optionally only those wrapped under `key_version`."""
        ...

    def dek_count(self, key_version: int | None = None) -> int:
        """How many entries are wrapped under `key_version` (all entries if None)."""
        ...

    def deks_by_version(self) -> dict[int, int]:
        """Entries per current key version."""
        ...

    def replace_wrapping(self, dek_id: bytes, *, expected_envelope: bytes, new_envelope: bytes) -> bool:
        """Compare-and-set the current envelope; False if the entry no longer holds `expected_envelope`."""
        ...


def replace_one_by_one(directory: DekDirectory, swaps: Sequence[WrappingSwap]) -> list[bool]:
    """`replace_wrappings` as one `replace_wrapping` write per swap (the swaps before an error stay made)."""
    return [directory.replace_wrapping(s.dek_id, expected_envelope=s.expected, new_envelope=s.new) for s in swaps]


# Optional, beside the protocol (a directory written without them still is one, and rewraps one swap at a
# time): ``replace_wrappings(swaps: Sequence[WrappingSwap]) -> list[bool]``, `replace_wrapping` for each
# swap, per swap whether it moved its entry; and ``swap_batch: int``, how many swaps it makes in one write.
# With `swap_batch` > 1 the swaps are one write, so an error makes none of them; with 1 each is its own
# write, and those before an error stay made. Both keyturn registries have them.


def check_new_entries(entries: Sequence[DekEntry], kek_ids: Mapping[int, str], readable: Iterable[int]) -> None:
    """What every backend checks before registering: valid entries, under readable versions only."""
    allowed = set(readable)
    for entry in entries:
        check_entry(entry, kek_ids)
        if entry.key_version not in allowed:
            raise DirectoryError(
                f"DEK {entry.dek_id.hex()}: key version {entry.key_version} is not readable; no new DEK may use it"
            )
        if entry.birth_version != entry.key_version:
            raise DirectoryError(f"DEK {entry.dek_id.hex()}: a new DEK's birth version is its current version")


def check_contract_revisions(entries: Sequence[DekEntry], revisions: Mapping[str, int]) -> None:
    """Refuse a new DEK made under an older revision of its dataset's contract than the registry holds.

    A writer that read the contract before `dataset add-column` committed
    would otherwise register DEKs whose rows need not carry the new column
    as ciphertext. (Revision 0, no contract at all, needs every column.)
    """
    for entry in entries:
        current = revisions.get(entry.dataset)
        if current is not None and entry.contract_revision and entry.contract_revision < current:
            raise ContractError(
                f"DEK {entry.dek_id.hex()} was made under revision {entry.contract_revision} of dataset "
                f"{entry.dataset!r}'s contract, which is at revision {current} now; read the contract again"
            )


def check_rewrap(entry: DekEntry, new_envelope: bytes, kek_ids: Mapping[int, str]) -> DekEntry:
    """The entry after a rewrap to `new_envelope`, validated (`DirectoryError` if it is not the same DEK)."""
    try:
        moved = rewrapped_entry(entry, new_envelope)
    except DecryptionError:
        raise DirectoryError(f"DEK {entry.dek_id.hex()}: the new envelope does not parse") from None
    check_entry(moved, kek_ids)
    return moved
