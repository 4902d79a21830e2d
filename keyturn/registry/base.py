"""Key versions, their states, and the registry interface.

A registry holds the numbered versions of the key-encryption key. States:

- ``active``: exactly one; new DEKs are wrapped under it;
- ``decrypt_only``: readable, not used for new data (the transition window);
- ``retired``: policy refuses to decrypt it;
- ``pending_deletion``: retired and scheduled for deletion at `delete_after`.

Allowed transitions: active -> decrypt_only (only through `rotate`),
decrypt_only -> retired, retired -> pending_deletion, and
retired/pending_deletion -> decrypt_only (a rollback, for emergencies).
Retiring or scheduling deletion is refused (`VersionInUseError`) while an
`Inventory` says the version still protects data.

`check_invariants` is the one place the invariants live; every backend calls
it inside its write transaction before committing.
"""

from __future__ import annotations

import enum
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, runtime_checkable

from keyturn.errors import (
    ConcurrentModificationError,
    InvalidTransitionError,
    RegistryInvariantError,
    UnknownVersionError,
    VersionInUseError,
)

__all__ = [
    "KeyState",
    "KeyVersion",
    "Inventory",
    "KeyRegistry",
    "AuditAnchorStore",
    "check_invariants",
    "ALLOWED_TRANSITIONS",
    "TRANSITIONS_BY_OPERATION",
    "find_version",
    "plan_transition",
    "check_rotation",
    "require_text",
    "require_version",
    "LifecycleMethods",
    "Transition",
    "check_anchor_move",
    "check_history",
    "utc_now",
    "to_text",
    "from_text",
    "stored_state",
    "state_name",
]


class KeyState(str, enum.Enum):
    ACTIVE = "active"
    DECRYPT_ONLY = "decrypt_only"
    RETIRED = "retired"
    PENDING_DELETION = "pending_deletion"

    @property
    def readable(self) -> bool:
        """May data under this version be decrypted?"""
        return self in (KeyState.ACTIVE, KeyState.DECRYPT_ONLY)


ALLOWED_TRANSITIONS: frozenset[tuple[KeyState, KeyState]] = frozenset(
    {
        (KeyState.ACTIVE, KeyState.DECRYPT_ONLY),
        (KeyState.DECRYPT_ONLY, KeyState.RETIRED),
        (KeyState.RETIRED, KeyState.PENDING_DELETION),
        (KeyState.RETIRED, KeyState.DECRYPT_ONLY),
        (KeyState.PENDING_DELETION, KeyState.DECRYPT_ONLY),
    }
)


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One version of the KEK and its lifecycle state."""

    version: int
    kek_id: str
    state: KeyState
    created_at: datetime
    actor: str
    reason: str
    state_changed_at: datetime
    delete_after: datetime | None = None


class Inventory(Protocol):
    """Tells how much data each key version still protects."""

    def references(self, version: int) -> int:
        """Rows (or files) still under `version`; 0 means none."""
        ...


@runtime_checkable
class KeyRegistry(Protocol):
    """Versions of the KEK and their states, changed atomically."""

    def versions(self) -> list[KeyVersion]:
        """All versions, ascending."""
        ...

    def get(self, version: int) -> KeyVersion:
        """One version; `UnknownVersionError` if absent."""
        ...

    def active(self) -> KeyVersion:
        """The single active version; `RegistryError` if the registry is empty."""
        ...

    def initialize(self, kek_id: str, *, actor: str, reason: str) -> KeyVersion:
        """Create version 1 as active if the registry is empty; else return the active version."""
        ...

    def rotate(self, kek_id: str, *, actor: str, reason: str, expect_active: int | None = None) -> KeyVersion:
        """Atomically add version max+1 as active and demote the old active to decrypt_only.

        With `expect_active`, refused (`ConcurrentModificationError`) unless that version is still active.
        """
        ...

    def retire(self, version: int, *, actor: str, reason: str, inventory: Inventory | None = None) -> KeyVersion:
        """decrypt_only -> retired; refused while `inventory` finds data under it."""
        ...

    def schedule_deletion(self, version: int, *, actor: str, reason: str, inventory: Inventory, pending_days: int) -> KeyVersion:
        """retired -> pending_deletion, delete_after = now + pending_days; refused while data remains."""
        ...

    def reinstate(self, version: int, *, actor: str, reason: str) -> KeyVersion:
        """retired or pending_deletion -> decrypt_only (rollback)."""
        ...


@runtime_checkable
class AuditAnchorStore(Protocol):
    """Where the head of the key home's audit chain is anchored (both registry backends implement it).

    One anchor per registry: the (seq, hash) of the last audit entry an
    anchored `keyturn.audit.chain.AuditChain` appended. It only moves
    forward, by compare-and-set, so keyturn never rewinds it; the log's
    owner would have to rewrite the registry as well to hide a deleted tail.
    """

    def audit_anchor(self) -> tuple[int, str] | None:
        """(seq, hash hex) of the anchored audit entry, or None if nothing was anchored yet."""
        ...

    def advance_audit_anchor(self, seq: int, digest: str, *, expected: tuple[int, str] | None) -> None:
        """Move the anchor to (`seq`, `digest`) if it still holds `expected` (None: no anchor yet) and `seq` is later.

        `ConcurrentModificationError` if the stored anchor is not `expected`;
        `ValueError` if `seq` does not move it forward or `digest` is not 64 lowercase hex chars.
        """
        ...


def check_anchor_move(seq: object, digest: object, expected: tuple[int, str] | None) -> tuple[int, str]:
    """The argument checks `advance_audit_anchor` makes in every backend; returns (seq, digest)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"an audit anchor seq is an int >= 0, got {seq!r}")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise ValueError("an audit anchor hash is 64 lowercase hex chars")
    if expected is not None and seq <= expected[0]:
        raise ValueError(f"the audit anchor only moves forward: seq {seq} is not after {expected[0]}")
    return seq, digest


