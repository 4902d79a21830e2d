"""DynamoDbKeyRegistry against moto, with the SQLite registry's behaviour tests run on both backends.

The shared bodies (`backend` is ``sqlite`` or ``dynamodb``) mirror
tests/test_registry_sqlite.py: lifecycle, refusals, transitions, damage,
pickling. DynamoDB-only tests cover the conditional transaction (a writer
that sneaks in between read and commit), several registries in one table,
and concurrent rotations from 4 threads.
"""

from __future__ import annotations

import pickle
import sqlite3
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from aws_support import client, moto_url, unique  # noqa: F401  (moto_url is a fixture)

from keyturn.aws.dynamodb_registry import HEAD_SK, DynamoDbKeyRegistry, create_table
from keyturn.errors import (
    ConcurrentModificationError,
    InvalidTransitionError,
    RegistryError,
    RegistryInvariantError,
    UnknownVersionError,
    VersionInUseError,
)
from keyturn.registry.base import ALLOWED_TRANSITIONS, KeyRegistry, KeyState
from keyturn.registry.sqlite import SqliteKeyRegistry

pytestmark = pytest.mark.aws

A = KeyState.ACTIVE
D = KeyState.DECRYPT_ONLY
R = KeyState.RETIRED
P = KeyState.PENDING_DELETION

WHO = {"actor": "alice", "reason": "test"}
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc)


class DictInventory:
    """A real (if tiny) Inventory: references per version from a dict."""

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts = dict(counts or {})
        self.asked: list[int] = []

    def references(self, version: int) -> int:
        self.asked.append(version)
        return self.counts.get(version, 0)


class StepClock:
    """Deterministic clock: T0, then one hour later on every call."""

    def __init__(self, start: datetime = T0, step: timedelta = timedelta(hours=1)) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> datetime:
        current = self.now
        self.now += self.step
        return current


EMPTY = DictInventory()


# --------------------------------------------------------------------------- backends


@pytest.fixture
def table(moto_url) -> str:
    """A fresh table per test (moto copies a whole table on every transaction, so small tables stay fast)."""
    name = unique("keyturn-registry")
    assert create_table(name, client=client("dynamodb", moto_url)) is True
    return name


class Backend:
    """Builds registries of one kind and edits their storage behind their back (for damage tests)."""

    def __init__(self, kind: str, tmp_path: Path, url: str | None, table: str | None) -> None:
        self.kind = kind
        self.db = tmp_path / "registry.sqlite"
        self.url = url
        self.table = table
        self.name = unique("reg")
        self.ddb = client("dynamodb", url) if url else None

    def new(self, clock: Any = None) -> Any:
        kwargs = {} if clock is None else {"clock": clock}
        if self.kind == "sqlite":
            return SqliteKeyRegistry(self.db, **kwargs)
        return DynamoDbKeyRegistry(self.table, name=self.name, client=client("dynamodb", self.url), **kwargs)

    # -- raw edits ---------------------------------------------------------
    def _key(self, sk: str) -> dict:
        return {"pk": {"S": self.name}, "sk": {"S": sk}}

    def set_state(self, version: int, state: str) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as conn:
                conn.execute("UPDATE versions SET state = ? WHERE version = ?", (state, version))
            return
        self.ddb.update_item(
            TableName=self.table,
            Key=self._key(f"v#{version:010d}"),
            UpdateExpression="SET #s = :s",
            ExpressionAttributeNames={"#s": "state"},
            ExpressionAttributeValues={":s": {"S": state}},
        )

    def renumber(self, old: int, new: int) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as conn:
                conn.execute("UPDATE versions SET version = ? WHERE version = ?", (new, old))
            return
        item = self.ddb.get_item(TableName=self.table, Key=self._key(f"v#{old:010d}"))["Item"]
        self.ddb.delete_item(TableName=self.table, Key=self._key(f"v#{old:010d}"))
        item.update({"sk": {"S": f"v#{new:010d}"}, "version": {"N": str(new)}})
        self.ddb.put_item(TableName=self.table, Item=item)

    def stored_created_at(self, version: int) -> str:
        if self.kind == "sqlite":
            with sqlite3.connect(self.db) as conn:
                return conn.execute("SELECT created_at FROM versions WHERE version = ?", (version,)).fetchone()[0]
        return self.ddb.get_item(TableName=self.table, Key=self._key(f"v#{version:010d}"))["Item"]["created_at"]["S"]


