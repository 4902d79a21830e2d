"""The DEK directory and dataset contracts: one behaviour suite, run on both registry backends.

Every shared test takes `backend` (``sqlite``: a file in tmp_path;
``dynamodb``: a fresh table on the loopback moto server of
tests/aws_support.py) and checks the contracts of `keyturn.directory` and
`KeyRegistry.pin_contract`/`evolve_contract`: registration and its refusals,
lookups (more than one BatchGetItem's worth), paging, exact counts, the
compare-and-set rewrap, retire/schedule_deletion refused while entries are
under a version, rotations with `expect_active` racing from threads, and
contract pinning and evolution.

Envelopes are real: an in-memory `LocalKms` wraps fresh DEKs (version n
under ``kek-n``) and `rewrap_envelope` moves them, so every entry passes
`check_entry` exactly as a scope's would.

The DynamoDB-only tests at the end cover what SQLite's single write lock
gives for free: a registration, rewrap or retire that lands between another
writer's read and its commit (the transaction conditions on the version
state and the per-version counter), BatchGetItem's unprocessed keys, one
request per 100 ids, and the item layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aws_support import AttemptCounter, client, moto_url, unique  # noqa: F401  (moto_url is a fixture)
from botocore.awsrequest import AWSResponse

from keyturn.aws.dynamodb_registry import DynamoDbKeyRegistry, create_table
from keyturn.contract import ContractColumn, DatasetContract, add_column, arrow_contract
from keyturn.directory import LOOKUP_BATCH, DekDirectory, DekEntry, WrappingSwap, new_entry
from keyturn.errors import (
    ConcurrentModificationError,
    ContractError,
    DirectoryError,
    RegistryError,
    VersionInUseError,
)
from keyturn.format import Envelope, derive_commitment, kms_context, parse_envelope
from keyturn.kms.local import LocalKms
from keyturn.registry.base import KeyState
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.rewrap import rewrap_envelope
from keyturn.scope import DekScope, KekRef, Location

A = KeyState.ACTIVE
D = KeyState.DECRYPT_ONLY
R = KeyState.RETIRED
P = KeyState.PENDING_DELETION

WHO = {"actor": "alice", "reason": "test"}
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc)
DS = "sales"
PART = "day=2024-01-01"


class DictInventory:
    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts = dict(counts or {})

    def references(self, version: int) -> int:
        return self.counts.get(version, 0)


EMPTY = DictInventory()


# --------------------------------------------------------------------------- envelopes


class Keys:
    """Real DEK envelopes from an in-memory LocalKms: version n is wrapped under ``kek-n``."""

    def __init__(self) -> None:
        self.kms = LocalKms.in_memory({k: os.urandom(32) for k in ("kek-1", "kek-2", "kek-3", "kek-other")})

    def envelope(
        self, version: int, *, kek_id: str | None = None, dataset: str = DS, partition: str = PART, dek_id: bytes | None = None
    ) -> bytes:
        kek_id = kek_id or f"kek-{version}"
        dek_id = os.urandom(16) if dek_id is None else dek_id
        context = kms_context(dataset=dataset, partition=partition, dek_id=dek_id, key_version=version)
        generated = self.kms.generate_data_key(kek_id, context)
        try:
            commitment = derive_commitment(generated.plaintext.material, dek_id)
        finally:
            generated.plaintext.wipe()
        return Envelope(dek_id, version, kek_id, commitment, generated.wrapped).to_bytes()

    def entry(self, version: int, *, created_at: datetime = T0, actor: str = "writer", contract_revision: int = 1, **kw: Any) -> DekEntry:
        envelope = self.envelope(version, **kw)
        return new_entry(
            envelope,
            dataset=kw.get("dataset", DS),
            partition=kw.get("partition", PART),
            created_at=created_at,
            actor=actor,
            contract_revision=contract_revision,
        )

    def entries(self, version: int, n: int) -> list[DekEntry]:
        return [self.entry(version) for _ in range(n)]

    def rewrap(self, entry: DekEntry, version: int) -> bytes:
        """`entry`'s current envelope re-wrapped under `version` (``kek-<version>``)."""
        new, _ = rewrap_envelope(
            self.kms, entry.envelope, Location(entry.dataset, entry.partition), KekRef(version, f"kek-{version}")
        )
        return new


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


# --------------------------------------------------------------------------- backends


@pytest.fixture
def table(moto_url) -> str:
    """A fresh table per test (moto copies the whole table on every transaction)."""
    name = unique("keyturn-directory")
    assert create_table(name, client=client("dynamodb", moto_url)) is True
    return name


