"""A key registry in a DynamoDB table: the same interface and invariants as `SqliteKeyRegistry`.

Table layout (`create_table` makes it): partition key ``pk`` (S), sort key
``sk`` (S), on-demand billing, no secondary index. One table can hold several
registries; registry `name` owns partition ``pk = name`` and a few partitions
named after it:

- ``pk = name``, ``sk = "#head"``: the registry head: ``rev`` (bumped by
  every version write), ``max_version``, ``active_version`` (0 while empty),
  ``history_count`` and ``schema``;
- ``pk = name``, ``sk = "v#0000000001"``...: one item per key version (the
  `KeyVersion` fields; timestamps as fixed-width ISO-8601 UTC text);
- ``pk = name``, ``sk = "h#000000000001"``...: one item per history row, ids 1..n;
- ``pk = name + "#dek"``, ``sk = "e#" + dek_id.hex()``: one DEK directory
  entry per DEK (the `DekEntry` fields, ids and envelopes as binary, plus
  ``updated_at``); `lookup_deks` reads these with BatchGetItem and
  `list_deks()` queries this partition in dek_id order;
- ``pk = name + "#dek#v0000000001"``..., ``sk = "x#" + dek_id.hex()``: a copy
  of each entry in the partition of the key version that wraps it now, so
  `list_deks(key_version=n)` is one Query of that partition, in dek_id order;
- ``pk = name + "#dek#n"``, ``sk = "n#0000000001"``...: per version, ``count``
  = the entries wrapped under it (absent = 0); `dek_count` and
  `deks_by_version` read only these;
- ``pk = name + "#contract"``: ``sk = "c#" + dataset`` holds a dataset's
  current contract (``revision``, ``contract`` = `DatasetContract.to_text`),
  ``sk = "ch#" + dataset + "#0000000001"``... its append-only history.
- ``pk = name + "#audit"``, ``sk = "a#anchor"``: the key home's audit
  anchor, ``seq`` and ``hash`` of the last anchored audit entry (see
  `keyturn.audit.chain`), moved forward only by a conditional put on the
  ``seq`` and ``hash`` that were read (``attribute_not_exists`` for the
  first). Deny ``dynamodb:PutItem``/``DeleteItem`` on it to everyone but the
  key home's operators: whoever can rewrite it can hide a deleted log tail.

Directory and contract items live outside ``pk = name``, so the snapshot
every version write reads stays as small as the version history. Every kind
of item has its own ``sk`` prefix, so partitions of differently named
registries can never hold the same item. The directory and contracts only
add items: a table and registries made before they existed keep working, and
`SCHEMA_VERSION` is unchanged (an older keyturn ignores the new items, so it
would not refuse to retire a version that still wraps DEKs: do not mix
versions on one registry).

Contracts:

- Every write reads a consistent snapshot, refuses to touch a state that
  already breaks an invariant, computes the new state in memory, runs
  `check_invariants` (and the history replay) on the *result*, and only then
  commits it in one ``TransactWriteItems``. The transaction is conditional on
  the head still holding the ``rev``, ``max_version``, ``active_version`` and
  ``history_count`` that were read (``attribute_not_exists`` for a new
  registry), each new item not existing yet, and each changed version still
  being in the state it was read in. So the validated result is exactly what
  gets stored, and two concurrent rotations can never both commit: the loser
  re-reads and retries (jittered backoff) up to `max_conflict_retries` times,
  then raises `ConcurrentModificationError`. `rotate(expect_active=n)` re-runs
  `check_rotation` on every retry, so a loser that expected the version the
  winner demoted is refused instead of rotating again.
- An `Inventory` is consulted after the read and before the conditional
  write; if the version changed in between, the condition fails and the
  whole step (inventory included) runs again.
- The DEK directory (see `keyturn.directory`) keeps its counters exact by
  changing them only in the transaction that adds or moves entries:
  `register_deks` puts each entry (``attribute_not_exists``) and its
  per-version copy, adds to the version's counter and checks that the
  version item is still ``active`` or ``decrypt_only``; `replace_wrapping`
  updates the entry on condition that it still holds the expected envelope,
  moves the copy, moves one count from the old version's counter to the new
  one and checks that the new version is readable. `retire` and
  `schedule_deletion` read the version's counter (``VersionInUseError`` while
  it is > 0, via `plan_transition`) and condition their transaction on it
  still being 0, so a registration or rewrap racing a retire either lands
  first (and the retire is refused on its retry) or finds the version no
  longer readable (and is refused on its retry).
- `register_deks` writes at most `_TRANSACT_MAX` actions per transaction
  (two per entry, two per key version involved): a batch of more than ~49
  DEKs is several transactions. Each is atomic; if one fails, the entries of
  the earlier ones stay registered, which is harmless because registering
  them again is a no-op, and a DEK is only used once `register_deks` returned.
- `lookup_deks` asks BatchGetItem for at most `LOOKUP_BATCH` ids per request
  (strongly consistent), retrying unprocessed keys a bounded number of times.
- Contracts: `pin_contract` is a conditional put (insert-if-absent, the
  stored contract wins), `evolve_contract` a put conditional on the stored
  revision; each also puts its history item (``attribute_not_exists``) in
  the same transaction. A contract item must fit DynamoDB's 400 KB item limit.
- Reads are consistent snapshots: a strongly consistent Query of the
  partition (head first, by sort order), then a strongly consistent read of
  the head; if ``rev`` moved, the read is repeated. Directory and contract
  reads are strongly consistent reads of their own items.
- ``versions()``, ``get()`` and ``history()`` return what is stored;
  ``active()``, ``due_for_deletion()``, ``check()`` and every write validate
  and raise `RegistryInvariantError` on a damaged registry (for example two
  active versions, a gap, a head that disagrees with the items, or states
  that disagree with history). Directory and contract writes validate the
  registry first too, like the SQLite backend.
- keyturn never deletes items, except that `replace_wrapping` deletes the
  entry's copy under its old version (inside its transaction). DynamoDB
  cannot forbid deletes the way SQLite triggers do, so deny
  ``dynamodb:DeleteItem`` in IAM on every partition but the per-version copy
  partitions (condition key ``dynamodb:LeadingKeys`` not like
  ``*#dek#v*``); a blanket deny makes every rewrap fail with `RegistryError`.
  A deleted version or history item is detected as damage; a deleted copy
  only hides an entry from `list_deks(key_version=...)`, never from the
  counter that guards `retire`.
- Without an injected client the registry holds only names and settings and
  pickles cleanly (each process builds its own client on first use).
- AWS failures (a missing table, no credentials, an unreachable endpoint
  after retries) raise `RegistryError`. If a write's outcome is unknown (the
  connection dropped after sending), re-read before repeating it.
- moto (the test server) applies TransactWriteItems without a lock, so two
  concurrent transactions can both pass their conditions there; the test
  suite serializes moto's requests (tests/aws_support.py). Real DynamoDB
  transactions are serializable, which the conditions above rely on.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

from keyturn.aws.clients import ClientSettings, error_code, make_client
from keyturn.contract import DatasetContract
from keyturn.directory import (
    LOOKUP_BATCH, DekEntry, WrappingSwap, check_contract_revisions, check_new_entries, check_rewrap, replace_one_by_one,
)
from keyturn.errors import (
    ConcurrentModificationError,
    ContractError,
    DirectoryError,
    RegistryError,
    RegistryInvariantError,
    UnknownVersionError,
)
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

__all__ = ["DynamoDbKeyRegistry", "create_table", "SCHEMA_VERSION", "HEAD_SK"]

#: Stored in the head item; a registry with a newer schema is refused.
SCHEMA_VERSION = 1
HEAD_SK = "#head"
_VERSION_PREFIX = "v#"
_HISTORY_PREFIX = "h#"
_SNAPSHOT_TRIES = 20
_DEK_PREFIX = "e#"  # directory entries, in partition <name>#dek
_COPY_PREFIX = "x#"  # per-version copies, in partition <name>#dek#v<version>
_COUNT_PREFIX = "n#"  # per-version entry counters, in partition <name>#dek#n
_CONTRACT_PREFIX = "c#"  # current contracts, in partition <name>#contract
_CONTRACT_HISTORY_PREFIX = "ch#"  # contract history, same partition
_ANCHOR_SK = "a#anchor"  # the audit anchor, in partition <name>#audit
_TRANSACT_MAX = 100  # DynamoDB's cap on actions per TransactWriteItems
_BATCH_GET_TRIES = 8  # BatchGetItem attempts while keys come back unprocessed
_READABLE = (KeyState.ACTIVE, KeyState.DECRYPT_ONLY)

def _version_sk(version: int) -> str:
    return f"{_VERSION_PREFIX}{version:010d}"


def _history_sk(entry_id: int) -> str:
    return f"{_HISTORY_PREFIX}{entry_id:012d}"


# ------------------------------------------------------------------ item codec


def _s(item: dict[str, Any], key: str, what: str, *, optional: bool = False) -> str | None:
    attr = item.get(key)
    if attr is None:
        if optional:
            return None
        raise RegistryInvariantError(f"stored {what} has no {key!r}")
    if not isinstance(attr, dict) or "S" not in attr:
        if optional and isinstance(attr, dict) and attr.get("NULL"):
            return None
        raise RegistryInvariantError(f"stored {what} has a non-string {key!r}")
    return attr["S"]


def _n(item: dict[str, Any], key: str, what: str) -> int:
    attr = item.get(key)
    if not isinstance(attr, dict) or "N" not in attr:
        raise RegistryInvariantError(f"stored {what} has no numeric {key!r}")
    try:
        return int(attr["N"])
    except ValueError as e:
        raise RegistryInvariantError(f"stored {what} has a non-integer {key!r}") from e


def _numbered(item: dict[str, Any], key: str, sk_of: Callable[[int], str], holds: str) -> tuple[int, str]:
    """(number `key`, the item's name for messages) of an item whose sk must be `sk_of(number)`."""
    sk = item["sk"]["S"]
    what = f"item {sk!r}"
    number = _n(item, key, what)
    if sk != sk_of(number):
        raise RegistryInvariantError(f"stored {what} holds {holds} {number}")
    return number, what


def _item_to_version(item: dict[str, Any]) -> KeyVersion:
    version, what = _numbered(item, "version", _version_sk, "version")
    where = f"version {version}"
    delete_after = _s(item, "delete_after", what, optional=True)
    return KeyVersion(
        version=version,
        kek_id=_s(item, "kek_id", what) or "",
        state=_state(_s(item, "state", what), f"state of {where}"),
        created_at=_from_text(_s(item, "created_at", what), f"created_at of {where}"),
        actor=_s(item, "actor", what) or "",
        reason=_s(item, "reason", what) or "",
        state_changed_at=_from_text(_s(item, "state_changed_at", what), f"state_changed_at of {where}"),
        delete_after=None if delete_after is None else _from_text(delete_after, f"delete_after of {where}"),
    )


def _version_to_item(pk: str, v: KeyVersion) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": pk},
        "sk": {"S": _version_sk(v.version)},
        "version": {"N": str(v.version)},
        "kek_id": {"S": v.kek_id},
        "state": {"S": v.state.value},
        "created_at": {"S": _to_text(v.created_at)},
        "actor": {"S": v.actor},
        "reason": {"S": v.reason},
        "state_changed_at": {"S": _to_text(v.state_changed_at)},
    }
    if v.delete_after is not None:
        item["delete_after"] = {"S": _to_text(v.delete_after)}
    return item