@pytest.fixture(params=["sqlite", "dynamodb"])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path, None, None)
    url = request.getfixturevalue("moto_url")
    return Backend("dynamodb", tmp_path, url, request.getfixturevalue("table"))


@pytest.fixture
def reg(backend: Backend) -> Any:
    return backend.new()


def states(reg: Any) -> list[KeyState]:
    return [v.state for v in reg.versions()]


def assert_history_consistent(reg: Any) -> list[dict]:
    """Replaying history from nothing yields exactly the stored states."""
    hist = reg.history()
    replay: dict[int, KeyState] = {}
    for h in hist:
        assert replay.get(h["version"]) == h["from_state"], h
        if h["from_state"] is None:
            assert h["to_state"] is A
        else:
            assert (h["from_state"], h["to_state"]) in ALLOWED_TRANSITIONS, h
        replay[h["version"]] = h["to_state"]
        assert h["at"].tzinfo is not None and h["at"].utcoffset() == timedelta(0)
    assert replay == {v.version: v.state for v in reg.versions()}
    assert [h["id"] for h in hist] == sorted(h["id"] for h in hist)
    return hist


# --------------------------------------------------------------------------- shared behaviour: basics


def test_satisfies_protocol(reg) -> None:
    assert isinstance(reg, KeyRegistry)


def test_empty_registry(reg) -> None:
    assert reg.versions() == []
    assert reg.history() == []
    assert reg.check() == []
    assert reg.due_for_deletion() == []
    with pytest.raises(RegistryError, match="empty"):
        reg.active()
    with pytest.raises(RegistryError, match="initialize"):
        reg.rotate("kek-2", **WHO)
    with pytest.raises(UnknownVersionError):
        reg.get(1)


def test_initialize_is_idempotent(backend) -> None:
    reg = backend.new()
    v1 = reg.initialize("kek-1", actor="alice", reason="bootstrap")
    assert (v1.version, v1.kek_id, v1.state, v1.actor, v1.reason) == (1, "kek-1", A, "alice", "bootstrap")
    assert v1.delete_after is None
    again = backend.new().initialize("kek-other", actor="bob", reason="again")
    assert again == v1
    assert reg.versions() == [v1]
    assert len(reg.history()) == 1
    reg.rotate("kek-2", **WHO)
    assert reg.initialize("kek-1", **WHO).version == 2
    assert len(reg.versions()) == 2


def test_rotate_chain_1_to_5(reg) -> None:
    reg.initialize("kek-1", **WHO)
    for n in range(2, 6):
        new = reg.rotate(f"kek-{n}", actor=f"op{n}", reason=f"rotation {n}")
        assert new.version == n and new.state is A and new.kek_id == f"kek-{n}"
        assert reg.active() == new
    assert [v.version for v in reg.versions()] == [1, 2, 3, 4, 5]
    assert states(reg) == [D, D, D, D, A]
    assert reg.get(3).kek_id == "kek-3"
    hist = assert_history_consistent(reg)
    assert [(h["version"], h["from_state"], h["to_state"]) for h in hist] == [(1, None, A)] + [
        row for n in range(2, 6) for row in ((n - 1, A, D), (n, None, A))
    ]
    assert hist[-1]["actor"] == "op5" and hist[-1]["reason"] == "rotation 5"
    assert reg.check() == reg.versions()


def test_rotation_may_keep_the_kek_id(reg) -> None:
    """The KMS-rotation model: versions share one key id."""
    reg.initialize("alias/lake", **WHO)
    v2 = reg.rotate("alias/lake", **WHO)
    assert (v2.version, v2.kek_id) == (2, "alias/lake")
    assert [v.kek_id for v in reg.check()] == ["alias/lake", "alias/lake"]


