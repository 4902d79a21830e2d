"""SqliteKeyRegistry against real SQLite files: lifecycle, refusals, damage, concurrency."""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from keyturn.errors import (
    InvalidTransitionError,
    RegistryError,
    RegistryInvariantError,
    UnknownVersionError,
    VersionInUseError,
)
from keyturn.registry.base import ALLOWED_TRANSITIONS, KeyRegistry, KeyState, KeyVersion
from keyturn.registry.sqlite import SqliteKeyRegistry

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


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.sqlite"


@pytest.fixture
def reg(db: Path) -> SqliteKeyRegistry:
    return SqliteKeyRegistry(db)


def states(reg: SqliteKeyRegistry) -> list[KeyState]:
    return [v.state for v in reg.versions()]


def assert_history_consistent(reg: SqliteKeyRegistry) -> list[dict]:
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


# --------------------------------------------------------------------------- basics


def test_satisfies_protocol(reg: SqliteKeyRegistry) -> None:
    assert isinstance(reg, KeyRegistry)


def test_empty_registry(reg: SqliteKeyRegistry) -> None:
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


def test_initialize_is_idempotent(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    v1 = reg.initialize("kek-1", actor="alice", reason="bootstrap")
    assert (v1.version, v1.kek_id, v1.state, v1.actor, v1.reason) == (1, "kek-1", A, "alice", "bootstrap")
    assert v1.delete_after is None
    again = SqliteKeyRegistry(db).initialize("kek-other", actor="bob", reason="again")
    assert again == v1
    assert reg.versions() == [v1]
    assert len(reg.history()) == 1
    reg.rotate("kek-2", **WHO)
    assert reg.initialize("kek-1", **WHO).version == 2  # returns the current active, changes nothing
    assert len(reg.versions()) == 2


def test_rotate_chain_1_to_5(reg: SqliteKeyRegistry) -> None:
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


def test_reopening_the_file_sees_the_same_state(db: Path) -> None:
    SqliteKeyRegistry(db).initialize("kek-1", **WHO)
    SqliteKeyRegistry(db).rotate("kek-2", **WHO)
    assert states(SqliteKeyRegistry(db)) == [D, A]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_full_lifecycle_and_due_for_deletion(db: Path) -> None:
    clock = StepClock()
    reg = SqliteKeyRegistry(db, clock=clock)
    reg.initialize("kek-1", **WHO)  # T0
    reg.rotate("kek-2", **WHO)  # T0+1h
    retired = reg.retire(1, inventory=EMPTY, **WHO)  # T0+2h
    assert retired.state is R and retired.state_changed_at == T0 + timedelta(hours=2)
    pending = reg.schedule_deletion(1, inventory=EMPTY, pending_days=7, **WHO)  # T0+3h
    assert pending.state is P
    assert pending.delete_after == T0 + timedelta(hours=3, days=7)
    assert reg.due_for_deletion(now=T0 + timedelta(days=7)) == []
    assert reg.due_for_deletion(now=pending.delete_after) == [pending]
    assert reg.due_for_deletion() == []  # the clock is still near T0
    clock.now = T0 + timedelta(days=30)
    assert reg.due_for_deletion() == [pending]
    # Rows are never removed, even when due.
    assert [v.version for v in reg.versions()] == [1, 2]
    back = reg.reinstate(1, **WHO)
    assert back.state is D and back.delete_after is None
    assert reg.due_for_deletion() == []
    assert_history_consistent(reg)


def test_injected_clock_drives_timestamps(db: Path) -> None:
    clock = StepClock(start=datetime(2030, 6, 1, 8, 30, tzinfo=timezone(timedelta(hours=2))))
    reg = SqliteKeyRegistry(db, clock=clock)
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
    with sqlite3.connect(db) as conn:  # stored as ISO-8601 UTC text
        assert conn.execute("SELECT created_at FROM versions WHERE version = 1").fetchone()[0] == (
            "2030-06-01T06:30:00.000000+00:00"
        )


def test_naive_clock_is_refused(db: Path) -> None:
    reg = SqliteKeyRegistry(db, clock=lambda: datetime(2024, 1, 1))
    with pytest.raises(ValueError, match="timezone-aware"):
        reg.initialize("kek-1", **WHO)
    assert reg.versions() == []
    with pytest.raises(ValueError, match="timezone-aware"):
        SqliteKeyRegistry(db).due_for_deletion(now=datetime(2024, 1, 1))


# --------------------------------------------------------------------------- inventory refusals


def test_retire_refused_while_referenced(reg: SqliteKeyRegistry) -> None:
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


def test_schedule_deletion_refused_while_referenced(reg: SqliteKeyRegistry) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    reg.retire(1, **WHO)  # no inventory given: retire does not check
    inv = DictInventory({1: 1, 2: 99})
    with pytest.raises(VersionInUseError):
        reg.schedule_deletion(1, inventory=inv, pending_days=7, **WHO)
    got = reg.get(1)
    assert got.state is R and got.delete_after is None
    del inv.counts[1]
    assert reg.schedule_deletion(1, inventory=inv, pending_days=7, **WHO).state is P
    assert_history_consistent(reg)


def test_state_is_checked_before_the_inventory(reg: SqliteKeyRegistry) -> None:
    reg.initialize("kek-1", **WHO)
    inv = DictInventory({1: 5})
    with pytest.raises(InvalidTransitionError):
        reg.retire(1, inventory=inv, **WHO)
    assert inv.asked == []


def test_broken_inventory_answer_is_refused(reg: SqliteKeyRegistry) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    with pytest.raises(ValueError, match="int >= 0"):
        reg.retire(1, inventory=DictInventory({1: -1}), **WHO)
    assert reg.get(1).state is D


# --------------------------------------------------------------------------- transitions

# Operation -> target state. Each operation also restricts its source states.
OPS = {"retire": R, "schedule_deletion": P, "reinstate": D}

# (state the version is in, operation, allowed?)
TRANSITIONS = [
    (A, "retire", False),
    (A, "schedule_deletion", False),
    (A, "reinstate", False),  # active -> decrypt_only happens only through rotate
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


def test_transition_table_matches_allowed_transitions() -> None:
    allowed = {(src, OPS[op]) for src, op, ok in TRANSITIONS if ok}
    assert allowed | {(A, D)} == set(ALLOWED_TRANSITIONS)  # (A, D) is rotate's


def bring_to(reg: SqliteKeyRegistry, state: KeyState) -> int:
    """A registry whose version 1 is in `state`; returns 1."""
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


def call(reg: SqliteKeyRegistry, op: str, version: int):
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
def test_transitions(reg: SqliteKeyRegistry, start: KeyState, op: str, ok: bool) -> None:
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


def test_active_version_can_never_be_retired(reg: SqliteKeyRegistry) -> None:
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    with pytest.raises(InvalidTransitionError, match="rotate"):
        reg.retire(2, **WHO)
    assert issubclass(InvalidTransitionError, ValueError)


def test_unknown_versions(reg: SqliteKeyRegistry) -> None:
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
        pytest.param(
            lambda r: r.schedule_deletion(1, inventory=EMPTY, pending_days=-1, **WHO), id="negative-pending-days"
        ),
        pytest.param(
            lambda r: r.schedule_deletion(1, inventory=None, pending_days=1, **WHO), id="schedule-without-inventory"
        ),
    ],
)
def test_argument_validation(reg: SqliteKeyRegistry, call_) -> None:
    reg.initialize("kek-1", **WHO)
    before = reg.history()
    with pytest.raises(ValueError):
        call_(reg)
    assert reg.history() == before