class Backend:
    """Builds registries of one kind, and edits their storage behind their back where a test needs to."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None, table: str | None) -> None:
        self.kind = kind
        self.db = tmp_path / "registry.sqlite"
        self.url = url
        self.table = table
        self.name = unique("reg")
        self.ddb = client("dynamodb", url) if url else None

    def new(self, clock: Callable[[], datetime] | None = None) -> Any:
        kwargs = {} if clock is None else {"clock": clock}
        if self.kind == "sqlite":
            return SqliteKeyRegistry(self.db, **kwargs)
        return DynamoDbKeyRegistry(self.table, name=self.name, client=client("dynamodb", self.url), **kwargs)

    def force_version(self, dek_id: bytes, old: int, new: int) -> None:
        """Make the directory say `dek_id` is under `new` (a state no API call can reach; for defence-in-depth tests)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as conn:
                conn.execute("UPDATE deks SET key_version = ? WHERE dek_id = ?", (new, dek_id))
            return

        def count(version: int, delta: int) -> dict:
            return {
                "Update": {
                    "TableName": self.table,
                    "Key": {"pk": {"S": f"{self.name}#dek#n"}, "sk": {"S": f"n#{version:010d}"}},
                    "UpdateExpression": "ADD #c :d",
                    "ExpressionAttributeNames": {"#c": "count"},
                    "ExpressionAttributeValues": {":d": {"N": str(delta)}},
                }
            }

        entry = {
            "Update": {
                "TableName": self.table,
                "Key": {"pk": {"S": f"{self.name}#dek"}, "sk": {"S": "e#" + dek_id.hex()}},
                "UpdateExpression": "SET key_version = :v",
                "ExpressionAttributeValues": {":v": {"N": str(new)}},
            }
        }
        self.ddb.transact_write_items(TransactItems=[entry, count(old, -1), count(new, 1)])


@pytest.fixture(params=["sqlite", pytest.param("dynamodb", marks=pytest.mark.aws)])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path, None, None)
    url = request.getfixturevalue("moto_url")
    return Backend("dynamodb", tmp_path, url, request.getfixturevalue("table"))


@pytest.fixture
def reg(backend: Backend) -> Any:
    return backend.new()


def with_versions(reg: Any, n: int) -> Any:
    """Versions 1..n (kek-1..kek-n), n active."""
    reg.initialize("kek-1", **WHO)
    for v in range(2, n + 1):
        reg.rotate(f"kek-{v}", **WHO)
    return reg


def ids(entries: list[DekEntry]) -> list[bytes]:
    return [e.dek_id for e in entries]


# --------------------------------------------------------------------------- registration and lookup


def test_satisfies_the_directory_protocol(reg) -> None:
    assert isinstance(reg, DekDirectory)


def test_register_and_lookup(reg, keys) -> None:
    with_versions(reg, 1)
    a = keys.entry(1, contract_revision=3)
    b = keys.entry(1, partition="")  # an unpartitioned dataset
    c = keys.entry(1, dataset="other", actor="")
    reg.register_deks([a, b, c])
    missing = os.urandom(16)
    found = reg.lookup_deks(iter([a.dek_id, b.dek_id, c.dek_id, missing, a.dek_id]))
    assert found == {a.dek_id: a, b.dek_id: b, c.dek_id: c}  # every field round-trips
    assert found[a.dek_id].contract_revision == 3 and found[b.dek_id].partition == ""
    assert found[a.dek_id].created_at == T0 and found[a.dek_id].created_at.tzinfo is not None
    assert found[a.dek_id].parsed() == parse_envelope(a.envelope)
    assert reg.lookup_deks([missing]) == {}
    assert reg.lookup_deks([]) == {}
    assert reg.dek_count() == 3


def test_lookup_of_more_than_one_batch(backend, keys) -> None:
    reg = with_versions(backend.new(), 1)
    entries = keys.entries(1, LOOKUP_BATCH + 30)
    reg.register_deks(entries)  # more than one DynamoDB transaction's worth, in one call
    assert reg.dek_count(1) == len(entries)
    absent = [os.urandom(16) for _ in range(20)]
    counter = AttemptCounter(reg.client) if backend.kind == "dynamodb" else None
    found = reg.lookup_deks(ids(entries) + absent)
    assert found == {e.dek_id: e for e in entries}
    if counter is not None:  # 150 ids: two BatchGetItem requests, nothing else
        assert dict(counter.by_operation) == {"BatchGetItem": 2}


def test_identical_reregistration_is_a_noop(reg, keys) -> None:
    with_versions(reg, 1)
    a, b, c = keys.entries(1, 3)
    reg.register_deks([a, b])
    reg.register_deks([a, b])
    later_b = DekEntry(**{**{f: getattr(b, f) for f in DekEntry.__slots__}, "created_at": T0 + timedelta(days=1), "actor": "bob"})
    reg.register_deks([later_b, c, c])  # same birth: b stays as first registered; c given twice is one entry
    assert reg.dek_count(1) == 3 and reg.deks_by_version() == {1: 3}
    assert reg.lookup_deks([a.dek_id, b.dek_id, c.dek_id]) == {a.dek_id: a, b.dek_id: b, c.dek_id: c}


def test_same_dek_id_with_another_birth_is_refused(reg, keys) -> None:
    with_versions(reg, 1)
    a = keys.entry(1)
    reg.register_deks([a])
    impostor = keys.entry(1, dek_id=a.dek_id)  # same id, another DEK (another commitment)
    elsewhere = new_entry(a.envelope, dataset="other", partition=PART, created_at=T0, actor="x")  # same envelope, another dataset
    c = keys.entry(1)
    for bad in (impostor, elsewhere):
        with pytest.raises(DirectoryError, match="birth"):
            reg.register_deks([c, bad])
    with pytest.raises(DirectoryError, match="birth"):
        reg.register_deks([c, keys.entry(1, dek_id=c.dek_id)])  # the conflict inside one call
    assert reg.lookup_deks([a.dek_id, c.dek_id]) == {a.dek_id: a}  # nothing of the refused calls was written
    assert reg.dek_count() == 1