def test_reopening_sees_the_same_state(backend) -> None:
    backend.new().initialize("kek-1", **WHO)
    backend.new().rotate("kek-2", **WHO)
    assert states(backend.new()) == [D, A]


def test_full_lifecycle_and_due_for_deletion(backend) -> None:
    clock = StepClock()
    reg = backend.new(clock)
    reg.initialize("kek-1", **WHO)  # T0
    reg.rotate("kek-2", **WHO)  # T0+1h
    retired = reg.retire(1, inventory=EMPTY, **WHO)  # T0+2h
    assert retired.state is R and retired.state_changed_at == T0 + timedelta(hours=2)
    pending = reg.schedule_deletion(1, inventory=EMPTY, pending_days=7, **WHO)  # T0+3h
    assert pending.state is P
    assert pending.delete_after == T0 + timedelta(hours=3, days=7)
    assert reg.due_for_deletion(now=T0 + timedelta(days=7)) == []
    assert reg.due_for_deletion(now=pending.delete_after) == [pending]
    assert reg.due_for_deletion() == []
    clock.now = T0 + timedelta(days=30)
    assert reg.due_for_deletion() == [pending]
    assert [v.version for v in reg.versions()] == [1, 2]  # never removed, even when due
    back = reg.reinstate(1, **WHO)
    assert back.state is D and back.delete_after is None
    assert reg.due_for_deletion() == []
    assert_history_consistent(reg)


def test_injected_clock_drives_timestamps(backend) -> None:
    clock = StepClock(start=datetime(2030, 6, 1, 8, 30, tzinfo=timezone(timedelta(hours=2))))
    reg = backend.new(clock)
    v1 = reg.initialize("kek-1", **WHO)
    expected = datetime(2030, 6, 1, 6, 30, tzinfo=timezone.utc)
    assert v1.created_at == expected and v1.state_changed_at == expected
    assert v1.created_at.tzinfo == timezone.utc
    v2 = reg.rotate("kek-2", **WHO)
    assert v2.created_at == expected + timedelta(hours=1)
    assert reg.get(1).state_changed_at == expected + timedelta(hours=1)
    assert reg.get(1).created_at == expected
    reg.retire(1, **WHO)
    p = reg.schedule_deletion(1, inventory=EMPTY, pending_days=30, **WHO)
    assert p.delete_after == expected + timedelta(hours=3, days=30)
    assert p.delete_after.tzinfo == timezone.utc
    assert [h["at"] for h in reg.history()] == [expected + timedelta(hours=h) for h in (0, 1, 1, 2, 3)]
    assert backend.stored_created_at(1) == "2030-06-01T06:30:00.000000+00:00"