def test_argument_types(reg: SqliteKeyRegistry) -> None:
    with pytest.raises(TypeError):
        reg.get("1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        reg.schedule_deletion(1, inventory=EMPTY, pending_days=1.5, **WHO)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SqliteKeyRegistry(":memory:")


# --------------------------------------------------------------------------- damaged files


def test_hand_edited_two_actives_is_refused(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE versions SET state = 'active' WHERE version = 1")
    with pytest.raises(RegistryInvariantError, match="exactly one active"):
        reg.check()
    with pytest.raises(RegistryInvariantError):
        reg.rotate("kek-3", **WHO)
    with pytest.raises(RegistryInvariantError):
        reg.active()
    with pytest.raises(RegistryInvariantError):
        reg.initialize("kek-1", **WHO)
    with pytest.raises(RegistryInvariantError):
        reg.due_for_deletion()
    # Nothing was written, and the damage can still be inspected.
    assert [v.version for v in reg.versions()] == [1, 2]
    assert len(reg.history()) == 3


def test_state_disagreeing_with_history_is_refused(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    reg.initialize("kek-1", **WHO)
    reg.rotate("kek-2", **WHO)
    with sqlite3.connect(db) as conn:  # a valid-looking state nobody recorded
        conn.execute("UPDATE versions SET state = 'retired' WHERE version = 1")
    with pytest.raises(RegistryInvariantError, match="disagree with history"):
        reg.check()
    with pytest.raises(RegistryInvariantError):
        reg.reinstate(1, **WHO)


def test_gap_in_versions_is_refused(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    reg.initialize("kek-1", **WHO)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE versions SET version = 3 WHERE version = 1")
    with pytest.raises(RegistryInvariantError, match="gaps"):
        reg.rotate("kek-2", **WHO)


def test_rows_cannot_be_deleted_and_history_is_append_only(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    reg.initialize("kek-1", **WHO)
    with sqlite3.connect(db) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            conn.execute("DELETE FROM versions")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE history SET actor = 'mallory'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM history")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("UPDATE versions SET state = 'bogus'")
    reg.check()


def test_sqlite_failures_become_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(RegistryError):
        SqliteKeyRegistry(tmp_path / "missing-dir" / "registry.sqlite")


# --------------------------------------------------------------------------- pickling


def test_pickle_round_trip(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    reg.initialize("kek-1", **WHO)
    clone = pickle.loads(pickle.dumps(reg))
    assert isinstance(clone, SqliteKeyRegistry) and clone.path == reg.path
    assert clone.versions() == reg.versions()
    clone.rotate("kek-2", **WHO)
    assert states(reg) == [D, A]
    assert pickle.loads(pickle.dumps(reg.get(1))) == reg.get(1)


# --------------------------------------------------------------------------- concurrency

WORKERS = 4
ROTATIONS = 10


def _rotate_worker(reg: SqliteKeyRegistry, worker: int, barrier) -> None:
    """Child-process body (module level, so 'spawn' can import it)."""
    barrier.wait(timeout=60)
    last = 0
    for i in range(ROTATIONS):
        new = reg.rotate(f"kek-w{worker}-{i}", actor=f"worker-{worker}", reason=f"rotation {i}")
        assert new.state is KeyState.ACTIVE and new.version > last
        last = new.version


def test_concurrent_rotations_across_processes(db: Path) -> None:
    reg = SqliteKeyRegistry(db)
    reg.initialize("kek-0", actor="setup", reason="bootstrap")
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_rotate_worker, args=(reg, w, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORKERS

    total = 1 + WORKERS * ROTATIONS
    versions = reg.check()
    assert [v.version for v in versions] == list(range(1, total + 1))
    assert [v.version for v in versions if v.state is KeyState.ACTIVE] == [total]
    assert all(v.state is KeyState.DECRYPT_ONLY for v in versions[:-1])
    hist = assert_history_consistent(reg)
    assert len(hist) == 1 + 2 * WORKERS * ROTATIONS
    for w in range(WORKERS):
        mine = [h for h in hist if h["actor"] == f"worker-{w}"]
        assert len(mine) == 2 * ROTATIONS
        created = [h["version"] for h in mine if h["from_state"] is None]
        assert [v.kek_id for v in versions if v.version in created] == [f"kek-w{w}-{i}" for i in range(ROTATIONS)]
    # Each rotation demoted exactly the version created just before it.
    creations = [h["version"] for h in hist if h["from_state"] is None]
    demotions = [h["version"] for h in hist if h["from_state"] is KeyState.ACTIVE]
    assert creations == list(range(1, total + 1))
    assert demotions == list(range(1, total))