def test_registration_needs_a_readable_version(reg, keys) -> None:
    with_versions(reg, 3)
    reg.retire(1, **WHO)
    with pytest.raises(DirectoryError, match="not readable"):
        reg.register_deks([keys.entry(1)])
    with pytest.raises(DirectoryError, match="not in the registry"):
        reg.register_deks([keys.entry(9, kek_id="kek-3")])
    good = keys.entry(3)
    with pytest.raises(DirectoryError, match="not readable"):
        reg.register_deks([good, keys.entry(1)])  # one bad entry refuses the whole call
    reg.schedule_deletion(1, inventory=EMPTY, pending_days=1, **WHO)
    with pytest.raises(DirectoryError, match="not readable"):
        reg.register_deks([keys.entry(1)])
    assert reg.dek_count() == 0 and reg.lookup_deks([good.dek_id]) == {}
    old = keys.entry(2)  # decrypt_only is readable: a late writer may still register under it
    reg.register_deks([old, good])
    assert reg.deks_by_version() == {2: 1, 3: 1}


def test_registration_in_an_empty_registry_is_refused(reg, keys) -> None:
    with pytest.raises(DirectoryError, match="not in the registry"):
        reg.register_deks([keys.entry(1)])


def test_wrong_kek_id_is_refused(reg, keys) -> None:
    with_versions(reg, 2)
    with pytest.raises(DirectoryError, match="names KEK 'kek-other'"):
        reg.register_deks([keys.entry(2, kek_id="kek-other")])
    with pytest.raises(DirectoryError, match="names KEK 'kek-1'"):
        reg.register_deks([keys.entry(2, kek_id="kek-1")])  # a real KEK, but not version 2's
    assert reg.dek_count() == 0


# --------------------------------------------------------------------------- listing and counting


def test_list_deks_pages_in_dek_id_order(reg, keys) -> None:
    with_versions(reg, 1)
    under_1 = keys.entries(1, 7)
    reg.register_deks(under_1)
    reg.rotate("kek-2", **WHO)
    under_2 = keys.entries(2, 5)
    reg.register_deks(under_2)
    moved = sorted(under_1, key=lambda e: e.dek_id)[2:4]
    for e in moved:
        assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 2))
    everything = sorted(ids(under_1 + under_2))
    assert ids(reg.list_deks()) == everything

    def paged(**kw: Any) -> list[bytes]:
        out: list[bytes] = []
        after = None
        for _ in range(len(everything)):  # bounded: a listing that ignores `after` fails instead of looping
            page = reg.list_deks(after=after, limit=3, **kw)
            assert len(page) <= 3 and all(after is None or e.dek_id > after for e in page)
            out += ids(page)
            if len(page) < 3:
                return out
            after = page[-1].dek_id
        raise AssertionError("paging never ended")

    assert paged() == everything
    v1 = sorted(set(ids(under_1)) - set(ids(moved)))
    v2 = sorted(ids(under_2 + moved))
    assert ids(reg.list_deks(key_version=1)) == v1 and paged(key_version=1) == v1
    assert ids(reg.list_deks(key_version=2)) == v2 and paged(key_version=2) == v2
    listed = {e.dek_id: e for e in reg.list_deks(key_version=2)}
    assert all(listed[e.dek_id].envelope != e.envelope and listed[e.dek_id].key_version == 2 for e in moved)
    assert reg.list_deks(key_version=3) == []
    assert ids(reg.list_deks(after=bytes(16))) == everything
    assert reg.list_deks(after=b"\xff" * 16) == []
    middle = everything[5]
    assert ids(reg.list_deks(after=middle)) == everything[6:]
    assert ids(reg.list_deks(after=middle + b"\x00")) == everything[6:]  # an after that is not an id
    assert ids(reg.list_deks(key_version=2, after=v2[1], limit=2)) == v2[2:4]
    with pytest.raises(ValueError):
        reg.list_deks(limit=0)


def test_counts_are_exact_after_register_and_rewrap(reg, keys) -> None:
    with_versions(reg, 1)
    first = keys.entries(1, 4)
    reg.register_deks(first)
    assert (reg.dek_count(1), reg.dek_count(2), reg.dek_count()) == (4, 0, 4)
    reg.rotate("kek-2", **WHO)
    reg.register_deks(keys.entries(2, 3))
    assert reg.deks_by_version() == {1: 4, 2: 3}
    for i, e in enumerate(first, start=1):
        reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 2))
        assert reg.deks_by_version() == ({1: 4 - i, 2: 3 + i} if i < 4 else {2: 7})
        assert reg.dek_count() == 7
    assert (reg.dek_count(1), reg.dek_count(2), reg.dek_count(3)) == (0, 7, 0)


# --------------------------------------------------------------------------- rewrap