def test_naive_clock_is_refused(backend) -> None:
    reg = backend.new(lambda: datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        reg.initialize("kek-1", **WHO)
    assert reg.versions() == []
    with pytest.raises(ValueError, match="timezone-aware"):
        backend.new().due_for_deletion(now=datetime(2024, 1, 1))


# --------------------------------------------------------------------------- shared behaviour: refusals


def test_retire_refused_while_referenced(reg) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    inv = DictInventory({1: 3})
    before = reg.history()
    with pytest.raises(VersionInUseError, match="3 reference"):
        reg.retire(1, inventory=inv, **WHO)
    assert inv.asked == [1]
    assert reg.get(1).state is D and reg.history() == before
    inv.counts[1] = 0
    assert reg.retire(1, inventory=inv, **WHO).state is R


def test_schedule_deletion_refused_while_referenced(reg) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    reg.retire(1, **WHO)
    inv = DictInventory({1: 1, 2: 99})
    with pytest.raises(VersionInUseError):
        reg.schedule_deletion(1, inventory=inv, pending_days=7, **WHO)
    got = reg.get(1)
    assert got.state is R and got.delete_after is None
    del inv.counts[1]
    assert reg.schedule_deletion(1, inventory=inv, pending_days=7, **WHO).state is P
    assert_history_consistent(reg)


def test_state_is_checked_before_the_inventory(reg) -> None:
    reg.initialize("kek-1", **WHO)
    inv = DictInventory({1: 5})
    with pytest.raises(InvalidTransitionError):
        reg.retire(1, inventory=inv, **WHO)
    assert inv.asked == []


def test_broken_inventory_answer_is_refused(reg) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    with pytest.raises(ValueError, match="int >= 0"):
        reg.retire(1, inventory=DictInventory({1: -1}), **WHO)
    assert reg.get(1).state is D


OPS = {"retire": R, "schedule_deletion": P, "reinstate": D}
TRANSITIONS = [
    (A, "retire", False),
    (A, "schedule_deletion", False),
    (A, "reinstate", False),
    (D, "retire", True),
    (D, "schedule_deletion", False),
    (D, "reinstate", False),
    (R, "retire", False),
    (R, "schedule_deletion", True),
    (R, "reinstate", True),
    (P, "retire", False),
    (P, "schedule_deletion", False),
    (P, "reinstate", True),
]


def bring_to(reg: Any, state: KeyState) -> int:
    reg.initialize("kek-1", **WHO)
    if state is A:
        return 1
    reg.rotate("kek-2", **WHO)
    if state is not D:
        reg.retire(1, inventory=EMPTY, **WHO)
    if state is P:
        reg.schedule_deletion(1, inventory=EMPTY, pending_days=1, **WHO)
    assert reg.get(1).state is state
    return 1


def call(reg: Any, op: str, version: int):
    if op == "retire":
        return reg.retire(version, inventory=EMPTY, **WHO)
    if op == "schedule_deletion":
        return reg.schedule_deletion(version, inventory=EMPTY, pending_days=3, **WHO)
    return reg.reinstate(version, **WHO)


@pytest.mark.parametrize(
    ("start", "op", "ok"),
    TRANSITIONS,
    ids=[f"{s.value}-{op}-{'allowed' if ok else 'refused'}" for s, op, ok in TRANSITIONS],
)
def test_transitions(reg, start: KeyState, op: str, ok: bool) -> None:
    v = bring_to(reg, start)
    before_versions, before_history = reg.versions(), reg.history()
    if ok:
        got = call(reg, op, v)
        assert got.state is OPS[op] and reg.get(v) == got
        assert (got.delete_after is not None) == (OPS[op] is P)
        last = reg.history()[-1]
        assert (last["version"], last["from_state"], last["to_state"]) == (v, start, OPS[op])
        assert len(reg.history()) == len(before_history) + 1
    else:
        with pytest.raises(InvalidTransitionError) as info:
            call(reg, op, v)
        message = str(info.value)
        assert f"{start.value} -> {OPS[op].value}" in message and f"version {v}" in message
        assert reg.versions() == before_versions and reg.history() == before_history
    assert_history_consistent(reg)
    reg.check()


def test_active_version_can_never_be_retired(reg) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    with pytest.raises(InvalidTransitionError, match="rotate"):
        reg.retire(2, **WHO)


def test_unknown_versions(reg) -> None:
    reg.initialize("kek-1", **WHO)
    for bad in (0, 2, -1):
        with pytest.raises(UnknownVersionError):
            reg.get(bad)
        with pytest.raises(UnknownVersionError):
            reg.retire(bad, **WHO)
        with pytest.raises(UnknownVersionError):
            reg.reinstate(bad, **WHO)
        with pytest.raises(UnknownVersionError):
            reg.schedule_deletion(bad, inventory=EMPTY, pending_days=1, **WHO)


@pytest.mark.parametrize(
    "call_",
    [
        pytest.param(lambda r: r.initialize("", **WHO), id="initialize-empty-kek"),
        pytest.param(lambda r: r.initialize("k", actor="", reason="x"), id="initialize-empty-actor"),
        pytest.param(lambda r: r.rotate("k", actor="a", reason="  "), id="rotate-blank-reason"),
        pytest.param(lambda r: r.rotate("", **WHO), id="rotate-empty-kek"),
        pytest.param(lambda r: r.retire(1, actor="", reason="x"), id="retire-empty-actor"),
        pytest.param(lambda r: r.reinstate(1, actor="a", reason=""), id="reinstate-empty-reason"),
        pytest.param(lambda r: r.schedule_deletion(1, inventory=EMPTY, pending_days=-1, **WHO), id="negative-pending-days"),
        pytest.param(lambda r: r.schedule_deletion(1, inventory=None, pending_days=1, **WHO), id="schedule-without-inventory"),
    ],
)
def test_argument_validation(reg, call_) -> None:
    reg.initialize("kek-1", **WHO)
    before = reg.history()
    with pytest.raises(ValueError):
        call_(reg)
    assert reg.history() == before


def test_argument_types(reg) -> None:
    with pytest.raises(TypeError):
        reg.get("1")
    with pytest.raises(TypeError):
        reg.schedule_deletion(1, inventory=EMPTY, pending_days=1.5, **WHO)


# --------------------------------------------------------------------------- shared behaviour: damage


def test_hand_edited_two_actives_is_refused(backend) -> None:
    reg = backend.new()
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    backend.set_state(1, "active")
    with pytest.raises(RegistryInvariantError, match="exactly one active"):
        reg.check()
    for write in (
        lambda: reg.rotate("kek-3", **WHO),
        reg.active,
        lambda: reg.initialize("kek-1", **WHO),
        reg.due_for_deletion,
    ):
        with pytest.raises(RegistryInvariantError):
            write()
    assert [v.version for v in reg.versions()] == [1, 2]  # nothing written; still inspectable
    assert len(reg.history()) == 3


def test_state_disagreeing_with_history_is_refused(backend) -> None:
    reg = backend.new()
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    backend.set_state(1, "retired")
    with pytest.raises(RegistryInvariantError, match="disagree with history"):
        reg.check()
    with pytest.raises(RegistryInvariantError):
        reg.reinstate(1, **WHO)


def test_gap_in_versions_is_refused(backend) -> None:
    reg = backend.new()
    reg.initialize("kek-1", **WHO)
    backend.renumber(1, 3)
    with pytest.raises(RegistryInvariantError, match="gaps"):
        reg.rotate("kek-2", **WHO)


def test_pickle_round_trip(backend, moto_url) -> None:
    if backend.kind == "dynamodb":  # picklable when built from settings, not around a live client
        reg = DynamoDbKeyRegistry(backend.table, name=backend.name, endpoint_url=moto_url, region="us-east-1")
    else:
        reg = backend.new()
    reg.initialize("kek-1", **WHO)
    clone = pickle.loads(pickle.dumps(reg))
    assert type(clone) is type(reg) and repr(clone) == repr(reg)
    assert clone.versions() == reg.versions()
    clone.rotate("kek-2", **WHO)
    assert states(reg) == [D, A]
    assert pickle.loads(pickle.dumps(reg.get(1))) == reg.get(1)


# --------------------------------------------------------------------------- DynamoDB only


@pytest.fixture
def ddb(moto_url):
    return client("dynamodb", moto_url)


def raw_items(ddb, table: str, name: str) -> dict[str, dict]:
    items = ddb.query(
        TableName=table, KeyConditionExpression="pk = :p", ExpressionAttributeValues={":p": {"S": name}}, ConsistentRead=True
    )["Items"]
    return {i["sk"]["S"]: i for i in items}


def test_item_layout(ddb, table) -> None:
    name = unique("layout")
    reg = DynamoDbKeyRegistry(table, name=name, client=ddb, clock=StepClock())
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    items = raw_items(ddb, table, name)
    assert sorted(items) == [HEAD_SK, "h#000000000001", "h#000000000002", "h#000000000003", "v#0000000001", "v#0000000002"]
    head = items[HEAD_SK]
    assert {k: v["N"] for k, v in head.items() if "N" in v} == {
        "rev": "2",
        "max_version": "2",
        "active_version": "2",
        "history_count": "3",
        "schema": "1",
    }
    assert items["v#0000000001"]["state"]["S"] == "decrypt_only" and "delete_after" not in items["v#0000000001"]
    assert items["h#000000000001"]["to_state"]["S"] == "active" and "from_state" not in items["h#000000000001"]


def test_a_writer_between_read_and_commit_loses_the_condition_and_retries(ddb, table) -> None:
    """The inventory runs between our read and our commit; another writer rotates right then."""
    name = unique("race")
    reg = DynamoDbKeyRegistry(table, name=name, client=ddb)
    other = DynamoDbKeyRegistry(table, name=name, client=client("dynamodb", ddb.meta.endpoint_url))
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)

    class SneakyInventory:
        asked = 0

        def references(self, version: int) -> int:
            SneakyInventory.asked += 1
            if SneakyInventory.asked == 1:
                other.rotate("kek-3", actor="bob", reason="meanwhile")
            return 0

    got = reg.retire(1, inventory=SneakyInventory(), actor="alice", reason="retire v1")
    assert SneakyInventory.asked == 2  # the first commit was refused; the retry re-read and re-asked
    assert got.state is R
    versions = reg.check()
    assert [(v.version, v.state) for v in versions] == [(1, R), (2, D), (3, A)]
    hist = assert_history_consistent(reg)
    assert [(h["version"], h["to_state"], h["actor"]) for h in hist[-3:]] == [(2, D, "bob"), (3, A, "bob"), (1, R, "alice")]


