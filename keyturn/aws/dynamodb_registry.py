"""A key registry in a DynamoDB table: the same interface and invariants as `SqliteKeyRegistry`.

Table layout (`create_table` makes it): partition key ``pk`` (S), sort key
``sk`` (S), on-demand billing. One table can hold several registries; each
is one partition, ``pk`` = the registry `name`:

- ``sk = "#head"``: the registry head: ``rev`` (bumped by every write),
  ``max_version``, ``active_version`` (0 while empty), ``history_count`` and
  ``schema``;
- ``sk = "v#0000000001"``...: one item per key version (the `KeyVersion`
  fields; timestamps as fixed-width ISO-8601 UTC text);
- ``sk = "h#000000000001"``...: one item per history row, ids 1..n.

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
  then raises `ConcurrentModificationError`.
- An `Inventory` is consulted after the read and before the conditional
  write; if the version changed in between, the condition fails and the
  whole step (inventory included) runs again.
- Reads are consistent snapshots: a strongly consistent Query of the
  partition (head first, by sort order), then a strongly consistent read of
  the head; if ``rev`` moved, the read is repeated.
- ``versions()``, ``get()`` and ``history()`` return what is stored;
  ``active()``, ``due_for_deletion()``, ``check()`` and every write validate
  and raise `RegistryInvariantError` on a damaged registry (for example two
  active versions, a gap, a head that disagrees with the items, or states
  that disagree with history).
- keyturn never deletes items. DynamoDB cannot forbid it the way SQLite
  triggers do, so deny ``dynamodb:DeleteItem`` on the table in IAM (see
  docs/AWS.md); a deleted item is detected as damage.
- Without an injected client the registry holds only names and settings and
  pickles cleanly (each process builds its own client on first use).
- AWS failures (a missing table, no credentials, an unreachable endpoint
  after retries) raise `RegistryError`. If a write's outcome is unknown (the
  connection dropped after sending), re-read before repeating it.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoRegionError

from keyturn.aws.clients import ClientSettings, error_code, make_client
from keyturn.errors import (
    ConcurrentModificationError,
    RegistryError,
    RegistryInvariantError,
    UnknownVersionError,
)
from keyturn.registry.base import (
    ALLOWED_TRANSITIONS,
    Inventory,
    KeyState,
    KeyVersion,
    check_invariants,
    LifecycleMethods,
    find_version,
    plan_transition,
    require_text,
    require_version,
)

__all__ = ["DynamoDbKeyRegistry", "create_table", "SCHEMA_VERSION", "HEAD_SK"]

#: Stored in the head item; a registry with a newer schema is refused.
SCHEMA_VERSION = 1
HEAD_SK = "#head"
_VERSION_PREFIX = "v#"
_HISTORY_PREFIX = "h#"
_SNAPSHOT_TRIES = 20

def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the default clock)."""
    return datetime.now(timezone.utc)


def _to_text(dt: datetime) -> str:
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got naive {dt!r}")
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _from_text(text: object, what: str) -> datetime:
    try:
        dt = datetime.fromisoformat(text)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise RegistryInvariantError(f"stored {what} {text!r} is not an ISO-8601 timestamp") from e
    if dt.tzinfo is None:
        raise RegistryInvariantError(f"stored {what} {text!r} has no timezone")
    return dt.astimezone(timezone.utc)


def _state(text: object, what: str) -> KeyState:
    try:
        return KeyState(text)
    except ValueError as e:
        raise RegistryInvariantError(f"stored {what} {text!r} is not a key state") from e


def _name(state: KeyState | None) -> str:
    return "(new)" if state is None else state.value


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


def _item_to_version(item: dict[str, Any]) -> KeyVersion:
    sk = item["sk"]["S"]
    what = f"item {sk!r}"
    version = _n(item, "version", what)
    if sk != _version_sk(version):
        raise RegistryInvariantError(f"stored {what} holds version {version}")
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
    sk = item["sk"]["S"]
    what = f"item {sk!r}"
    entry_id = _n(item, "id", what)
    if sk != _history_sk(entry_id):
        raise RegistryInvariantError(f"stored {what} holds history id {entry_id}")
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
    replayed: dict[int, KeyState] = {}
    for h in history:
        v, src, dst = h["version"], h["from_state"], h["to_state"]
        if replayed.get(v) != src:
            raise RegistryInvariantError(
                f"history row {h['id']} moves version {v} from {_name(src)}, "
                f"but its recorded state was {_name(replayed.get(v))}"
            )
        legal = dst is KeyState.ACTIVE if src is None else (src, dst) in ALLOWED_TRANSITIONS
        if not legal:
            raise RegistryInvariantError(f"history row {h['id']} records a forbidden transition {_name(src)} -> {_name(dst)}")
        replayed[v] = dst
    stored = {v.version: v.state for v in versions}
    if replayed != stored:
        diff = sorted(
            f"v{n}: stored {_name(stored.get(n))}, history {_name(replayed.get(n))}"
            for n in set(stored) | set(replayed)
            if stored.get(n) != replayed.get(n)
        )
        raise RegistryInvariantError("stored states disagree with history: " + "; ".join(diff))


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
                self._commit(snap.head, new_head, plan.changed, new_history)
            except _Conflict:
                time.sleep(random.uniform(0, min(0.25, 0.005 * 2**attempt)))
                continue
            return after[plan.result]
        raise ConcurrentModificationError(
            f"registry {self._pk!r}: {self._max_conflict_retries + 1} attempts lost to concurrent writers; try again"
        )

    def _commit(
        self,
        old: _Head | None,
        new: _Head,
        changed: list[tuple[KeyVersion, KeyState | None]],
        history: list[dict[str, Any]],
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

    def _transition(
        self,
        op: str,
        version: int,
        actor: str,
        reason: str,
        inventory: Inventory | None = None,
        pending_days: int | None = None,
    ) -> KeyVersion:
        def apply(versions: list[KeyVersion], now: datetime) -> _Plan:
            current, dst, delete_after = plan_transition(
                versions, version, op, inventory=inventory, now=now, pending_days=pending_days
            )
            src = current.state
            changed = replace(current, state=dst, state_changed_at=now, delete_after=delete_after)
            return _Plan(
                result=version,
                changed=[(changed, src)],
                history=[self._history_row(version, src, dst, now, actor, reason)],
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

    def rotate(self, kek_id: str, *, actor: str, reason: str) -> KeyVersion:
        """Atomically add version max+1 as active and demote the old active to decrypt_only.

        `RegistryError` if the registry is empty (call `initialize` first).
        With KMS key rotation `kek_id` may equal the old version's.
        """
        require_text("kek_id", kek_id)
        require_text("actor", actor)
        require_text("reason", reason)

        def apply(versions: list[KeyVersion], now: datetime) -> _Plan:
            if not versions:
                raise self._empty_error()
            old = next(v for v in versions if v.state is KeyState.ACTIVE)
            demoted = replace(old, state=KeyState.DECRYPT_ONLY, state_changed_at=now, delete_after=None)
            number = len(versions) + 1
            new, row = self._new_active(number, kek_id, now, actor, reason)
            return _Plan(
                result=number,
                changed=[(demoted, KeyState.ACTIVE), (new, None)],
                history=[self._history_row(old.version, KeyState.ACTIVE, KeyState.DECRYPT_ONLY, now, actor, reason), row],
            )

        return self._write(apply)


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