def test_replace_wrapping_is_compare_and_set(reg, keys) -> None:
    with_versions(reg, 1)
    e, other = keys.entries(1, 2)
    reg.register_deks([e, other])
    reg.rotate("kek-2", **WHO)
    first, second = keys.rewrap(e, 2), keys.rewrap(e, 2)
    assert first != second  # each rewrap wraps afresh
    assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=first) is True
    stored = reg.lookup_deks([e.dek_id])[e.dek_id]
    assert (stored.envelope, stored.key_version) == (first, 2)
    assert (stored.birth_version, stored.birth_commitment, stored.created_at, stored.dataset) == (
        1, e.birth_commitment, e.created_at, e.dataset,
    )
    # a second rewrapper that read the entry before the first moved it loses
    assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=second) is False
    assert reg.lookup_deks([e.dek_id])[e.dek_id] == stored
    assert reg.deks_by_version() == {1: 1, 2: 1}
    with pytest.raises(DirectoryError, match="another dek_id"):
        reg.replace_wrapping(e.dek_id, expected_envelope=first, new_envelope=keys.rewrap(other, 2))
    with pytest.raises(DirectoryError, match="does not parse"):
        reg.replace_wrapping(e.dek_id, expected_envelope=first, new_envelope=b"\x01garbage")
    with pytest.raises(DirectoryError, match="not in the directory"):
        reg.replace_wrapping(os.urandom(16), expected_envelope=first, new_envelope=first)
    assert reg.lookup_deks([e.dek_id])[e.dek_id] == stored
    assert reg.deks_by_version() == {1: 1, 2: 1}


def test_replace_wrappings_swaps_each_entry_on_its_own_compare_and_set(reg, keys) -> None:
    with_versions(reg, 1)
    a, b, c = keys.entries(1, 3)
    reg.register_deks([a, b, c])
    reg.rotate("kek-2", **WHO)
    ahead = keys.rewrap(b, 2)
    assert reg.replace_wrapping(b.dek_id, expected_envelope=b.envelope, new_envelope=ahead)  # another rewrapper, first
    onto = {e.dek_id: keys.rewrap(e, 2) for e in (a, b, c)}
    moved = reg.replace_wrappings([WrappingSwap(e.dek_id, e.envelope, onto[e.dek_id]) for e in (a, b, c)])
    assert moved == [True, False, True]  # b lost its race and keeps the envelope that won it
    stored = reg.lookup_deks([a.dek_id, b.dek_id, c.dek_id])
    assert [stored[e.dek_id].envelope for e in (a, b, c)] == [onto[a.dek_id], ahead, onto[c.dek_id]]
    assert reg.deks_by_version() == {2: 3}
    assert reg.replace_wrappings([]) == []


def test_an_error_in_a_batch_of_swaps_makes_none_of_them_where_the_batch_is_one_write(reg, keys) -> None:
    with_versions(reg, 1)
    a, b = keys.entries(1, 2)
    reg.register_deks([a, b])
    reg.rotate("kek-2", **WHO)
    swaps = [WrappingSwap(a.dek_id, a.envelope, keys.rewrap(a, 2)), WrappingSwap(os.urandom(16), b.envelope, keys.rewrap(b, 2))]
    with pytest.raises(DirectoryError, match="not in the directory"):
        reg.replace_wrappings(swaps)
    # one transaction (SQLite): the good swap before the bad one was rolled back with it; one write per
    # swap (DynamoDB, swap_batch 1): it stays made, as a lone replace_wrapping would
    assert reg.deks_by_version() == ({1: 2} if reg.swap_batch > 1 else {1: 1, 2: 1})
    assert reg.swap_batch == (256 if isinstance(reg, SqliteKeyRegistry) else 1)


def test_rewrap_onto_a_version_that_is_not_readable_is_refused(reg, keys) -> None:
    with_versions(reg, 1)
    e = keys.entry(1)
    reg.register_deks([e])
    reg.rotate("kek-2", **WHO)
    reg.rotate("kek-3", **WHO)
    reg.retire(2, **WHO)
    with pytest.raises(DirectoryError, match="not readable"):
        reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 2))
    unknown = parse_envelope(keys.rewrap(e, 3)).with_wrapping(key_version=7, kek_id="kek-3", wrapped_dek=b"x" * 61)
    with pytest.raises(DirectoryError, match="not in the registry"):
        reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=unknown.to_bytes())
    assert reg.lookup_deks([e.dek_id])[e.dek_id] == e and reg.deks_by_version() == {1: 1}
    assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 3)) is True
    assert reg.deks_by_version() == {3: 1}


# --------------------------------------------------------------------------- lifecycle guarded by the directory


def test_retire_is_refused_while_entries_are_under_the_version(reg, keys) -> None:
    with_versions(reg, 1)
    entries = keys.entries(1, 3)
    reg.register_deks(entries)
    reg.rotate("kek-2", **WHO)
    before = reg.history()
    for left, e in zip((3, 2, 1), entries):
        with pytest.raises(VersionInUseError, match=f"holds {left} DEK"):
            reg.retire(1, inventory=EMPTY, **WHO)
        assert reg.get(1).state is D and reg.history() == before
        assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 2))
    assert reg.retire(1, inventory=EMPTY, **WHO).state is R
    reg.rotate("kek-3", **WHO)
    with pytest.raises(VersionInUseError, match="holds 3 DEK"):  # version 2 now holds them all
        reg.retire(2, **WHO)