def test_conflicts_past_the_budget_raise_and_write_nothing(ddb, table) -> None:
    name = unique("budget")
    reg = DynamoDbKeyRegistry(table, name=name, client=ddb, max_conflict_retries=0)
    other = DynamoDbKeyRegistry(table, name=name, client=client("dynamodb", ddb.meta.endpoint_url))
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)

    class AlwaysRotating:
        def references(self, version: int) -> int:
            other.rotate("kek-x", actor="bob", reason="meanwhile")
            return 0

    with pytest.raises(ConcurrentModificationError):
        reg.retire(1, inventory=AlwaysRotating(), **WHO)
    assert reg.get(1).state is D
    actors = [h["actor"] for h in reg.history()]
    assert actors.count("alice") == 3 and actors.count("bob") == 2  # our retire wrote nothing


def test_concurrent_rotations_from_four_threads(moto_url, table) -> None:
    name = unique("threads")
    DynamoDbKeyRegistry(table, name=name, client=client("dynamodb", moto_url)).initialize("kek-0", actor="setup", reason="bootstrap")
    workers, rotations = 4, 5
    regs = [DynamoDbKeyRegistry(table, name=name, client=client("dynamodb", moto_url)) for _ in range(workers)]
    barrier = threading.Barrier(workers)
    errors: list[BaseException] = []
    returned: dict[int, list[int]] = {}

    def work(w: int) -> None:
        try:
            barrier.wait(timeout=30)
            got = []
            for i in range(rotations):
                new = regs[w].rotate(f"kek-w{w}-{i}", actor=f"worker-{w}", reason=f"rotation {i}")
                assert new.state is A
                got.append(new.version)
            returned[w] = got
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    total = 1 + workers * rotations
    versions = regs[0].check()
    assert [v.version for v in versions] == list(range(1, total + 1))  # gap-free
    assert [v.version for v in versions if v.state is A] == [total]  # exactly one active
    assert all(v.state is D for v in versions[:-1])
    mine = sorted(n for got in returned.values() for n in got)
    assert mine == list(range(2, total + 1))  # every returned version is real and distinct
    for w, got in returned.items():
        assert got == sorted(got)
        assert [versions[n - 1].kek_id for n in got] == [f"kek-w{w}-{i}" for i in range(rotations)]
    hist = assert_history_consistent(regs[0])
    assert len(hist) == 1 + 2 * workers * rotations
    creations = [h["version"] for h in hist if h["from_state"] is None]
    demotions = [h["version"] for h in hist if h["from_state"] is A]
    assert creations == list(range(1, total + 1)) and demotions == list(range(1, total))