def _item_to_history(item: dict[str, Any]) -> dict[str, Any]:
    entry_id, what = _numbered(item, "id", _history_sk, "history id")
    where = f"history row {entry_id}"
    from_state = _s(item, "from_state", what, optional=True)
    return {
        "id": entry_id,
        "version": _n(item, "version", what),
        "from_state": None if from_state is None else _state(from_state, f"from_state of {where}"),
        "to_state": _state(_s(item, "to_state", what), f"to_state of {where}"),
        "at": _from_text(_s(item, "at", what), f"time of {where}"),
        "actor": _s(item, "actor", what),
        "reason": _s(item, "reason", what),
    }


def _history_to_item(pk: str, h: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pk": {"S": pk},
        "sk": {"S": _history_sk(h["id"])},
        "id": {"N": str(h["id"])},
        "version": {"N": str(h["version"])},
        "to_state": {"S": h["to_state"].value},
        "at": {"S": _to_text(h["at"])},
        "actor": {"S": h["actor"]},
        "reason": {"S": h["reason"]},
    }
    if h["from_state"] is not None:
        item["from_state"] = {"S": h["from_state"].value}
    return item


def _b(item: dict[str, Any], key: str, what: str) -> bytes:
    attr = item.get(key)
    if not isinstance(attr, dict) or "B" not in attr:
        raise RegistryInvariantError(f"stored {what} has no binary {key!r}")
    return bytes(attr["B"])


def _count_sk(version: int) -> str:
    return f"{_COUNT_PREFIX}{version:010d}"


def _contract_history_sk(dataset: str, revision: int) -> str:
    return f"{_CONTRACT_HISTORY_PREFIX}{dataset}#{revision:010d}"


def _entry_to_item(pk: str, prefix: str, e: DekEntry, updated_at: datetime) -> dict[str, Any]:
    """One directory entry (``prefix`` = `_DEK_PREFIX`) or its per-version copy (`_COPY_PREFIX`)."""
    return {
        "pk": {"S": pk},
        "sk": {"S": prefix + e.dek_id.hex()},
        "dek_id": {"B": e.dek_id},
        "dataset": {"S": e.dataset},
        "partition": {"S": e.partition},
        "key_version": {"N": str(e.key_version)},
        "envelope": {"B": e.envelope},
        "birth_version": {"N": str(e.birth_version)},
        "birth_commitment": {"B": e.birth_commitment},
        "created_at": {"S": _to_text(e.created_at)},
        "actor": {"S": e.actor},
        "contract_revision": {"N": str(e.contract_revision)},
        "updated_at": {"S": _to_text(updated_at)},
    }


