"""A key registry in one SQLite file: the embedded, single-node default.

Contracts:

- Every write runs in one ``BEGIN IMMEDIATE`` transaction, so writers in
  different threads or processes serialize on the file. Inside it the
  registry re-reads all versions, refuses to touch a state that already
  breaks an invariant, applies the change, appends to ``history``, and runs
  `check_invariants` on the result before committing. Any error rolls back.
- Rows are never deleted. A version past its ``delete_after`` stays in the
  table for audit (and so versions stay 1..n without gaps); triggers refuse
  DELETE on ``versions`` and UPDATE or DELETE on ``history``.
- The object holds only the file path and the clock and opens a fresh
  connection per call, so it is safe across threads and pickles cleanly
  (provided the clock does too; the default does).
- ``versions()``, ``get()`` and ``history()`` return what is stored, so a
  damaged registry can still be inspected. ``active()``, ``due_for_deletion()``
  and ``check()`` drive decisions (which key to encrypt under, which keys to
  destroy) and raise `RegistryInvariantError` on a damaged registry, as does
  every write.
- Timestamps are stored as fixed-width ISO-8601 UTC strings and returned as
  timezone-aware UTC datetimes.
- An `Inventory` is consulted inside the write transaction, so the version's
  state cannot change between the check and the write; keep it fast (a count
  from a manifest or index, not a lake scan), because other writers wait on
  the lock for at most `busy_timeout` seconds.
- `sqlite3` failures (a locked file past the timeout, a missing directory)
  surface as `RegistryError`.
- The same file holds the DEK directory (table ``deks``, see
  `keyturn.directory`; entries are never deleted) and the dataset contracts
  (``contracts``, with an append-only ``contract_history``). Retire and
  schedule-deletion count the directory entries under the version inside
  their own ``BEGIN IMMEDIATE`` transaction, and a DEK registers only under
  a readable version, in one transaction as well, so neither can slip past
  the other. A schema-1 file is upgraded in place (the new tables start
  empty: run `keyturn directory rebuild` for data written before).
- Table ``audit_anchor`` holds at most one row: the (seq, hash) of the key
  home's last anchored audit entry (`audit_anchor`, `advance_audit_anchor`;
  see `keyturn.audit.chain`). It is moved by compare-and-set in one
  ``BEGIN IMMEDIATE`` transaction; triggers refuse to move it backwards or
  delete it. The table is created in older files when they are opened (it
  starts empty, i.e. "no anchor yet"), so `SCHEMA_VERSION` is unchanged.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from keyturn.contract import DatasetContract
from keyturn.directory import (
    LOOKUP_BATCH, DekEntry, WrappingSwap, check_contract_revisions, check_new_entries, check_rewrap,
)
from keyturn.errors import ConcurrentModificationError, ContractError, DirectoryError, RegistryError, UnknownVersionError
from keyturn.registry.base import (
    KeyState,
    KeyVersion,
    LifecycleMethods,
    Transition,
    check_anchor_move,
    check_history,
    check_invariants,
    check_rotation,
    find_version,
    require_text,
    require_version,
    utc_now,
)
from keyturn.registry.base import from_text as _from_text, stored_state as _state, to_text as _to_text

__all__ = ["SqliteKeyRegistry", "SCHEMA_VERSION"]

#: Stored in ``PRAGMA user_version``; a file with a newer schema is refused.
#: 2 added the DEK directory (``deks``) and dataset contracts; a version-1
#: file is upgraded in place when opened (the new tables start empty).
SCHEMA_VERSION = 2

_T = TypeVar("_T")

_STATES_SQL = ", ".join(f"'{s.value}'" for s in KeyState)

def _refuse(trigger: str, event: str, table: str, message: str, when: str = "") -> str:
    """A trigger that aborts every `event` (UPDATE or DELETE) on `table` (optionally only `when`) with `message`."""
    condition = f"WHEN {when}\n" if when else ""
    return f"""CREATE TRIGGER IF NOT EXISTS {trigger} BEFORE {event} ON {table}
{condition}BEGIN
    SELECT RAISE(ABORT, '{message}');