def test_registries_share_a_table_independently(ddb, table) -> None:
    a = DynamoDbKeyRegistry(table, name=unique("a"), client=ddb)
    b = DynamoDbKeyRegistry(table, name=unique("b"), client=ddb)
    a.initialize("kek-a1", **WHO)
    a.rotate("kek-a2", **WHO)
    b.initialize("kek-b1", **WHO)
    assert [v.kek_id for v in a.check()] == ["kek-a1", "kek-a2"]
    assert [v.kek_id for v in b.check()] == ["kek-b1"]


def test_deleted_items_are_detected(ddb, table) -> None:
    name = unique("deleted")
    reg = DynamoDbKeyRegistry(table, name=name, client=ddb)
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    ddb.delete_item(TableName=table, Key={"pk": {"S": name}, "sk": {"S": "h#000000000003"}})
    with pytest.raises(RegistryInvariantError, match="disagrees with the stored items"):
        reg.check()
    with pytest.raises(RegistryInvariantError):
        reg.rotate("kek-3", **WHO)
    name2 = unique("headless")
    reg2 = DynamoDbKeyRegistry(table, name=name2, client=ddb)
    reg2.initialize("kek-1", **WHO)
    ddb.delete_item(TableName=table, Key={"pk": {"S": name2}, "sk": {"S": HEAD_SK}})
    with pytest.raises(RegistryInvariantError, match="no head"):
        reg2.check()
    with pytest.raises(RegistryInvariantError):
        reg2.initialize("kek-1", **WHO)