def test_schedule_deletion_is_refused_while_entries_are_under_the_version(backend, keys) -> None:
    """No API call leaves entries under a retired version (registration and rewrap need a readable one),
    so the state is made behind the registry's back: schedule_deletion must still refuse it."""
    reg = with_versions(backend.new(), 2)
    reg.retire(1, **WHO)
    e = keys.entry(2)
    reg.register_deks([e])
    backend.force_version(e.dek_id, 2, 1)
    assert reg.dek_count(1) == 1
    with pytest.raises(VersionInUseError, match="holds 1 DEK"):
        reg.schedule_deletion(1, inventory=EMPTY, pending_days=7, **WHO)
    got = reg.get(1)
    assert got.state is R and got.delete_after is None
    backend.force_version(e.dek_id, 1, 2)
    assert reg.schedule_deletion(1, inventory=EMPTY, pending_days=7, **WHO).state is P


def test_reinstated_version_takes_entries_and_then_guards_them(reg, keys) -> None:
    with_versions(reg, 2)
    reg.retire(1, **WHO)
    reg.reinstate(1, **WHO)
    e = keys.entry(2)
    reg.register_deks([e])
    assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 1))
    assert reg.deks_by_version() == {1: 1}
    with pytest.raises(VersionInUseError):
        reg.retire(1, **WHO)


# --------------------------------------------------------------------------- rotations with expect_active


def test_rotate_with_a_stale_expect_active_changes_nothing(reg) -> None:
    with_versions(reg, 1)
    assert reg.rotate("kek-2", expect_active=1, **WHO).version == 2
    versions, history = reg.versions(), reg.history()
    with pytest.raises(ConcurrentModificationError, match="version 2 is active"):
        reg.rotate("kek-3", expect_active=1, **WHO)
    assert reg.versions() == versions and reg.history() == history
    assert reg.rotate("kek-3", expect_active=2, **WHO).version == 3
    assert reg.rotate("kek-4", **WHO).version == 4  # without expect_active, as before