def utc_now() -> datetime:
    """The current time, timezone-aware UTC (the backends' default clock)."""
    return datetime.now(timezone.utc)


def to_text(dt: datetime) -> str:
    """Fixed-width ISO-8601 UTC, so stored strings also sort by time (how every backend stores timestamps)."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"timestamps must be timezone-aware, got naive {dt!r}")
    return dt.astimezone(timezone.utc).isoformat(timespec="microseconds")


def from_text(text: object, what: str) -> datetime:
    """A stored timestamp as aware UTC; `RegistryInvariantError` naming `what` if it is not one."""
    try:
        dt = datetime.fromisoformat(text)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise RegistryInvariantError(f"stored {what} {text!r} is not an ISO-8601 timestamp") from e
    if dt.tzinfo is None:
        raise RegistryInvariantError(f"stored {what} {text!r} has no timezone")
    return dt.astimezone(timezone.utc)


def stored_state(text: object, what: str) -> KeyState:
    """A stored state; `RegistryInvariantError` naming `what` if it is not a `KeyState` value."""
    try:
        return KeyState(text)
    except ValueError as e:
        raise RegistryInvariantError(f"stored {what} {text!r} is not a key state") from e


def state_name(state: KeyState | None) -> str:
    """`state` for messages; "(new)" for None (a version's creation in history)."""
    return "(new)" if state is None else state.value


def check_invariants(versions: Sequence[KeyVersion]) -> None:
    """Raise `RegistryInvariantError` unless `versions` is a valid registry state.

    Valid means: versions are exactly 1..n with no gaps or repeats; if any
    exist, exactly one is active; every pending_deletion version has a
    delete_after; kek ids are non-empty.
    """
    numbers = [v.version for v in versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RegistryInvariantError(f"versions must be 1..n without gaps, found {numbers}")
    if versions:
        active = [v.version for v in versions if v.state is KeyState.ACTIVE]
        if len(active) != 1:
            raise RegistryInvariantError(f"exactly one active version required, found {active}")
    for v in versions:
        if not v.kek_id:
            raise RegistryInvariantError(f"version {v.version} has no kek_id")
        if v.state is KeyState.PENDING_DELETION and v.delete_after is None:
            raise RegistryInvariantError(f"version {v.version} is pending deletion without delete_after")


def check_history(versions: Sequence[KeyVersion], history: Iterable[Mapping[str, Any]]) -> None:
    """Raise `RegistryInvariantError` unless replaying `history` (oldest first) reproduces every version's state.

    Rows have the keys of a backend's ``history()``; each must move its
    version from the state the rows before left it in, by an allowed
    transition (or create it as active).
    """
    replayed: dict[int, KeyState] = {}
    for h in history:
        v, src, dst = h["version"], h["from_state"], h["to_state"]
        if replayed.get(v) != src:
            raise RegistryInvariantError(
                f"history row {h['id']} moves version {v} from {state_name(src)}, "
                f"but its recorded state was {state_name(replayed.get(v))}"
            )
        legal = dst is KeyState.ACTIVE if src is None else (src, dst) in ALLOWED_TRANSITIONS
        if not legal:
            raise RegistryInvariantError(
                f"history row {h['id']} records a forbidden transition {state_name(src)} -> {state_name(dst)}"
            )
        replayed[v] = dst
    stored = {v.version: v.state for v in versions}
    if replayed != stored:
        diff = sorted(
            f"v{n}: stored {state_name(stored.get(n))}, history {state_name(replayed.get(n))}"
            for n in set(stored) | set(replayed)
            if stored.get(n) != replayed.get(n)
        )
        raise RegistryInvariantError("stored states disagree with history: " + "; ".join(diff))


# Which states each lifecycle operation starts from, and where it leads.
TRANSITIONS_BY_OPERATION: dict[str, tuple[frozenset[KeyState], KeyState]] = {
    "retire": (frozenset({KeyState.DECRYPT_ONLY}), KeyState.RETIRED),
    "schedule_deletion": (frozenset({KeyState.RETIRED}), KeyState.PENDING_DELETION),
    "reinstate": (frozenset({KeyState.RETIRED, KeyState.PENDING_DELETION}), KeyState.DECRYPT_ONLY),
}

# The operations refused while DEK directory entries are wrapped under the version.
_GUARDED_OPERATIONS = frozenset({"retire", "schedule_deletion"})


def find_version(versions: Sequence[KeyVersion], version: int) -> KeyVersion:
    """`version` from a validated (1..n, ascending) list; `UnknownVersionError` if absent."""
    if 1 <= version <= len(versions):
        return versions[version - 1]
    raise UnknownVersionError(f"no key version {version} (registry has {len(versions)})")


def plan_transition(
    versions: Sequence[KeyVersion],
    version: int,
    op: str,
    *,
    inventory: Inventory | None,
    now: datetime,
    pending_days: int | None = None,
    directory_refs: int = 0,
) -> tuple[KeyVersion, KeyState, datetime | None]:
    """Check that `op` may move `version` and return (current, new state, delete_after).

    The one place every registry backend decides a lifecycle change:
    `InvalidTransitionError` for a move not allowed from the current state,
    `VersionInUseError` while `inventory` finds data under the version, and
    `ValueError` for an inventory that answers anything but an int >= 0.
    `directory_refs` is how many DEK directory entries the backend found
    wrapped under the version inside the same write: retire and
    schedule_deletion are refused while it is > 0, whatever any lake says.
    """
    sources, dst = TRANSITIONS_BY_OPERATION[op]
    current = find_version(versions, version)
    src = current.state
    if src not in sources or (src, dst) not in ALLOWED_TRANSITIONS:
        hint = (
            "the active version leaves that state only through rotate()"
            if src is KeyState.ACTIVE
            else f"{op} needs a version in state {' or '.join(sorted(s.value for s in sources))}"
        )
        raise InvalidTransitionError(
            f"cannot {op} version {version}: transition {src.value} -> {dst.value} is not allowed ({hint})"
        )
    if op in _GUARDED_OPERATIONS and directory_refs > 0:
        raise VersionInUseError(
            f"cannot {op} version {version}: the DEK directory holds {directory_refs} DEK(s) wrapped under it; "
            "run `keyturn rewrap` to move them onto the active version first"
        )
    if inventory is not None:
        raw = inventory.references(version)
        try:
            refs = operator.index(raw)
        except TypeError:
            refs = -1
        if isinstance(raw, bool) or refs < 0:
            raise ValueError(f"inventory.references({version}) must return an int >= 0, got {raw!r}")
        if refs > 0:
            raise VersionInUseError(f"cannot {op} version {version}: the inventory still finds {refs} reference(s) under it")
    delete_after = None if pending_days is None else now + timedelta(days=pending_days)
    return current, dst, delete_after


def check_rotation(versions: Sequence[KeyVersion], active: KeyVersion, kek_id: str, expect_active: int | None) -> None:
    """What every backend checks before a rotation commits.

    `ConcurrentModificationError` if `expect_active` is given and another
    rotation already replaced that active version, so two racing rotations
    never both commit (and never give two versions a KEK provisioned for one).
    """
    if expect_active is not None and active.version != expect_active:
        raise ConcurrentModificationError(
            f"another rotation got there first: version {active.version} is active now, not {expect_active}; "
            "nothing was changed"
        )


def require_text(name: str, value: object) -> str:
    """`value` if it is a non-blank str; `TypeError`/`ValueError` otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name} must be a non-empty string")
    return value


def require_version(version: object) -> int:
    """`version` if it is an int (not a bool); `TypeError` otherwise."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be an int, got {type(version).__name__}")
    return version


@dataclass(frozen=True, slots=True)
class Transition:
    """One lifecycle change, its arguments checked: `op` (a key of `TRANSITIONS_BY_OPERATION`) on `version`."""

    op: str
    version: int
    actor: str
    reason: str
    inventory: Inventory | None = None
    pending_days: int | None = None

    @property
    def guarded(self) -> bool:
        """Is it refused while DEK directory entries are wrapped under the version?"""
        return self.op in _GUARDED_OPERATIONS

    def plan(
        self, versions: Sequence[KeyVersion], now: datetime, directory_refs: int = 0
    ) -> tuple[KeyVersion, KeyState, datetime | None]:
        """`plan_transition` for this change: (current, new state, delete_after)."""
        return plan_transition(
            versions,
            self.version,
            self.op,
            inventory=self.inventory,
            now=now,
            pending_days=self.pending_days,
            directory_refs=directory_refs,
        )


class LifecycleMethods:
    """retire / schedule_deletion / reinstate / due_for_deletion for any backend.

    A backend sets `self._clock`, implements `check()` (validated versions)
    and `_transition(change)` as one atomic write that calls `change.plan`;
    the argument checks and the clock check live here, once.
    """

    _clock: Callable[[], datetime]

    def check(self) -> list[KeyVersion]:
        raise NotImplementedError

    def _now(self) -> datetime:
        now = self._clock()
        if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
            raise ValueError(f"clock must return a timezone-aware datetime, got {now!r}")
        return now.astimezone(timezone.utc)

    def due_for_deletion(self, now: datetime | None = None) -> list[KeyVersion]:
        """Validated pending_deletion versions with delete_after <= `now` (default: the clock).

        The registry never deletes them; destroying the key material is the
        caller's job, and the versions stay for audit.
        """
        when = self._now() if now is None else now
        if not isinstance(when, datetime) or when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"now must be a timezone-aware datetime, got {when!r}")
        return [
            v
            for v in self.check()
            if v.state is KeyState.PENDING_DELETION and v.delete_after is not None and v.delete_after <= when
        ]

    def _transition(self, change: Transition) -> KeyVersion:
        raise NotImplementedError

    def retire(self, version: int, *, actor: str, reason: str, inventory: Inventory | None = None) -> KeyVersion:
        """decrypt_only -> retired; `VersionInUseError` while `inventory` finds data under it.

        The active version can never be retired (`InvalidTransitionError`); rotate first.
        """
        require_version(version)
        require_text("actor", actor)
        require_text("reason", reason)
        return self._transition(Transition("retire", version, actor, reason, inventory=inventory))

    def schedule_deletion(
        self, version: int, *, actor: str, reason: str, inventory: Inventory | None = None, pending_days: int
    ) -> KeyVersion:
        """retired -> pending_deletion with delete_after = now + `pending_days`; refused while data remains.

        The backend refuses while its DEK directory holds a DEK wrapped under the version;
        `inventory` (optional) adds a check of its own.
        """
        require_version(version)
        require_text("actor", actor)
        require_text("reason", reason)
        if isinstance(pending_days, bool) or not isinstance(pending_days, int):
            raise TypeError(f"pending_days must be an int, got {type(pending_days).__name__}")
        if pending_days < 0:
            raise ValueError(f"pending_days must be >= 0, got {pending_days}")
        return self._transition(
            Transition("schedule_deletion", version, actor, reason, inventory=inventory, pending_days=pending_days)
        )

    def reinstate(self, version: int, *, actor: str, reason: str) -> KeyVersion:
        """retired or pending_deletion -> decrypt_only (rollback); clears delete_after."""
        require_version(version)
        require_text("actor", actor)
        require_text("reason", reason)
        return self._transition(Transition("reinstate", version, actor, reason))