def test_newer_schema_is_refused(ddb, table) -> None:
    name = unique("schema")
    reg = DynamoDbKeyRegistry(table, name=name, client=ddb)
    reg.initialize("kek-1", **WHO)
    ddb.update_item(
        TableName=table,
        Key={"pk": {"S": name}, "sk": {"S": HEAD_SK}},
        UpdateExpression="SET #s = :s",
        ExpressionAttributeNames={"#s": "schema"},
        ExpressionAttributeValues={":s": {"N": "2"}},
    )
    with pytest.raises(RegistryError, match="schema 2"):
        reg.rotate("kek-2", **WHO)


def test_malformed_items_are_invariant_errors(ddb, table) -> None:
    name = unique("malformed")
    reg = DynamoDbKeyRegistry(table, name=name, client=ddb)
    reg.initialize("kek-1", **WHO)
    ddb.update_item(
        TableName=table,
        Key={"pk": {"S": name}, "sk": {"S": "v#0000000001"}},
        UpdateExpression="SET created_at = :c",
        ExpressionAttributeValues={":c": {"S": "yesterday"}},
    )
    with pytest.raises(RegistryInvariantError, match="ISO-8601"):
        reg.check()


def test_missing_table_and_create_table(ddb) -> None:
    missing = DynamoDbKeyRegistry(unique("no-such-table"), client=ddb)
    with pytest.raises(RegistryError, match="does not exist"):
        missing.versions()
    with pytest.raises(RegistryError, match="does not exist"):
        missing.initialize("kek-1", **WHO)
    name = unique("created")
    assert create_table(name, client=ddb) is True
    assert create_table(name, client=ddb) is False  # idempotent
    DynamoDbKeyRegistry(name, client=ddb).initialize("kek-1", **WHO)


def test_unreachable_dynamodb_is_registry_error(moto_url) -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    reg = DynamoDbKeyRegistry("t-unreachable", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", max_attempts=1, connect_timeout=0.5)
    with pytest.raises(RegistryError, match="EndpointConnectionError"):
        reg.versions()


def test_constructor_and_pickling_rules(ddb, table) -> None:
    with pytest.raises(ValueError):
        DynamoDbKeyRegistry(table, client=ddb, endpoint_url="http://127.0.0.1:1")
    with pytest.raises(ValueError):
        DynamoDbKeyRegistry("", client=ddb)
    with pytest.raises(ValueError):
        DynamoDbKeyRegistry(table, client=ddb, max_conflict_retries=-1)
    with pytest.raises(TypeError, match="injected client"):
        pickle.dumps(DynamoDbKeyRegistry(table, client=ddb))