def test_concurrent_rotations_commit_once_per_expected_active(backend) -> None:
    """Each round every thread reads the active version, then all rotate expecting it: exactly one wins."""
    with_versions(backend.new(), 1)
    workers, rounds = 4, 4
    regs = [backend.new() for _ in range(workers)]  # each its own client (built here, on the main thread)
    barrier = threading.Barrier(workers)
    wins: list[tuple[int, int, int]] = []  # (round, expected, new)
    losses: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(w: int) -> None:
        try:
            for r in range(rounds):
                expected = regs[w].active().version
                barrier.wait(timeout=60)
                try:
                    new = regs[w].rotate(f"kek-r{r}-w{w}", expect_active=expected, actor=f"worker-{w}", reason=f"round {r}")
                except ConcurrentModificationError:
                    with lock:
                        losses.append((r, expected))
                else:
                    with lock:
                        wins.append((r, expected, new.version))
                barrier.wait(timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(r for r, _, _ in wins) == list(range(rounds))  # one winner per round
    assert all(new == expected + 1 for _, expected, new in wins)
    assert len({expected for _, expected, _ in wins}) == rounds  # never two commits for one expected active
    assert len(losses) == rounds * (workers - 1)
    versions = regs[0].check()
    assert [v.version for v in versions] == list(range(1, rounds + 2))  # gap-free
    assert [v.version for v in versions if v.state is A] == [rounds + 1]
    hist = regs[0].history()
    assert sorted(h["version"] for h in hist if h["from_state"] is A) == list(range(1, rounds + 1))


# --------------------------------------------------------------------------- dataset contracts


SCHEMA = pa.schema([("id", pa.int64()), ("ssn", pa.string()), ("email", pa.string()), ("phone", pa.string())])


def contract(dataset: str = DS, columns: tuple[str, ...] = ("ssn",)) -> DatasetContract:
    return arrow_contract(dataset, SCHEMA, list(columns), bind=["id"])


def column(name: str) -> ContractColumn:
    return arrow_contract(DS, SCHEMA, [name]).columns[0]


def test_contracts_pin_get_evolve_history(reg) -> None:
    assert reg.get_contract(DS) is None and reg.contract_history(DS) == []
    c1 = contract()
    assert reg.pin_contract(c1, actor="alice", reason="first write") == c1
    assert reg.get_contract(DS) == c1
    assert reg.pin_contract(contract(columns=("email",)), actor="bob", reason="second first write") == c1  # stored wins
    nested = contract(dataset=DS + "#eu")  # a dataset whose name extends this one's
    reg.pin_contract(nested, actor="carol", reason="other dataset")
    c2 = add_column(c1, column("email"))
    assert reg.evolve_contract(c2, expected_revision=1, actor="dave", reason="add email") == c2
    assert reg.get_contract(DS) == c2 and c2.revision == 2 and c2.required_at(1) == ["ssn"]
    hist = reg.contract_history(DS)
    assert [(h["revision"], h["contract"], h["actor"], h["reason"]) for h in hist] == [
        (1, c1, "alice", "first write"),
        (2, c2, "dave", "add email"),
    ]
    assert all(h["at"].tzinfo is not None for h in hist)
    assert [h["contract"] for h in reg.contract_history(DS + "#eu")] == [nested]
    assert reg.get_contract(DS + "#eu") == nested


def test_evolve_with_a_stale_revision_is_refused(reg) -> None:
    c1 = reg.pin_contract(contract(), **WHO)
    c2 = reg.evolve_contract(add_column(c1, column("email")), expected_revision=1, **WHO)
    with pytest.raises(ConcurrentModificationError, match="revision 2"):
        reg.evolve_contract(add_column(c1, column("phone")), expected_revision=1, **WHO)  # built from a stale read
    skipping = dataclasses.replace(add_column(c2, column("phone")), revision=4)
    with pytest.raises(ConcurrentModificationError):
        reg.evolve_contract(skipping, expected_revision=2, **WHO)  # revision 4 on top of 2
    assert reg.get_contract(DS) == c2 and [h["revision"] for h in reg.contract_history(DS)] == [1, 2]
    with pytest.raises(ContractError, match="no contract yet"):
        reg.evolve_contract(add_column(contract("nowhere"), column("email")), expected_revision=1, **WHO)
    with pytest.raises(ContractError, match="revision 1"):
        reg.pin_contract(add_column(contract("fresh"), column("email")), **WHO)
    assert reg.get_contract("nowhere") is None and reg.get_contract("fresh") is None


def test_racing_first_writers_agree_on_one_contract(backend) -> None:
    regs = [backend.new() for _ in range(4)]
    proposals = [contract(columns=(col,)) for col in ("ssn", "email", "phone", "ssn")]
    barrier = threading.Barrier(len(regs))
    got: list[DatasetContract] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            got.append(regs[i].pin_contract(proposals[i], actor=f"w{i}", reason="first write"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(regs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(got) == 4 and len({c.to_text() for c in got}) == 1
    assert regs[0].get_contract(DS) == got[0]
    assert len(regs[0].contract_history(DS)) == 1


# --------------------------------------------------------------------------- DynamoDB only


@pytest.fixture
def ddb(moto_url):
    return client("dynamodb", moto_url)


def dynamo(ddb: Any, table: str, name: str, **kw: Any) -> DynamoDbKeyRegistry:
    return DynamoDbKeyRegistry(table, name=name, client=client("dynamodb", ddb.meta.endpoint_url), **kw)


def raw_partition(ddb: Any, table: str, pk: str) -> dict[str, dict]:
    items = ddb.query(
        TableName=table, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": pk}}, ConsistentRead=True
    )["Items"]
    return {i["sk"]["S"]: i for i in items}


class HookClock:
    """A clock that runs `hook` (once) the first time it is read: between a write's read and its commit."""

    def __init__(self) -> None:
        self.hook: Callable[[], None] | None = None

    def __call__(self) -> datetime:
        hook, self.hook = self.hook, None
        if hook is not None:
            hook()
        return datetime.now(timezone.utc)


@pytest.mark.aws
def test_item_layout(ddb, table, keys) -> None:
    name = unique("layout")
    reg = with_versions(dynamo(ddb, table, name), 1)
    a, b = keys.entries(1, 2)
    reg.register_deks([a, b])
    reg.rotate("kek-2", **WHO)
    reg.replace_wrapping(a.dek_id, expected_envelope=a.envelope, new_envelope=keys.rewrap(a, 2))
    reg.pin_contract(contract(), **WHO)
    main = raw_partition(ddb, table, name)
    assert sorted(main) == ["#head", "h#000000000001", "h#000000000002", "h#000000000003", "v#0000000001", "v#0000000002"]
    assert main["#head"]["schema"]["N"] == "1"  # the directory only adds items
    entries = raw_partition(ddb, table, f"{name}#dek")
    assert sorted(entries) == sorted("e#" + e.dek_id.hex() for e in (a, b))
    assert entries["e#" + a.dek_id.hex()]["key_version"]["N"] == "2"
    assert entries["e#" + a.dek_id.hex()]["envelope"]["B"] != a.envelope
    assert sorted(raw_partition(ddb, table, f"{name}#dek#v0000000001")) == ["x#" + b.dek_id.hex()]
    assert sorted(raw_partition(ddb, table, f"{name}#dek#v0000000002")) == ["x#" + a.dek_id.hex()]
    counts = raw_partition(ddb, table, f"{name}#dek#n")
    assert {sk: i["count"]["N"] for sk, i in counts.items()} == {"n#0000000001": "1", "n#0000000002": "1"}
    contracts = raw_partition(ddb, table, f"{name}#contract")
    assert sorted(contracts) == [f"c#{DS}", f"ch#{DS}#0000000001"]
    assert DatasetContract.from_text(contracts[f"c#{DS}"]["contract"]["S"]) == contract()


@pytest.mark.aws
def test_a_registration_during_a_retire_makes_the_retire_refuse(ddb, table, keys) -> None:
    """The counter is read before the inventory runs; a DEK registered right then must still stop the retire."""
    name = unique("race-retire")
    reg = with_versions(dynamo(ddb, table, name), 2)
    other = dynamo(ddb, table, name)
    late = keys.entry(1)

    class RegisteringInventory:
        asked = 0

        def references(self, version: int) -> int:
            RegisteringInventory.asked += 1
            if RegisteringInventory.asked == 1:
                other.register_deks([late])
            return 0

    with pytest.raises(VersionInUseError, match="holds 1 DEK"):
        reg.retire(1, inventory=RegisteringInventory(), **WHO)
    assert RegisteringInventory.asked == 1  # the retry saw the counter and refused before the inventory
    assert reg.get(1).state is D
    assert reg.lookup_deks([late.dek_id]) == {late.dek_id: late} and reg.dek_count(1) == 1


@pytest.mark.aws
def test_a_rewrap_during_a_retire_makes_the_retire_refuse(ddb, table, keys) -> None:
    name = unique("race-rewrap")
    reg = with_versions(dynamo(ddb, table, name), 1)
    e = keys.entry(1)
    reg.register_deks([e])
    reg.rotate("kek-2", **WHO)
    reg.rotate("kek-3", **WHO)
    other = dynamo(ddb, table, name)
    onto_2 = keys.rewrap(e, 2)

    class RewrappingInventory:
        def references(self, version: int) -> int:
            assert other.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=onto_2)
            return 0

    with pytest.raises(VersionInUseError, match="holds 1 DEK"):
        reg.retire(2, inventory=RewrappingInventory(), **WHO)
    assert reg.get(2).state is D and reg.deks_by_version() == {2: 1}


@pytest.mark.aws
def test_a_retire_during_a_registration_makes_the_registration_refuse(ddb, table, keys) -> None:
    """The registration read version 1 as decrypt_only; it is retired before the registration commits."""
    name = unique("race-register")
    clock = HookClock()
    reg = with_versions(dynamo(ddb, table, name, clock=clock), 2)
    other = dynamo(ddb, table, name)
    e = keys.entry(1)
    clock.hook = lambda: other.retire(1, **WHO)
    with pytest.raises(DirectoryError, match="not readable"):
        reg.register_deks([e])
    assert clock.hook is None  # the retire really ran in between
    assert reg.get(1).state is R
    assert reg.lookup_deks([e.dek_id]) == {} and reg.dek_count() == 0 and reg.deks_by_version() == {}
    assert reg.list_deks(key_version=1) == []


@pytest.mark.aws
def test_a_retire_during_a_rewrap_makes_the_rewrap_refuse(ddb, table, keys) -> None:
    name = unique("race-rewrap-target")
    clock = HookClock()
    reg = with_versions(dynamo(ddb, table, name, clock=clock), 1)
    e = keys.entry(1)
    reg.register_deks([e])
    reg.rotate("kek-2", **WHO)
    reg.rotate("kek-3", **WHO)
    other = dynamo(ddb, table, name)
    clock.hook = lambda: other.retire(2, **WHO)
    with pytest.raises(DirectoryError, match="not readable"):
        reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=keys.rewrap(e, 2))
    assert clock.hook is None and reg.get(2).state is R
    assert reg.lookup_deks([e.dek_id])[e.dek_id] == e and reg.deks_by_version() == {1: 1}


@pytest.mark.aws
def test_a_rewrap_that_loses_the_race_returns_false(ddb, table, keys) -> None:
    name = unique("race-cas")
    clock = HookClock()
    reg = with_versions(dynamo(ddb, table, name, clock=clock), 1)
    e = keys.entry(1)
    reg.register_deks([e])
    reg.rotate("kek-2", **WHO)
    other = dynamo(ddb, table, name)
    theirs, ours = keys.rewrap(e, 2), keys.rewrap(e, 2)
    clock.hook = lambda: other.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=theirs)
    assert reg.replace_wrapping(e.dek_id, expected_envelope=e.envelope, new_envelope=ours) is False
    assert clock.hook is None
    assert reg.lookup_deks([e.dek_id])[e.dek_id].envelope == theirs and reg.deks_by_version() == {2: 1}


class UnprocessedKeys:
    """Answers chosen BatchGetItem attempts as DynamoDB does under load: nothing returned, every key unprocessed."""

    def __init__(self, boto_client: Any, decide: Callable[[int], bool]) -> None:
        self.decide = decide
        self.attempts = 0
        self.answered = 0
        boto_client.meta.events.register("before-send.dynamodb.BatchGetItem", self._before_send, unique_id=uuid.uuid4().hex)

    def _before_send(self, request: Any, **_: Any) -> AWSResponse | None:
        index = self.attempts
        self.attempts += 1
        if not self.decide(index):
            return None
        self.answered += 1
        asked = json.loads(request.body)["RequestItems"]
        body = json.dumps({"Responses": {t: [] for t in asked}, "UnprocessedKeys": asked}).encode()
        headers = {"x-amzn-RequestId": uuid.uuid4().hex, "Content-Type": "application/x-amz-json-1.0", "Content-Length": str(len(body))}

        class Raw:
            def stream(self, **_: Any):
                yield body

        return AWSResponse(request.url, 200, headers, Raw())


@pytest.mark.aws
def test_unprocessed_keys_are_retried(ddb, table, keys) -> None:
    name = unique("unprocessed")
    reg = with_versions(dynamo(ddb, table, name), 1)
    entries = keys.entries(1, 3)
    reg.register_deks(entries)
    hook = UnprocessedKeys(reg.client, lambda i: i < 2)
    assert reg.lookup_deks(ids(entries)) == {e.dek_id: e for e in entries}
    assert (hook.attempts, hook.answered) == (3, 2)


@pytest.mark.aws
def test_unprocessed_keys_past_the_budget_are_a_registry_error(ddb, table, keys) -> None:
    name = unique("unprocessed-forever")
    reg = with_versions(dynamo(ddb, table, name), 1)
    e = keys.entry(1)
    reg.register_deks([e])
    hook = UnprocessedKeys(reg.client, lambda i: True)
    with pytest.raises(RegistryError, match="unprocessed"):
        reg.lookup_deks([e.dek_id])
    assert 1 < hook.attempts <= 10  # bounded


@pytest.mark.aws
def test_directories_of_registries_sharing_a_table_are_separate(ddb, table, keys) -> None:
    a = with_versions(dynamo(ddb, table, unique("a")), 1)
    b = with_versions(dynamo(ddb, table, unique("b")), 1)
    ea, eb = keys.entry(1), keys.entry(1)
    a.register_deks([ea])
    b.register_deks([eb])
    assert a.lookup_deks([ea.dek_id, eb.dek_id]) == {ea.dek_id: ea}
    assert ids(b.list_deks()) == [eb.dek_id] and b.deks_by_version() == {1: 1}
    a.pin_contract(contract(), **WHO)
    assert b.get_contract(DS) is None


@pytest.mark.aws
@pytest.mark.parametrize("same_birth", [True, False], ids=["identical", "another-birth"])
def test_a_registration_of_the_same_dek_in_between(ddb, table, keys, same_birth: bool) -> None:
    """Another writer registers the dek_id after our lookup, before our commit: ours must not overwrite or double-count."""
    name = unique("race-same-dek")
    clock = HookClock()
    reg = with_versions(dynamo(ddb, table, name, clock=clock), 1)
    other = dynamo(ddb, table, name)
    ours = keys.entry(1)
    theirs = ours if same_birth else keys.entry(1, dek_id=ours.dek_id)
    clock.hook = lambda: other.register_deks([theirs])
    if same_birth:
        reg.register_deks([ours])
    else:
        with pytest.raises(DirectoryError, match="another birth"):
            reg.register_deks([ours])
    assert clock.hook is None
    assert reg.lookup_deks([ours.dek_id]) == {ours.dek_id: theirs}
    assert reg.dek_count(1) == 1 and ids(reg.list_deks(key_version=1)) == [ours.dek_id]


@pytest.mark.aws
def test_a_first_contract_pinned_in_between_wins(ddb, table) -> None:
    name = unique("race-pin")
    clock = HookClock()
    reg = dynamo(ddb, table, name, clock=clock)
    other = dynamo(ddb, table, name)
    theirs, ours = contract(columns=("email",)), contract(columns=("ssn",))
    clock.hook = lambda: other.pin_contract(theirs, actor="bob", reason="first")
    assert reg.pin_contract(ours, actor="alice", reason="also first") == theirs
    assert clock.hook is None
    assert reg.get_contract(DS) == theirs
    assert [(h["revision"], h["actor"]) for h in reg.contract_history(DS)] == [(1, "bob")]


@pytest.mark.aws
def test_a_contract_evolved_in_between_refuses_ours(ddb, table) -> None:
    name = unique("race-evolve")
    clock = HookClock()
    reg = dynamo(ddb, table, name, clock=clock)
    other = dynamo(ddb, table, name)
    c1 = other.pin_contract(contract(), **WHO)
    theirs, ours = add_column(c1, column("email")), add_column(c1, column("phone"))
    clock.hook = lambda: other.evolve_contract(theirs, expected_revision=1, actor="bob", reason="email")
    with pytest.raises(ConcurrentModificationError, match="revision 2"):
        reg.evolve_contract(ours, expected_revision=1, actor="alice", reason="phone")
    assert clock.hook is None
    assert reg.get_contract(DS) == theirs
    assert [(h["revision"], h["actor"]) for h in reg.contract_history(DS)] == [(1, "alice"), (2, "bob")]


def test_a_dek_made_under_an_older_contract_revision_is_refused(tmp_path):
    """A writer that read the contract before add-column committed may not register DEKs under the old revision."""
    from keyturn.contract import ContractColumn, add_column, arrow_contract
    from keyturn.errors import ContractError
    from keyturn.registry.sqlite import SqliteKeyRegistry

    import pyarrow as pa

    registry = SqliteKeyRegistry(str(tmp_path / "r.sqlite"))
    registry.initialize("kek-1", actor="t", reason="t")
    schema = pa.schema([("email", pa.string()), ("phone", pa.string())])
    first = registry.pin_contract(arrow_contract("ds", schema, ["email"]), actor="t", reason="t")
    phone = arrow_contract("ds", schema, ["phone"]).columns[0]
    registry.evolve_contract(add_column(first, phone), expected_revision=1, actor="t", reason="add phone")
    kms = LocalKms.in_memory({"kek-1": os.urandom(32)})
    with DekScope(kms, KekRef(1, "kek-1"), Location("ds", "p"), directory=registry, contract_revision=1) as scope:
        with pytest.raises(ContractError, match="revision 1"):
            scope.seal_rows(["email"], [[b"a"]], types=["arrow:string"])
    assert registry.dek_count() == 0
    with DekScope(kms, KekRef(1, "kek-1"), Location("ds", "p"), directory=registry, contract_revision=2) as scope:
        scope.seal_rows(["email"], [[b"a"]], types=["arrow:string"])
    assert registry.dek_count() == 1