END;"""


def _append_only(table: str, message: str) -> str:
    """Triggers refusing UPDATE and DELETE on `table`."""
    return "\n".join(_refuse(f"{table}_no_{event.lower()}", event, table, message) for event in ("UPDATE", "DELETE"))


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS versions (
    version          INTEGER PRIMARY KEY CHECK (version >= 1),
    kek_id           TEXT NOT NULL CHECK (kek_id <> ''),
    state            TEXT NOT NULL CHECK (state IN ({_STATES_SQL})),
    created_at       TEXT NOT NULL,
    actor            TEXT NOT NULL,
    reason           TEXT NOT NULL,
    state_changed_at TEXT NOT NULL,
    delete_after     TEXT
);
CREATE TABLE IF NOT EXISTS history (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    version    INTEGER NOT NULL REFERENCES versions (version),
    from_state TEXT CHECK (from_state IS NULL OR from_state IN ({_STATES_SQL})),
    to_state   TEXT NOT NULL CHECK (to_state IN ({_STATES_SQL})),
    at         TEXT NOT NULL,
    actor      TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS history_by_version ON history (version, id);
{_refuse("versions_never_deleted", "DELETE", "versions", "key versions are never deleted; they stay for audit")}
{_append_only("history", "history is append-only")}
CREATE TABLE IF NOT EXISTS deks (
    dek_id            BLOB PRIMARY KEY CHECK (length(dek_id) = 16),
    dataset           TEXT NOT NULL,
    partition         TEXT NOT NULL,
    key_version       INTEGER NOT NULL REFERENCES versions (version),
    envelope          BLOB NOT NULL,
    birth_version     INTEGER NOT NULL REFERENCES versions (version),
    birth_commitment  BLOB NOT NULL,
    created_at        TEXT NOT NULL,
    actor             TEXT NOT NULL,
    contract_revision INTEGER NOT NULL DEFAULT 0,
    updated_at        TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deks_by_version ON deks (key_version, dek_id);
{_refuse("deks_never_deleted", "DELETE", "deks", "DEK directory entries are never deleted")}
CREATE TABLE IF NOT EXISTS contracts (
    dataset    TEXT PRIMARY KEY,
    revision   INTEGER NOT NULL CHECK (revision >= 1),
    contract   TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS contract_history (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    dataset  TEXT NOT NULL,
    revision INTEGER NOT NULL,
    contract TEXT NOT NULL,
    at       TEXT NOT NULL,
    actor    TEXT NOT NULL,
    reason   TEXT NOT NULL
);
{_append_only("contract_history", "contract history is append-only")}
CREATE TABLE IF NOT EXISTS audit_anchor (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    seq        INTEGER NOT NULL CHECK (seq >= 0),
    hash       TEXT NOT NULL CHECK (length(hash) = 64),
    updated_at TEXT NOT NULL
);
{_refuse("audit_anchor_forward_only", "UPDATE", "audit_anchor", "the audit anchor only moves forward", when="NEW.seq <= OLD.seq")}
{_refuse("audit_anchor_never_deleted", "DELETE", "audit_anchor", "the audit anchor is never deleted")}
"""

_DEK_COLUMNS = (
    "dek_id, dataset, partition, key_version, envelope, birth_version, birth_commitment, created_at, actor, contract_revision"
)

_VERSION_COLUMNS = "version, kek_id, state, created_at, actor, reason, state_changed_at, delete_after"

def _row_to_version(row: Sequence[Any]) -> KeyVersion:
    version, kek_id, state, created_at, actor, reason, changed_at, delete_after = row
    where = f"version {version}"
    return KeyVersion(
        version=version,
        kek_id=kek_id,
        state=_state(state, f"state of {where}"),
        created_at=_from_text(created_at, f"created_at of {where}"),
        actor=actor,
        reason=reason,
        state_changed_at=_from_text(changed_at, f"state_changed_at of {where}"),
        delete_after=None if delete_after is None else _from_text(delete_after, f"delete_after of {where}"),
    )