def _item_to_entry(item: dict[str, Any], prefix: str) -> DekEntry:
    sk = item.get("sk", {}).get("S", "")
    what = f"directory item {sk!r}"
    dek_id = _b(item, "dek_id", what)
    if sk != prefix + dek_id.hex():
        raise RegistryInvariantError(f"stored {what} holds DEK {dek_id.hex()}")
    return DekEntry(
        dek_id=dek_id,
        dataset=_s(item, "dataset", what) or "",
        partition=_s(item, "partition", what) or "",
        key_version=_n(item, "key_version", what),
        envelope=_b(item, "envelope", what),
        birth_version=_n(item, "birth_version", what),
        birth_commitment=_b(item, "birth_commitment", what),
        created_at=_from_text(_s(item, "created_at", what), f"created_at of DEK {dek_id.hex()}"),
        actor=_s(item, "actor", what) or "",
        contract_revision=_n(item, "contract_revision", what),
    )


def _same_birth(a: DekEntry, b: DekEntry) -> bool:
    """Registering `b` over `a` is a no-op (the SQLite backend compares the same fields)."""
    return (a.dataset, a.partition, a.birth_version, a.birth_commitment) == (
        b.dataset,
        b.partition,
        b.birth_version,
        b.birth_commitment,
    )


@dataclass
class _Head:
    rev: int
    max_version: int
    active_version: int
    history_count: int
    schema: int


def _item_to_head(item: dict[str, Any] | None) -> _Head | None:
    if item is None:
        return None
    what = "registry head"
    return _Head(
        rev=_n(item, "rev", what),
        max_version=_n(item, "max_version", what),
        active_version=_n(item, "active_version", what),
        history_count=_n(item, "history_count", what),
        schema=_n(item, "schema", what),
    )


@dataclass
class _Snapshot:
    """A consistent read of one registry: head (None if absent), versions and history, as stored."""

    head: _Head | None
    version_items: list[dict[str, Any]]
    history_items: list[dict[str, Any]]

    @property
    def rev(self) -> int:
        return 0 if self.head is None else self.head.rev

    def versions(self) -> list[KeyVersion]:
        return sorted((_item_to_version(i) for i in self.version_items), key=lambda v: v.version)

    def history(self) -> list[dict[str, Any]]:
        return sorted((_item_to_history(i) for i in self.history_items), key=lambda h: h["id"])