class SqliteKeyRegistry(LifecycleMethods):
    """`KeyRegistry` backed by one SQLite file; see the module docstring for contracts."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], datetime] = utc_now,
        busy_timeout: float = 30.0,
    ) -> None:
        """Open (creating if absent) the registry at `path`; the directory must exist."""
        self._path = os.fspath(path)
        if not self._path or self._path == ":memory:" or self._path.startswith("file:"):
            raise ValueError("SqliteKeyRegistry needs a file path (':memory:' and URIs are not supported)")
        if not callable(clock):
            raise TypeError("clock must be callable")
        if busy_timeout <= 0:
            raise ValueError("busy_timeout must be positive")
        self._clock = clock
        self._busy_timeout = float(busy_timeout)
        self._create_schema()

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._path!r})"

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A fresh autocommit connection (transactions are explicit); sqlite errors become RegistryError."""
        conn = None
        try:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn
        except sqlite3.Error as e:
            raise RegistryError(f"sqlite key registry {self._path!r}: {e}") from e
        finally:
            if conn is not None:
                conn.close()

    def _create_schema(self) -> None:
        with self._connection() as conn:
            # journal_mode is persistent in the file; switch only when needed,
            # because the switch itself needs an exclusive lock.
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                found = conn.execute("PRAGMA user_version").fetchone()[0]
                if found > SCHEMA_VERSION:
                    raise RegistryError(
                        f"{self._path!r} has registry schema {found}; this keyturn supports up to {SCHEMA_VERSION}"
                    )
                for statement in _split_sql(_SCHEMA):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _load(conn: sqlite3.Connection) -> list[KeyVersion]:
        rows = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions ORDER BY version").fetchall()
        return [_row_to_version(r) for r in rows]

    @staticmethod
    def _load_history(conn: sqlite3.Connection) -> list[dict[str, Any]]:
        rows = conn.execute(
            "SELECT id, version, from_state, to_state, at, actor, reason FROM history ORDER BY id"
        ).fetchall()
        out = []
        for id_, version, from_state, to_state, at, actor, reason in rows:
            where = f"history row {id_}"
            out.append(
                {
                    "id": id_,
                    "version": version,
                    "from_state": None if from_state is None else _state(from_state, f"from_state of {where}"),
                    "to_state": _state(to_state, f"to_state of {where}"),
                    "at": _from_text(at, f"time of {where}"),
                    "actor": actor,
                    "reason": reason,
                }
            )
        return out

    @classmethod
    def _validate(cls, conn: sqlite3.Connection, versions: list[KeyVersion]) -> None:
        """`check_invariants`, plus: replaying `history` reproduces every version's state."""
        check_invariants(versions)
        check_history(versions, cls._load_history(conn))

    def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `fn` in one read transaction (one consistent snapshot)."""
        with self._connection() as conn:
            conn.execute("BEGIN")
            try:
                return fn(conn)
            finally:
                conn.execute("ROLLBACK")

    def _write(
        self, fn: Callable[[sqlite3.Connection, list[KeyVersion], datetime], _T], *, validate_after: bool = True
    ) -> _T:
        """Run `fn(conn, versions, now)` in one BEGIN IMMEDIATE transaction, validated before and after.

        `validate_after=False` for writes that cannot change key versions (directory and contract writes).
        """
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = self._load(conn)
                self._validate(conn, before)
                result = fn(conn, before, self._now())
                if validate_after:
                    self._validate(conn, self._load(conn))
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @staticmethod
    def _find(versions: list[KeyVersion], version: int) -> KeyVersion:
        return find_version(versions, version)

    @staticmethod
    def _set_state(
        conn: sqlite3.Connection,
        version: int,
        src: KeyState | None,
        dst: KeyState,
        now: datetime,
        actor: str,
        reason: str,
        delete_after: datetime | None = None,
    ) -> None:
        at = _to_text(now)
        if src is not None:
            cur = conn.execute(
                "UPDATE versions SET state = ?, state_changed_at = ?, delete_after = ? WHERE version = ? AND state = ?",
                (dst.value, at, None if delete_after is None else _to_text(delete_after), version, src.value),
            )
            if cur.rowcount != 1:  # cannot happen under BEGIN IMMEDIATE; refuse rather than guess
                raise RegistryError(f"version {version} changed underneath the write transaction")
        conn.execute(
            "INSERT INTO history (version, from_state, to_state, at, actor, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (version, None if src is None else src.value, dst.value, at, actor, reason),
        )

    @staticmethod
    def _insert_active(conn: sqlite3.Connection, version: int, kek_id: str, now: datetime, actor: str, reason: str) -> None:
        at = _to_text(now)
        conn.execute(
            f"INSERT INTO versions ({_VERSION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
            (version, kek_id, KeyState.ACTIVE.value, at, actor, reason, at),
        )
        SqliteKeyRegistry._set_state(conn, version, None, KeyState.ACTIVE, now, actor, reason)

    def _transition(self, change: Transition) -> KeyVersion:
        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> KeyVersion:
            refs = conn.execute("SELECT COUNT(*) FROM deks WHERE key_version = ?", (change.version,)).fetchone()[0]
            current, dst, delete_after = change.plan(versions, now, directory_refs=refs)
            self._set_state(conn, change.version, current.state, dst, now, change.actor, change.reason, delete_after)
            return self._find(self._load(conn), change.version)

        return self._write(apply)

    # ------------------------------------------------------------------ reads

    def versions(self) -> list[KeyVersion]:
        """All versions, ascending, as stored (not validated)."""
        return self._read(self._load)

    def get(self, version: int) -> KeyVersion:
        """One version as stored; `UnknownVersionError` if absent."""
        require_version(version)

        def one(conn: sqlite3.Connection) -> KeyVersion:
            row = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE version = ?", (version,)).fetchone()
            if row is None:
                raise UnknownVersionError(f"no key version {version}")
            return _row_to_version(row)

        return self._read(one)

    def active(self) -> KeyVersion:
        """The single active version; `RegistryError` if empty, `RegistryInvariantError` if damaged."""
        versions = self.check()
        if not versions:
            raise RegistryError(f"key registry {self._path!r} is empty; call initialize() first")
        return next(v for v in versions if v.state is KeyState.ACTIVE)

    def history(self) -> list[dict[str, Any]]:
        """Every recorded transition, oldest first, as stored.

        Keys: ``id``, ``version``, ``from_state`` (None when the version was
        created), ``to_state``, ``at`` (aware UTC), ``actor``, ``reason``.
        """
        return self._read(self._load_history)

    def check(self) -> list[KeyVersion]:
        """Load and validate everything; return the versions or raise `RegistryInvariantError`."""

        def load_checked(conn: sqlite3.Connection) -> list[KeyVersion]:
            versions = self._load(conn)
            self._validate(conn, versions)
            return versions

        return self._read(load_checked)

    # ------------------------------------------------------------------ writes

    def initialize(self, kek_id: str, *, actor: str, reason: str) -> KeyVersion:
        """Create version 1 as active if the registry is empty; else return the active version unchanged."""
        require_text("kek_id", kek_id)
        require_text("actor", actor)
        require_text("reason", reason)

        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> KeyVersion:
            if versions:
                return next(v for v in versions if v.state is KeyState.ACTIVE)
            self._insert_active(conn, 1, kek_id, now, actor, reason)
            return self._find(self._load(conn), 1)

        return self._write(apply)

    def rotate(self, kek_id: str, *, actor: str, reason: str, expect_active: int | None = None) -> KeyVersion:
        """Atomically add version max+1 as active and demote the old active to decrypt_only.

        `RegistryError` if the registry is empty (call `initialize` first).
        With `expect_active`, `ConcurrentModificationError` unless that
        version is still the active one (another rotation got there first).
        """
        require_text("kek_id", kek_id)
        require_text("actor", actor)
        require_text("reason", reason)

        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> KeyVersion:
            if not versions:
                raise RegistryError(f"key registry {self._path!r} is empty; call initialize() first")
            old = next(v for v in versions if v.state is KeyState.ACTIVE)
            check_rotation(versions, old, kek_id, expect_active)
            self._set_state(conn, old.version, KeyState.ACTIVE, KeyState.DECRYPT_ONLY, now, actor, reason)
            new = len(versions) + 1
            self._insert_active(conn, new, kek_id, now, actor, reason)
            return self._find(self._load(conn), new)

        return self._write(apply)

    # ------------------------------------------------------------------ DEK directory

    def register_deks(self, entries: Sequence[DekEntry]) -> None:
        """Register new DEKs in one transaction (see `keyturn.directory`); identical re-registration is a no-op."""
        entries = list(entries)
        if not entries:
            return

        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> None:
            check_new_entries(entries, {v.version: v.kek_id for v in versions}, [v.version for v in versions if v.state.readable])
            revisions = dict(conn.execute("SELECT dataset, revision FROM contracts").fetchall())
            check_contract_revisions(entries, revisions)
            stamp = _to_text(now)
            for e in entries:
                row = conn.execute(
                    "SELECT dataset, partition, birth_version, birth_commitment FROM deks WHERE dek_id = ?", (e.dek_id,)
                ).fetchone()
                if row is not None:
                    if tuple(row) != (e.dataset, e.partition, e.birth_version, e.birth_commitment):
                        raise DirectoryError(f"DEK {e.dek_id.hex()} is already registered with another birth")
                    continue
                conn.execute(
                    f"INSERT INTO deks ({_DEK_COLUMNS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        e.dek_id, e.dataset, e.partition, e.key_version, e.envelope, e.birth_version,
                        e.birth_commitment, _to_text(e.created_at), e.actor, e.contract_revision, stamp,
                    ),
                )

        self._write(apply, validate_after=False)

    def lookup_deks(self, dek_ids: Iterable[bytes]) -> dict[bytes, DekEntry]:
        """Registered entries of `dek_ids` (absent ids left out), a few queries for any number of ids."""
        wanted = sorted({bytes(d) for d in dek_ids})
        if not wanted:
            return {}

        def load(conn: sqlite3.Connection) -> dict[bytes, DekEntry]:
            out: dict[bytes, DekEntry] = {}
            step = LOOKUP_BATCH * 5
            for lo in range(0, len(wanted), step):
                chunk = wanted[lo : lo + step]
                marks = ", ".join("?" * len(chunk))
                for row in conn.execute(f"SELECT {_DEK_COLUMNS} FROM deks WHERE dek_id IN ({marks})", chunk):
                    entry = _row_to_entry(row)
                    out[entry.dek_id] = entry
            return out

        return self._read(load)

    def list_deks(self, *, key_version: int | None = None, after: bytes | None = None, limit: int = 1000) -> list[DekEntry]:
        """Entries in dek_id order after `after` (optionally only those under `key_version`), at most `limit`."""
        if limit < 1:
            raise ValueError("limit must be >= 1")
        where, args = [], []
        if key_version is not None:
            where.append("key_version = ?")
            args.append(require_version(key_version))
        if after is not None:
            where.append("dek_id > ?")
            args.append(bytes(after))
        clause = ("WHERE " + " AND ".join(where)) if where else ""

        def load(conn: sqlite3.Connection) -> list[DekEntry]:
            rows = conn.execute(f"SELECT {_DEK_COLUMNS} FROM deks {clause} ORDER BY dek_id LIMIT ?", (*args, limit))
            return [_row_to_entry(r) for r in rows]

        return self._read(load)

    def dek_count(self, key_version: int | None = None) -> int:
        """Entries wrapped under `key_version` (all entries if None)."""
        if key_version is None:
            return self._read(lambda conn: conn.execute("SELECT COUNT(*) FROM deks").fetchone()[0])
        require_version(key_version)
        return self._read(
            lambda conn: conn.execute("SELECT COUNT(*) FROM deks WHERE key_version = ?", (key_version,)).fetchone()[0]
        )

    def deks_by_version(self) -> dict[int, int]:
        """Entries per current key version, ascending."""
        rows = self._read(
            lambda conn: conn.execute("SELECT key_version, COUNT(*) FROM deks GROUP BY key_version ORDER BY key_version").fetchall()
        )
        return {int(v): int(n) for v, n in rows}

    swap_batch = 256
    """Swaps `replace_wrappings` commits in one transaction (one commit, not one per DEK)."""

    def replace_wrapping(self, dek_id: bytes, *, expected_envelope: bytes, new_envelope: bytes) -> bool:
        """Compare-and-set one entry's envelope (a validated rewrap of the same DEK onto a readable version)."""
        return self.replace_wrappings([WrappingSwap(bytes(dek_id), bytes(expected_envelope), bytes(new_envelope))])[0]

    def replace_wrappings(self, swaps: Sequence[WrappingSwap]) -> list[bool]:
        """`replace_wrapping` for each swap, in one transaction: all of them are made, or (on an error) none.

        Per swap, False if its entry no longer holds the expected envelope
        (another rewrap moved it first). `DirectoryError` if a DEK is not
        registered, a new envelope is not the same DEK under the registry's
        KEK, or its version is not readable.
        """
        swaps = list(swaps)
        if not swaps:
            return []

        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> list[bool]:
            kek_ids, stamp = {v.version: v.kek_id for v in versions}, _to_text(now)
            out = []
            for swap in swaps:
                dek_id = bytes(swap.dek_id)
                row = conn.execute(f"SELECT {_DEK_COLUMNS} FROM deks WHERE dek_id = ?", (dek_id,)).fetchone()
                if row is None:
                    raise DirectoryError(f"DEK {dek_id.hex()} is not in the directory")
                entry = _row_to_entry(row)
                if entry.envelope != bytes(swap.expected):
                    out.append(False)
                    continue
                moved = check_rewrap(entry, swap.new, kek_ids)
                if not find_version(versions, moved.key_version).state.readable:
                    raise DirectoryError(
                        f"cannot rewrap DEK {dek_id.hex()} onto version {moved.key_version}: it is not readable"
                    )
                cur = conn.execute(
                    "UPDATE deks SET envelope = ?, key_version = ?, updated_at = ? WHERE dek_id = ? AND envelope = ?",
                    (moved.envelope, moved.key_version, stamp, dek_id, entry.envelope),
                )
                out.append(cur.rowcount == 1)
            return out

        return self._write(apply, validate_after=False)

    # ------------------------------------------------------------------ audit anchor

    def audit_anchor(self) -> tuple[int, str] | None:
        """(seq, hash) of the key home's anchored audit entry, or None if none was anchored yet."""
        row = self._read(lambda conn: conn.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone())
        return None if row is None else (int(row[0]), str(row[1]))

    def advance_audit_anchor(self, seq: int, digest: str, *, expected: tuple[int, str] | None) -> None:
        """Compare-and-set the anchor from `expected` (None: absent) to (`seq`, `digest`), forward only."""
        seq, digest = check_anchor_move(seq, digest, expected)
        with self._connection() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT seq, hash FROM audit_anchor WHERE id = 1").fetchone()
                stored = None if row is None else (int(row[0]), str(row[1]))
                if stored != (None if expected is None else (int(expected[0]), str(expected[1]))):
                    raise ConcurrentModificationError(
                        f"the audit anchor in {self._path!r} is at {_anchor_name(stored)}, not {_anchor_name(expected)}"
                    )
                stamp = _to_text(self._now())
                if stored is None:
                    conn.execute("INSERT INTO audit_anchor (id, seq, hash, updated_at) VALUES (1, ?, ?, ?)", (seq, digest, stamp))
                else:
                    conn.execute("UPDATE audit_anchor SET seq = ?, hash = ?, updated_at = ? WHERE id = 1", (seq, digest, stamp))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ dataset contracts

    def get_contract(self, dataset: str) -> DatasetContract | None:
        """The pinned contract of `dataset`, or None if nothing was ever written to it."""
        require_text("dataset", dataset)
        row = self._read(lambda conn: conn.execute("SELECT contract FROM contracts WHERE dataset = ?", (dataset,)).fetchone())
        return None if row is None else DatasetContract.stored(dataset, row[0])

    def pin_contract(self, contract: DatasetContract, *, actor: str, reason: str) -> DatasetContract:
        """Store `contract` if its dataset has none yet; return the stored one (the first writer's)."""
        require_text("actor", actor)
        require_text("reason", reason)
        if contract.revision != 1:
            raise ContractError("a first contract has revision 1")

        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> DatasetContract:
            row = conn.execute("SELECT contract FROM contracts WHERE dataset = ?", (contract.dataset,)).fetchone()
            if row is not None:
                return DatasetContract.stored(contract.dataset, row[0])
            self._store_contract(conn, contract, now, actor, reason, insert=True)
            return contract

        return self._write(apply, validate_after=False)

    def evolve_contract(self, contract: DatasetContract, *, expected_revision: int, actor: str, reason: str) -> DatasetContract:
        """Replace the dataset's contract with `contract` (revision `expected_revision` + 1), compare-and-set."""
        require_text("actor", actor)
        require_text("reason", reason)

        def apply(conn: sqlite3.Connection, versions: list[KeyVersion], now: datetime) -> DatasetContract:
            row = conn.execute("SELECT revision FROM contracts WHERE dataset = ?", (contract.dataset,)).fetchone()
            if row is None:
                raise ContractError(f"dataset {contract.dataset!r} has no contract yet; its first write pins one")
            if row[0] != expected_revision or contract.revision != expected_revision + 1:
                raise ConcurrentModificationError(
                    f"the contract of dataset {contract.dataset!r} is at revision {row[0]}, not {expected_revision}"
                )
            self._store_contract(conn, contract, now, actor, reason, insert=False)
            return contract

        return self._write(apply, validate_after=False)

    def contract_history(self, dataset: str) -> list[dict[str, Any]]:
        """Every revision of `dataset`'s contract, oldest first (``revision``, ``contract``, ``at``, ``actor``, ``reason``)."""
        rows = self._read(
            lambda conn: conn.execute(
                "SELECT revision, contract, at, actor, reason FROM contract_history WHERE dataset = ? ORDER BY id",
                (dataset,),
            ).fetchall()
        )
        return [
            {"revision": r, "contract": DatasetContract.stored(dataset, c), "at": _from_text(at, "contract time"), "actor": a, "reason": why}
            for r, c, at, a, why in rows
        ]

    @staticmethod
    def _store_contract(
        conn: sqlite3.Connection, contract: DatasetContract, now: datetime, actor: str, reason: str, *, insert: bool
    ) -> None:
        text, at = contract.to_text(), _to_text(now)
        if insert:
            conn.execute(
                "INSERT INTO contracts (dataset, revision, contract, updated_at) VALUES (?, ?, ?, ?)",
                (contract.dataset, contract.revision, text, at),
            )
        else:
            conn.execute(
                "UPDATE contracts SET revision = ?, contract = ?, updated_at = ? WHERE dataset = ?",
                (contract.revision, text, at, contract.dataset),
            )
        conn.execute(
            "INSERT INTO contract_history (dataset, revision, contract, at, actor, reason) VALUES (?, ?, ?, ?, ?, ?)",
            (contract.dataset, contract.revision, text, at, actor, reason),
        )


def _row_to_entry(row: Sequence[Any]) -> DekEntry:
    dek_id, dataset, partition, key_version, envelope, birth_version, commitment, created_at, actor, revision = row
    return DekEntry(
        dek_id=bytes(dek_id),
        dataset=dataset,
        partition=partition,
        key_version=int(key_version),
        envelope=bytes(envelope),
        birth_version=int(birth_version),
        birth_commitment=bytes(commitment),
        created_at=_from_text(created_at, f"created_at of DEK {bytes(dek_id).hex()}"),
        actor=actor,
        contract_revision=int(revision),
    )


def _anchor_name(anchor: tuple[int, str] | None) -> str:
    return "no anchor" if anchor is None else f"seq {anchor[0]} ({anchor[1][:16]}...)"


def _split_sql(script: str) -> list[str]:
    """Split the schema script into statements (``executescript`` would commit our transaction)."""
    statements: list[str] = []
    buf: list[str] = []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf)
        if sqlite3.complete_statement(text):
            statements.append(text.strip())
            buf = []
    if "".join(buf).strip():
        raise AssertionError("incomplete schema statement")
    return statements