@dataclass
class _Plan:
    """What a write will store: changed versions (with the state each had when read) and new history rows."""

    result: int
    changed: list[tuple[KeyVersion, KeyState | None]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    conditions: list[dict[str, Any]] = field(default_factory=list)  # extra ConditionCheck actions


def _validate(head: _Head | None, versions: list[KeyVersion], history: list[dict[str, Any]]) -> None:
    """`check_invariants`, the head agreeing with the items, and history replaying to the stored states."""
    if head is not None and head.schema > SCHEMA_VERSION:
        raise RegistryError(f"registry has schema {head.schema}; this keyturn supports up to {SCHEMA_VERSION}")
    check_invariants(versions)
    if head is None:
        if versions or history:
            raise RegistryInvariantError("registry has version or history items but no head item")
    else:
        active = next((v.version for v in versions if v.state is KeyState.ACTIVE), 0)
        if (head.max_version, head.active_version, head.history_count) != (len(versions), active, len(history)):
            raise RegistryInvariantError(
                f"registry head (max_version={head.max_version}, active_version={head.active_version}, "
                f"history_count={head.history_count}) disagrees with the stored items "
                f"({len(versions)} versions, active {active}, {len(history)} history rows)"
            )
    ids = [h["id"] for h in history]
    if ids != list(range(1, len(ids) + 1)):
        raise RegistryInvariantError(f"history ids must be 1..n without gaps, found {ids}")
    check_history(versions, history)


class _Conflict(Exception):
    """Another writer committed first."""


# ------------------------------------------------------------------ the registry


class DynamoDbKeyRegistry(LifecycleMethods):
    """`KeyRegistry` in one partition of a DynamoDB table; see the module docstring for contracts."""

    def __init__(
        self,
        table: str,
        *,
        name: str = "default",
        client: Any = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        max_attempts: int = 5,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        clock: Callable[[], datetime] = utc_now,
        max_conflict_retries: int = 50,
    ) -> None:
        """Use registry `name` in `table` through the injected boto3 DynamoDB `client`, or build one."""
        self._table = require_text("table", table)
        self._pk = require_text("name", name)
        if not callable(clock):
            raise TypeError("clock must be callable")
        if isinstance(max_conflict_retries, bool) or not isinstance(max_conflict_retries, int) or max_conflict_retries < 0:
            raise ValueError("max_conflict_retries must be an int >= 0")
        if client is not None and (region is not None or endpoint_url is not None):
            raise ValueError("give an injected client or region/endpoint_url, not both")
        self._settings = None if client is not None else ClientSettings(
            region, endpoint_url, max_attempts, connect_timeout, read_timeout
        )
        self._client = client
        self._injected = client is not None
        self._clock = clock
        self._max_conflict_retries = max_conflict_retries
        self._lock = threading.Lock()

    @property
    def table(self) -> str:
        return self._table

    @property
    def name(self) -> str:
        return self._pk

    def __repr__(self) -> str:
        return f"{type(self).__name__}(table={self._table!r}, name={self._pk!r})"

    def __getstate__(self) -> dict[str, Any]:
        if self._injected:
            raise TypeError(
                "a DynamoDbKeyRegistry built around an injected client cannot be pickled; "
                "build it from region/endpoint_url (or an AwsKeySource) instead"
            )
        state = self.__dict__.copy()
        state["_client"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> Any:
        """The boto3 DynamoDB client (built on first use)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    assert self._settings is not None
                    try:
                        self._client = make_client("dynamodb", self._settings)
                    except NoRegionError:
                        raise RegistryError("no AWS region for the DynamoDB registry: pass region= or set AWS_REGION") from None
        return self._client

    def _aws(self, operation: str, **params: Any) -> dict[str, Any]:
        try:
            return getattr(self.client, operation)(**params)
        except ClientError as exc:
            code = error_code(exc)
            if code == "ResourceNotFoundException":
                raise RegistryError(f"DynamoDB table {self._table!r} does not exist (create it with create_table)") from None
            raise RegistryError(f"DynamoDB {operation} on {self._table!r} failed ({code or 'unknown error'})") from exc
        except BotoCoreError as exc:
            raise RegistryError(f"DynamoDB {operation} on {self._table!r} failed ({type(exc).__name__})") from exc

    def _get_head(self) -> _Head | None:
        response = self._aws(
            "get_item", TableName=self._table, Key={"pk": {"S": self._pk}, "sk": {"S": HEAD_SK}}, ConsistentRead=True
        )
        return _item_to_head(response.get("Item"))

    def _snapshot(self) -> _Snapshot:
        """A consistent snapshot: Query the partition, then re-read the head and retry if `rev` moved."""
        for _ in range(_SNAPSHOT_TRIES):
            items: list[dict[str, Any]] = []
            params: dict[str, Any] = {
                "TableName": self._table,
                "KeyConditionExpression": "pk = :pk",
                "ExpressionAttributeValues": {":pk": {"S": self._pk}},
                "ConsistentRead": True,
            }
            while True:
                page = self._aws("query", **params)
                items.extend(page.get("Items", []))
                if not page.get("LastEvaluatedKey"):
                    break
                params["ExclusiveStartKey"] = page["LastEvaluatedKey"]
            head_items = [i for i in items if i.get("sk", {}).get("S") == HEAD_SK]
            head = _item_to_head(head_items[0] if head_items else None)
            again = self._get_head()
            if (None if head is None else head.rev) == (None if again is None else again.rev):
                return _Snapshot(
                    head=head,
                    version_items=[i for i in items if i["sk"]["S"].startswith(_VERSION_PREFIX)],
                    history_items=[i for i in items if i["sk"]["S"].startswith(_HISTORY_PREFIX)],
                )
        raise ConcurrentModificationError(f"registry {self._pk!r} kept changing while it was read; try again")

    def _write(self, op: Callable[[list[KeyVersion], datetime], _Plan]) -> KeyVersion:
        """Run `op` on a validated snapshot, validate its result, and commit it conditionally (retrying on conflict)."""
        for attempt in range(self._max_conflict_retries + 1):
            snap = self._snapshot()
            versions, history = snap.versions(), snap.history()
            _validate(snap.head, versions, history)
            now = self._now()
            plan = op(versions, now)
            if not plan.changed:
                return next(v for v in versions if v.version == plan.result)
            after = {v.version: v for v in versions}
            for v, _src in plan.changed:
                after[v.version] = v
            new_versions = [after[n] for n in sorted(after)]
            first_id = len(history) + 1
            new_history = [dict(h, id=first_id + i) for i, h in enumerate(plan.history)]
            active = next((v.version for v in new_versions if v.state is KeyState.ACTIVE), 0)
            new_head = _Head(
                rev=snap.rev + 1,
                max_version=len(new_versions),
                active_version=active,
                history_count=len(history) + len(new_history),
                schema=SCHEMA_VERSION,
            )
            _validate(new_head, new_versions, history + new_history)  # the result, before it is committed
            try:
                self._commit(snap.head, new_head, plan.changed, new_history, plan.conditions)
            except _Conflict:
                self._backoff(attempt)
                continue
            return after[plan.result]
        raise self._too_many_conflicts()

    @staticmethod
    def _backoff(attempt: int) -> None:
        time.sleep(random.uniform(0, min(0.25, 0.005 * 2**attempt)))

    def _too_many_conflicts(self) -> ConcurrentModificationError:
        return ConcurrentModificationError(
            f"registry {self._pk!r}: {self._max_conflict_retries + 1} attempts lost to concurrent writers; try again"
        )

    def _commit(
        self,
        old: _Head | None,
        new: _Head,
        changed: list[tuple[KeyVersion, KeyState | None]],
        history: list[dict[str, Any]],
        conditions: Sequence[dict[str, Any]] = (),
    ) -> None:
        head_item = {
            "pk": {"S": self._pk},
            "sk": {"S": HEAD_SK},
            "rev": {"N": str(new.rev)},
            "max_version": {"N": str(new.max_version)},
            "active_version": {"N": str(new.active_version)},
            "history_count": {"N": str(new.history_count)},
            "schema": {"N": str(new.schema)},
        }
        head_put: dict[str, Any] = {"TableName": self._table, "Item": head_item}
        if old is None:
            head_put["ConditionExpression"] = "attribute_not_exists(sk)"
        else:
            head_put["ConditionExpression"] = "#rev = :rev AND #mv = :mv AND #av = :av AND #hc = :hc"
            head_put["ExpressionAttributeNames"] = {
                "#rev": "rev",
                "#mv": "max_version",
                "#av": "active_version",
                "#hc": "history_count",
            }
            head_put["ExpressionAttributeValues"] = {
                ":rev": {"N": str(old.rev)},
                ":mv": {"N": str(old.max_version)},
                ":av": {"N": str(old.active_version)},
                ":hc": {"N": str(old.history_count)},
            }
        items: list[dict[str, Any]] = [{"Put": head_put}]
        for version, src in changed:
            put: dict[str, Any] = {"TableName": self._table, "Item": _version_to_item(self._pk, version)}
            if src is None:
                put["ConditionExpression"] = "attribute_not_exists(sk)"
            else:
                put["ConditionExpression"] = "#st = :src"
                put["ExpressionAttributeNames"] = {"#st": "state"}
                put["ExpressionAttributeValues"] = {":src": {"S": src.value}}
            items.append({"Put": put})
        for h in history:
            items.append(
                {
                    "Put": {
                        "TableName": self._table,
                        "Item": _history_to_item(self._pk, h),
                        "ConditionExpression": "attribute_not_exists(sk)",
                    }
                }
            )
        items.extend(conditions)
        self._transact(items)

    def _transact(self, items: list[dict[str, Any]]) -> None:
        """One TransactWriteItems; `_Conflict` if a condition failed or another transaction was in the way."""
        try:
            self.client.transact_write_items(TransactItems=items, ClientRequestToken=uuid.uuid4().hex)
        except ClientError as exc:
            code = error_code(exc)
            reasons = {str(r.get("Code")) for r in exc.response.get("CancellationReasons", []) or []}
            if code == "TransactionConflictException" or (
                code == "TransactionCanceledException"
                and reasons & {"ConditionalCheckFailed", "TransactionConflict"}
            ):
                raise _Conflict() from None
            if code == "ResourceNotFoundException":
                raise RegistryError(f"DynamoDB table {self._table!r} does not exist (create it with create_table)") from None
            raise RegistryError(f"DynamoDB TransactWriteItems on {self._table!r} failed ({code or 'unknown error'})") from exc
        except BotoCoreError as exc:
            raise RegistryError(
                f"DynamoDB TransactWriteItems on {self._table!r} failed ({type(exc).__name__}); "
                "its outcome is unknown: re-read the registry before repeating the write"
            ) from exc

    @staticmethod
    def _find(versions: list[KeyVersion], version: int) -> KeyVersion:
        return find_version(versions, version)

    @staticmethod
    def _history_row(version: int, src: KeyState | None, dst: KeyState, now: datetime, actor: str, reason: str) -> dict[str, Any]:
        return {"version": version, "from_state": src, "to_state": dst, "at": now, "actor": actor, "reason": reason}

    def _new_active(self, version: int, kek_id: str, now: datetime, actor: str, reason: str) -> tuple[KeyVersion, dict[str, Any]]:
        v = KeyVersion(
            version=version,
            kek_id=kek_id,
            state=KeyState.ACTIVE,
            created_at=now,
            actor=actor,
            reason=reason,
            state_changed_at=now,
        )
        return v, self._history_row(version, None, KeyState.ACTIVE, now, actor, reason)

    def _empty_error(self) -> RegistryError:
        return RegistryError(f"key registry {self._pk!r} in table {self._table!r} is empty; call initialize() first")

    def _transition(self, change: Transition) -> KeyVersion:
        version = change.version

        def apply(versions: list[KeyVersion], now: datetime) -> _Plan:
            # The counter is read here and the commit is conditional on it still being 0,
            # so no registration or rewrap onto the version can slip in between.
            refs = self._dek_refs(version) if change.guarded and 1 <= version <= len(versions) else 0
            current, dst, delete_after = change.plan(versions, now, directory_refs=refs)
            src = current.state
            changed = replace(current, state=dst, state_changed_at=now, delete_after=delete_after)
            return _Plan(
                result=version,
                changed=[(changed, src)],
                history=[self._history_row(version, src, dst, now, change.actor, change.reason)],
                conditions=[self._no_entries_check(version)] if change.guarded else [],
            )

        return self._write(apply)

    # ------------------------------------------------------------------ reads

    def versions(self) -> list[KeyVersion]:
        """All versions, ascending, as stored (not validated)."""
        return self._snapshot().versions()

    def get(self, version: int) -> KeyVersion:
        """One version as stored; `UnknownVersionError` if absent."""
        require_version(version)
        if version < 1:
            raise UnknownVersionError(f"no key version {version}")
        response = self._aws(
            "get_item",
            TableName=self._table,
            Key={"pk": {"S": self._pk}, "sk": {"S": _version_sk(version)}},
            ConsistentRead=True,
        )
        item = response.get("Item")
        if item is None:
            raise UnknownVersionError(f"no key version {version}")
        return _item_to_version(item)

    def active(self) -> KeyVersion:
        """The single active version; `RegistryError` if empty, `RegistryInvariantError` if damaged."""
        versions = self.check()
        if not versions:
            raise self._empty_error()
        return next(v for v in versions if v.state is KeyState.ACTIVE)

    def history(self) -> list[dict[str, Any]]:
        """Every recorded transition, oldest first, as stored (same keys as `SqliteKeyRegistry.history`)."""
        return self._snapshot().history()

    def check(self) -> list[KeyVersion]:
        """Load and validate everything; return the versions or raise `RegistryInvariantError`."""
        snap = self._snapshot()
        versions = snap.versions()
        _validate(snap.head, versions, snap.history())
        return versions

    # ------------------------------------------------------------------ writes

    def initialize(self, kek_id: str, *, actor: str, reason: str) -> KeyVersion:
        """Create version 1 as active if the registry is empty; else return the active version unchanged."""
        require_text("kek_id", kek_id)
        require_text("actor", actor)
        require_text("reason", reason)

        def apply(versions: list[KeyVersion], now: datetime) -> _Plan:
            if versions:
                return _Plan(result=next(v.version for v in versions if v.state is KeyState.ACTIVE))
            new, row = self._new_active(1, kek_id, now, actor, reason)
            return _Plan(result=1, changed=[(new, None)], history=[row])

        return self._write(apply)

    def rotate(self, kek_id: str, *, actor: str, reason: str, expect_active: int | None = None) -> KeyVersion:
        """Atomically add version max+1 as active and demote the old active to decrypt_only.

        `RegistryError` if the registry is empty (call `initialize` first).
        With KMS key rotation `kek_id` may equal the old version's. With
        `expect_active`, `ConcurrentModificationError` unless that version is
        still the active one (checked again on every conflict retry).
        """
        require_text("kek_id", kek_id)
        require_text("actor", actor)
        require_text("reason", reason)

        def apply(versions: list[KeyVersion], now: datetime) -> _Plan:
            if not versions:
                raise self._empty_error()
            old = next(v for v in versions if v.state is KeyState.ACTIVE)
            check_rotation(versions, old, kek_id, expect_active)
            demoted = replace(old, state=KeyState.DECRYPT_ONLY, state_changed_at=now, delete_after=None)
            number = len(versions) + 1
            new, row = self._new_active(number, kek_id, now, actor, reason)
            return _Plan(
                result=number,
                changed=[(demoted, KeyState.ACTIVE), (new, None)],
                history=[self._history_row(old.version, KeyState.ACTIVE, KeyState.DECRYPT_ONLY, now, actor, reason), row],
            )

        return self._write(apply)

    # ------------------------------------------------------------------ DEK directory: items and actions

    def _dek_pk(self) -> str:
        return f"{self._pk}#dek"

    def _copy_pk(self, version: int) -> str:
        return f"{self._pk}#dek#v{version:010d}"

    def _count_pk(self) -> str:
        return f"{self._pk}#dek#n"

    def _contract_pk(self) -> str:
        return f"{self._pk}#contract"

    def _entry_key(self, dek_id: bytes) -> dict[str, Any]:
        return {"pk": {"S": self._dek_pk()}, "sk": {"S": _DEK_PREFIX + dek_id.hex()}}

    def _count_key(self, version: int) -> dict[str, Any]:
        return {"pk": {"S": self._count_pk()}, "sk": {"S": _count_sk(version)}}

    def _count_add(self, version: int, delta: int) -> dict[str, Any]:
        """Update action: add `delta` to the entry counter of `version` (created at 0 if absent)."""
        return {
            "Update": {
                "TableName": self._table,
                "Key": self._count_key(version),
                "UpdateExpression": "ADD #c :d SET #v = :v",
                "ExpressionAttributeNames": {"#c": "count", "#v": "version"},
                "ExpressionAttributeValues": {":d": {"N": str(delta)}, ":v": {"N": str(version)}},
            }
        }

    def _readable_check(self, version: int) -> dict[str, Any]:
        """ConditionCheck action: `version` is still active or decrypt_only."""
        return {
            "ConditionCheck": {
                "TableName": self._table,
                "Key": {"pk": {"S": self._pk}, "sk": {"S": _version_sk(version)}},
                "ConditionExpression": "#st = :a OR #st = :d",
                "ExpressionAttributeNames": {"#st": "state"},
                "ExpressionAttributeValues": {":a": {"S": _READABLE[0].value}, ":d": {"S": _READABLE[1].value}},
            }
        }

    def _no_entries_check(self, version: int) -> dict[str, Any]:
        """ConditionCheck action: no directory entry is wrapped under `version` (counter absent or 0)."""
        return {
            "ConditionCheck": {
                "TableName": self._table,
                "Key": self._count_key(version),
                "ConditionExpression": "attribute_not_exists(#c) OR #c = :zero",
                "ExpressionAttributeNames": {"#c": "count"},
                "ExpressionAttributeValues": {":zero": {"N": "0"}},
            }
        }

    @staticmethod
    def _count_of(item: dict[str, Any] | None, version: int) -> int:
        if item is None:
            return 0
        count = _n(item, "count", f"DEK counter of version {version}")
        if count < 0:
            raise RegistryInvariantError(f"the DEK counter of version {version} is negative ({count})")
        return count

    def _dek_refs(self, version: int) -> int:
        """Entries wrapped under `version`, from its counter (one strongly consistent read)."""
        if version < 1:
            return 0
        response = self._aws("get_item", TableName=self._table, Key=self._count_key(version), ConsistentRead=True)
        return self._count_of(response.get("Item"), version)

    def _query_prefix(
        self, pk: str, prefix: str, *, after: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Items of partition `pk` whose sk starts with `prefix` (and sorts after prefix+`after`), in sk order."""
        params: dict[str, Any] = {
            "TableName": self._table,
            "KeyConditionExpression": "pk = :pk AND sk > :lo",
            "ExpressionAttributeValues": {":pk": {"S": pk}, ":lo": {"S": prefix + (after or "")}},
            "ConsistentRead": True,
        }
        out: list[dict[str, Any]] = []
        while True:
            if limit is not None:
                params["Limit"] = limit - len(out)
            page = self._aws("query", **params)
            for item in page.get("Items", []):
                if not item.get("sk", {}).get("S", "").startswith(prefix):
                    return out  # sorted: nothing further has the prefix
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
            if not page.get("LastEvaluatedKey"):
                return out
            params["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _batch_get(self, keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Strongly consistent BatchGetItem, `LOOKUP_BATCH` keys per request, unprocessed keys retried (bounded)."""
        items: list[dict[str, Any]] = []
        for lo in range(0, len(keys), LOOKUP_BATCH):
            request = {self._table: {"Keys": keys[lo : lo + LOOKUP_BATCH], "ConsistentRead": True}}
            for attempt in range(_BATCH_GET_TRIES):
                response = self._aws("batch_get_item", RequestItems=request)
                items.extend(response.get("Responses", {}).get(self._table, []))
                left = ((response.get("UnprocessedKeys") or {}).get(self._table) or {}).get("Keys")
                if not left:
                    break
                if attempt + 1 == _BATCH_GET_TRIES:
                    raise RegistryError(
                        f"DynamoDB BatchGetItem on {self._table!r} left {len(left)} key(s) unprocessed "
                        f"after {_BATCH_GET_TRIES} attempts (throttled); try again"
                    )
                request = {self._table: {"Keys": left, "ConsistentRead": True}}
                time.sleep(random.uniform(0, min(1.0, 0.02 * 2**attempt)))
        return items

    def _get_entries(self, dek_ids: Sequence[bytes]) -> dict[bytes, DekEntry]:
        out: dict[bytes, DekEntry] = {}
        for item in self._batch_get([self._entry_key(d) for d in dek_ids]):
            entry = _item_to_entry(item, _DEK_PREFIX)
            out[entry.dek_id] = entry
        return out

    @staticmethod
    def _register_chunks(entries: list[DekEntry]) -> list[list[DekEntry]]:
        """Split so each transaction holds at most `_TRANSACT_MAX` actions (2 per entry, 2 per version)."""
        chunks: list[list[DekEntry]] = []
        chunk: list[DekEntry] = []
        versions: set[int] = set()
        for e in entries:
            grown = versions | {e.key_version}
            if chunk and 2 * (len(chunk) + 1) + 2 * len(grown) > _TRANSACT_MAX:
                chunks.append(chunk)
                chunk, grown = [], {e.key_version}
            chunk.append(e)
            versions = grown
        if chunk:
            chunks.append(chunk)
        return chunks

    def _register_actions(self, chunk: list[DekEntry], now: datetime) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = []
        for e in chunk:
            actions.append(
                {
                    "Put": {
                        "TableName": self._table,
                        "Item": _entry_to_item(self._dek_pk(), _DEK_PREFIX, e, now),
                        "ConditionExpression": "attribute_not_exists(sk)",
                    }
                }
            )
            actions.append(
                {"Put": {"TableName": self._table, "Item": _entry_to_item(self._copy_pk(e.key_version), _COPY_PREFIX, e, now)}}
            )
        for version, n in sorted(Counter(e.key_version for e in chunk).items()):
            actions.append(self._count_add(version, n))
            actions.append(self._readable_check(version))
        return actions

    def _rewrap_actions(self, entry: DekEntry, moved: DekEntry, now: datetime) -> list[dict[str, Any]]:
        actions: list[dict[str, Any]] = [
            {
                "Put": {
                    "TableName": self._table,
                    "Item": _entry_to_item(self._dek_pk(), _DEK_PREFIX, moved, now),
                    "ConditionExpression": "#env = :expected",
                    "ExpressionAttributeNames": {"#env": "envelope"},
                    "ExpressionAttributeValues": {":expected": {"B": entry.envelope}},
                }
            },
            {"Put": {"TableName": self._table, "Item": _entry_to_item(self._copy_pk(moved.key_version), _COPY_PREFIX, moved, now)}},
            self._readable_check(moved.key_version),
        ]
        if moved.key_version != entry.key_version:
            old_copy = {"pk": {"S": self._copy_pk(entry.key_version)}, "sk": {"S": _COPY_PREFIX + entry.dek_id.hex()}}
            actions.append({"Delete": {"TableName": self._table, "Key": old_copy}})
            actions.append(self._count_add(entry.key_version, -1))
            actions.append(self._count_add(moved.key_version, 1))
        return actions

    # ------------------------------------------------------------------ DEK directory

    def register_deks(self, entries: Sequence[DekEntry]) -> None:
        """Register new DEKs (see `keyturn.directory`); identical re-registration is a no-op.

        Every entry is validated against the registry (`check_new_entries`:
        a readable version, the registry's KEK for it); a dek_id already
        registered (or given twice) with another birth raises
        `DirectoryError` and registers nothing. Each transaction also checks
        that the versions are still readable, so a racing retire either
        refuses or makes this refuse. Up to ~49 entries are one transaction
        (module docstring).
        """
        entries = list(entries)
        if not entries:
            return
        for attempt in range(self._max_conflict_retries + 1):
            versions = self.check()
            check_new_entries(
                entries, {v.version: v.kek_id for v in versions}, [v.version for v in versions if v.state.readable]
            )
            # read, not a condition: a contract evolved between this read and the write is not caught here
            revisions = {}
            for dataset in {e.dataset for e in entries}:
                contract = self.get_contract(dataset)
                if contract is not None:
                    revisions[dataset] = contract.revision
            check_contract_revisions(entries, revisions)
            todo: dict[bytes, DekEntry] = {}
            for e in entries:
                first = todo.setdefault(e.dek_id, e)
                if not _same_birth(first, e):
                    raise DirectoryError(f"DEK {e.dek_id.hex()} is given twice with different births")
            for dek_id, stored in self._get_entries(sorted(todo)).items():
                if not _same_birth(stored, todo[dek_id]):
                    raise DirectoryError(f"DEK {dek_id.hex()} is already registered with another birth")
                del todo[dek_id]
            if not todo:
                return
            now = self._now()
            try:
                for chunk in self._register_chunks([todo[d] for d in sorted(todo)]):
                    self._transact(self._register_actions(chunk, now))
            except _Conflict:  # registered meanwhile, or a version stopped being readable: re-read
                self._backoff(attempt)
                continue
            return
        raise self._too_many_conflicts()

    def lookup_deks(self, dek_ids: Iterable[bytes]) -> dict[bytes, DekEntry]:
        """Registered entries of `dek_ids` (absent ids left out): one BatchGetItem per `LOOKUP_BATCH` ids."""
        wanted = sorted({bytes(d) for d in dek_ids})
        return self._get_entries(wanted) if wanted else {}

    def list_deks(self, *, key_version: int | None = None, after: bytes | None = None, limit: int = 1000) -> list[DekEntry]:
        """Entries in dek_id order after `after` (optionally only those under `key_version`), at most `limit`.

        One Query (paged by DynamoDB's 1 MB pages) of the entry partition, or
        of the version's copy partition: O(`limit`), whatever the directory's size.
        """
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if key_version is None:
            pk, prefix = self._dek_pk(), _DEK_PREFIX
        else:
            pk, prefix = self._copy_pk(require_version(key_version)), _COPY_PREFIX
        items = self._query_prefix(pk, prefix, after=None if after is None else bytes(after).hex(), limit=limit)
        out = [_item_to_entry(i, prefix) for i in items]
        for e in out:
            if key_version is not None and e.key_version != key_version:
                raise RegistryInvariantError(f"the copy of DEK {e.dek_id.hex()} under version {key_version} says {e.key_version}")
        return out

    def dek_count(self, key_version: int | None = None) -> int:
        """Entries wrapped under `key_version` (all entries if None), from the per-version counters."""
        if key_version is None:
            return sum(self.deks_by_version().values())
        return self._dek_refs(require_version(key_version))

    def deks_by_version(self) -> dict[int, int]:
        """Entries per current key version, ascending (versions without entries left out)."""
        out: dict[int, int] = {}
        for item in self._query_prefix(self._count_pk(), _COUNT_PREFIX):
            what = f"DEK counter {item['sk']['S']!r}"
            version = _n(item, "version", what)
            if item["sk"]["S"] != _count_sk(version):
                raise RegistryInvariantError(f"stored {what} counts version {version}")
            count = self._count_of(item, version)
            if count:
                out[version] = count
        return dict(sorted(out.items()))

    swap_batch = 1
    """Each swap is its own conditional write (a transaction across items would fail whole on one lost race)."""

    def replace_wrappings(self, swaps: Sequence[WrappingSwap]) -> list[bool]:
        """`replace_wrapping` for each swap, one conditional write each (`swap_batch` is 1)."""
        return replace_one_by_one(self, swaps)

    def replace_wrapping(self, dek_id: bytes, *, expected_envelope: bytes, new_envelope: bytes) -> bool:
        """Compare-and-set one entry's envelope (a validated rewrap of the same DEK onto a readable version).

        False if the entry no longer holds `expected_envelope`; `DirectoryError`
        if the DEK is not registered, the new envelope is not the same DEK
        under the registry's KEK, or its version is not readable.
        """
        dek_id, expected = bytes(dek_id), bytes(expected_envelope)
        for attempt in range(self._max_conflict_retries + 1):
            versions = self.check()
            item = self._aws("get_item", TableName=self._table, Key=self._entry_key(dek_id), ConsistentRead=True).get("Item")
            if item is None:
                raise DirectoryError(f"DEK {dek_id.hex()} is not in the directory")
            entry = _item_to_entry(item, _DEK_PREFIX)
            if entry.envelope != expected:
                return False
            moved = check_rewrap(entry, new_envelope, {v.version: v.kek_id for v in versions})
            if not find_version(versions, moved.key_version).state.readable:
                raise DirectoryError(f"cannot rewrap DEK {dek_id.hex()} onto version {moved.key_version}: it is not readable")
            now = self._now()
            try:
                self._transact(self._rewrap_actions(entry, moved, now))
            except _Conflict:  # moved meanwhile, or the version stopped being readable: re-read
                self._backoff(attempt)
                continue
            return True
        raise self._too_many_conflicts()

    # ------------------------------------------------------------------ audit anchor

    def _anchor_key(self) -> dict[str, Any]:
        return {"pk": {"S": self._pk + "#audit"}, "sk": {"S": _ANCHOR_SK}}

    def audit_anchor(self) -> tuple[int, str] | None:
        """(seq, hash) of the key home's anchored audit entry, or None if none was anchored yet."""
        item = self._aws("get_item", TableName=self._table, Key=self._anchor_key(), ConsistentRead=True).get("Item")
        if item is None:
            return None
        seq, digest = _n(item, "seq", "audit anchor"), _s(item, "hash", "audit anchor") or ""
        try:
            return check_anchor_move(seq, digest, None)
        except ValueError as exc:
            raise RegistryInvariantError(f"stored audit anchor is malformed: {exc}") from None

    def advance_audit_anchor(self, seq: int, digest: str, *, expected: tuple[int, str] | None) -> None:
        """Compare-and-set the anchor from `expected` (None: absent) to (`seq`, `digest`), forward only."""
        seq, digest = check_anchor_move(seq, digest, expected)
        put: dict[str, Any] = {
            "TableName": self._table,
            "Item": {
                **self._anchor_key(),
                "seq": {"N": str(seq)},
                "hash": {"S": digest},
                "updated_at": {"S": _to_text(self._now())},
            },
        }
        if expected is None:
            put["ConditionExpression"] = "attribute_not_exists(sk)"
        else:
            put["ConditionExpression"] = "#seq = :seq AND #hash = :hash"
            put["ExpressionAttributeNames"] = {"#seq": "seq", "#hash": "hash"}
            put["ExpressionAttributeValues"] = {":seq": {"N": str(expected[0])}, ":hash": {"S": expected[1]}}
        try:
            self.client.put_item(**put)
        except ClientError as exc:
            if error_code(exc) == "ConditionalCheckFailedException":
                raise ConcurrentModificationError(
                    f"the audit anchor of registry {self._pk!r} is no longer at "
                    f"{'no anchor' if expected is None else f'seq {expected[0]}'}: another writer moved it"
                ) from None
            if error_code(exc) == "ResourceNotFoundException":
                raise RegistryError(f"DynamoDB table {self._table!r} does not exist (create it with create_table)") from None
            raise RegistryError(f"DynamoDB PutItem on {self._table!r} failed ({error_code(exc) or 'unknown error'})") from exc
        except BotoCoreError as exc:
            raise RegistryError(f"DynamoDB PutItem on {self._table!r} failed ({type(exc).__name__})") from exc

    # ------------------------------------------------------------------ dataset contracts

    def _contract_item(self, dataset: str) -> dict[str, Any] | None:
        key = {"pk": {"S": self._contract_pk()}, "sk": {"S": _CONTRACT_PREFIX + dataset}}
        return self._aws("get_item", TableName=self._table, Key=key, ConsistentRead=True).get("Item")

    def _contract_actions(
        self, contract: DatasetContract, now: datetime, actor: str, reason: str, expected_revision: int | None
    ) -> list[dict[str, Any]]:
        text, at = contract.to_text(), _to_text(now)
        common = {
            "pk": {"S": self._contract_pk()},
            "dataset": {"S": contract.dataset},
            "revision": {"N": str(contract.revision)},
            "contract": {"S": text},
        }
        put: dict[str, Any] = {
            "TableName": self._table,
            "Item": {**common, "sk": {"S": _CONTRACT_PREFIX + contract.dataset}, "updated_at": {"S": at}},
        }
        if expected_revision is None:
            put["ConditionExpression"] = "attribute_not_exists(sk)"
        else:
            put["ConditionExpression"] = "#r = :r"
            put["ExpressionAttributeNames"] = {"#r": "revision"}
            put["ExpressionAttributeValues"] = {":r": {"N": str(expected_revision)}}
        history = {
            **common,
            "sk": {"S": _contract_history_sk(contract.dataset, contract.revision)},
            "at": {"S": at},
            "actor": {"S": actor},
            "reason": {"S": reason},
        }
        return [
            {"Put": put},
            {"Put": {"TableName": self._table, "Item": history, "ConditionExpression": "attribute_not_exists(sk)"}},
        ]

    def get_contract(self, dataset: str) -> DatasetContract | None:
        """The pinned contract of `dataset`, or None if nothing was ever written to it."""
        require_text("dataset", dataset)
        item = self._contract_item(dataset)
        return None if item is None else DatasetContract.stored(dataset, _s(item, "contract", f"contract of {dataset!r}"))

    def pin_contract(self, contract: DatasetContract, *, actor: str, reason: str) -> DatasetContract:
        """Store `contract` if its dataset has none yet (conditional put); return the stored one (the first writer's)."""
        require_text("actor", actor)
        require_text("reason", reason)
        if contract.revision != 1:
            raise ContractError("a first contract has revision 1")
        for attempt in range(self._max_conflict_retries + 1):
            self.check()
            item = self._contract_item(contract.dataset)
            if item is not None:
                return DatasetContract.stored(contract.dataset, _s(item, "contract", f"contract of {contract.dataset!r}"))
            now = self._now()
            try:
                self._transact(self._contract_actions(contract, now, actor, reason, None))
            except _Conflict:  # another first writer: return theirs on the next read
                self._backoff(attempt)
                continue
            return contract
        raise self._too_many_conflicts()

    def evolve_contract(self, contract: DatasetContract, *, expected_revision: int, actor: str, reason: str) -> DatasetContract:
        """Replace the dataset's contract with `contract` (revision `expected_revision` + 1), compare-and-set."""
        require_text("actor", actor)
        require_text("reason", reason)
        for attempt in range(self._max_conflict_retries + 1):
            self.check()
            item = self._contract_item(contract.dataset)
            if item is None:
                raise ContractError(f"dataset {contract.dataset!r} has no contract yet; its first write pins one")
            stored = _n(item, "revision", f"contract of {contract.dataset!r}")
            if stored != expected_revision or contract.revision != expected_revision + 1:
                raise ConcurrentModificationError(
                    f"the contract of dataset {contract.dataset!r} is at revision {stored}, not {expected_revision}"
                )
            now = self._now()
            try:
                self._transact(self._contract_actions(contract, now, actor, reason, expected_revision))
            except _Conflict:  # evolved meanwhile: the next read refuses
                self._backoff(attempt)
                continue
            return contract
        raise self._too_many_conflicts()

    def contract_history(self, dataset: str) -> list[dict[str, Any]]:
        """Every revision of `dataset`'s contract, oldest first (``revision``, ``contract``, ``at``, ``actor``, ``reason``)."""
        rows = []
        for item in self._query_prefix(self._contract_pk(), f"{_CONTRACT_HISTORY_PREFIX}{dataset}#"):
            what = f"contract history item {item['sk']['S']!r}"
            if _s(item, "dataset", what) != dataset:
                continue  # a dataset whose name is this one's plus "#..."
            revision = _n(item, "revision", what)
            if item["sk"]["S"] != _contract_history_sk(dataset, revision):
                raise RegistryInvariantError(f"stored {what} holds revision {revision}")
            rows.append(
                {
                    "revision": revision,
                    "contract": DatasetContract.stored(dataset, _s(item, "contract", what)),
                    "at": _from_text(_s(item, "at", what), "contract time"),
                    "actor": _s(item, "actor", what),
                    "reason": _s(item, "reason", what),
                }
            )
        return sorted(rows, key=lambda r: r["revision"])


def create_table(
    table: str,
    *,
    client: Any = None,
    region: str | None = None,
    endpoint_url: str | None = None,
    wait: bool = True,
) -> bool:
    """Create the registry table (pk/sk strings, on-demand billing) if absent; True if it was created.

    With `wait`, returns once the table is ACTIVE. Failures raise `RegistryError`.
    """
    require_text("table", table)
    if client is None:
        client = make_client("dynamodb", ClientSettings(region, endpoint_url))
    try:
        client.create_table(
            TableName=table,
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            BillingMode="PAY_PER_REQUEST",
        )
        created = True
    except ClientError as exc:
        if error_code(exc) != "ResourceInUseException":
            raise RegistryError(f"cannot create DynamoDB table {table!r} ({error_code(exc) or 'unknown error'})") from exc
        created = False
    except BotoCoreError as exc:
        raise RegistryError(f"cannot create DynamoDB table {table!r} ({type(exc).__name__})") from exc
    if wait:
        try:
            client.get_waiter("table_exists").wait(TableName=table, WaiterConfig={"Delay": 1, "MaxAttempts": 60})
        except (ClientError, BotoCoreError) as exc:
            raise RegistryError(f"DynamoDB table {table!r} did not become active ({type(exc).__name__})") from exc
    return created
