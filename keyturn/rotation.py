"""Control-plane key lifecycle: rotate, retire and schedule deletion, each audited.

These are the operations behind ``keyturn rotate``, ``keyturn retire`` and
``keyturn schedule-deletion``. Each one changes the key registry through its
own atomic transition and then appends one control-plane `AuditEvent` to a
hash-chained log (`keyturn.audit.chain.AuditChain`):

- `rotate` provisions the next KEK (through a caller-supplied function, so
  any KMS works), makes it the active version and demotes the old active
  version to decrypt-only; event ``rotate`` with ``version_from`` = the old
  active version and ``version_to`` = the new one.
- `retire` moves a decrypt-only version to retired; event ``retire`` with
  ``version_from`` = that version.
- `schedule_deletion` moves a retired version to pending deletion; event
  ``schedule_deletion`` with ``version_from`` = that version and the pending
  days in ``counts``.

Retire and schedule-deletion consult an `Inventory` inside the registry's
write transaction and raise `VersionInUseError` while it still finds data
under the version; `CombinedInventory` adds up several (one per lake).

Ordering and crashes: each operation first verifies the whole audit chain
(`AuditChainError` on a damaged log, before anything changes), then changes
the registry, then appends the event. A crash between the last two leaves
the registry changed and the event missing; an append that fails there
raises `AuditChainError` saying the change was made but not logged.
`rotate` never leaves a half-rotated registry (the registry transition is
one transaction). A KEK provisioned by a rotation that then failed stays
unused in the KMS; the provisioner decides whether to reuse it.

Beam-free and clock-injectable: every function takes `clock` (a callable
returning an aware datetime) or `now`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone

from keyturn.audit.chain import AuditChain
from keyturn.audit.events import AuditAction, AuditEvent, build_event, utc_now
from keyturn.errors import AuditChainError
from keyturn.registry.base import Inventory, KeyRegistry, KeyVersion

__all__ = [
    "rotate",
    "retire",
    "schedule_deletion",
    "rotation_due",
    "next_rotation_due",
    "kek_id_for",
    "CombinedInventory",
    "CONTROL_PLANE_PARTITION",
]

CONTROL_PLANE_PARTITION = ""
"""Control-plane events are not about one partition; their partition is empty."""


def kek_id_for(version: int) -> str:
    """The KEK id keyturn provisions for a key version: ``kek-0001`` for version 1."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"key versions start at 1, got {version!r}")
    return f"kek-{version:04d}"


def _aware(name: str, moment: object) -> datetime:
    if not isinstance(moment, datetime) or moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {moment!r}")
    return moment.astimezone(timezone.utc)


def _check_days(name: str, days: object, *, minimum: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int):
        raise TypeError(f"{name} must be an int, got {type(days).__name__}")
    if days < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {days}")
    return days


def _audit(
    chain: AuditChain,
    action: AuditAction,
    *,
    actor: str,
    reason: str,
    dataset: str,
    version_from: int | None,
    version_to: int | None,
    counts: dict[str, int],
    clock: Callable[[], datetime],
) -> AuditEvent:
    event = build_event(
        action,
        actor=actor,
        reason=reason,
        dataset=dataset,
        partition=CONTROL_PLANE_PARTITION,
        version_from=version_from,
        version_to=version_to,
        counts=counts,
        scope_key=f"{action.value}:{version_from}:{version_to}",
        clock=clock,
    )
    try:
        chain.append(event)
    except AuditChainError as exc:
        raise AuditChainError(
            exc.index, f"the {action.value} was made in the registry but its audit event was not logged: {exc.problem}"
        ) from exc
    return event


def _check_chain(chain: AuditChain) -> None:
    """Verify the whole log before a change, so a damaged log stops the change (`AuditChainError`)."""
    chain.head()


def rotate(
    registry: KeyRegistry,
    provision_kek: Callable[[int], str],
    chain: AuditChain,
    *,
    actor: str,
    reason: str,
    clock: Callable[[], datetime] = utc_now,
    dataset: str = "default",
) -> KeyVersion:
    """Provision the next KEK, make it the active version, and audit the rotation.

    `provision_kek(n)` creates (or finds) the KEK for version ``n`` in the
    KMS and returns its id. The old active version becomes decrypt-only.
    Returns the new active version.
    """
    _check_chain(chain)
    next_version = registry.active().version + 1  # the active version is always the newest
    kek_id = provision_kek(next_version)
    if not isinstance(kek_id, str) or not kek_id:
        raise TypeError(f"provision_kek must return a non-empty KEK id, got {kek_id!r}")
    new = registry.rotate(kek_id, actor=actor, reason=reason)
    # Another writer may have rotated in between: report the versions this rotation really joined.
    _audit(
        chain,
        AuditAction.ROTATE,
        actor=actor,
        reason=reason,
        dataset=dataset,
        version_from=new.version - 1,
        version_to=new.version,
        counts={},
        clock=clock,
    )
    return new


def rotation_due(registry: KeyRegistry, interval_days: int, now: datetime) -> bool:
    """True when the active version is at least `interval_days` old at `now`."""
    return _aware("now", now) >= next_rotation_due(registry, interval_days)


def next_rotation_due(registry: KeyRegistry, interval_days: int) -> datetime:
    """When the active version becomes due for rotation (its creation + `interval_days`)."""
    _check_days("interval_days", interval_days, minimum=1)
    return _aware("created_at", registry.active().created_at) + timedelta(days=interval_days)


def retire(
    registry: KeyRegistry,
    version: int,
    chain: AuditChain,
    *,
    inventory: Inventory,
    actor: str,
    reason: str,
    clock: Callable[[], datetime] = utc_now,
    dataset: str = "default",
) -> KeyVersion:
    """decrypt_only -> retired, refused (`VersionInUseError`) while `inventory` finds data; audited."""
    if inventory is None:
        raise ValueError("retire needs an inventory to prove no data is left under the version")
    _check_chain(chain)
    retired = registry.retire(version, actor=actor, reason=reason, inventory=inventory)
    _audit(
        chain,
        AuditAction.RETIRE,
        actor=actor,
        reason=reason,
        dataset=dataset,
        version_from=version,
        version_to=None,
        counts={},
        clock=clock,
    )
    return retired


def schedule_deletion(
    registry: KeyRegistry,
    version: int,
    chain: AuditChain,
    *,
    inventory: Inventory,
    pending_days: int,
    actor: str,
    reason: str,
    clock: Callable[[], datetime] = utc_now,
    dataset: str = "default",
) -> KeyVersion:
    """retired -> pending_deletion after `pending_days`, refused while `inventory` finds data; audited."""
    _check_days("pending_days", pending_days, minimum=0)
    _check_chain(chain)
    scheduled = registry.schedule_deletion(
        version, actor=actor, reason=reason, inventory=inventory, pending_days=pending_days
    )
    _audit(
        chain,
        AuditAction.SCHEDULE_DELETION,
        actor=actor,
        reason=reason,
        dataset=dataset,
        version_from=version,
        version_to=None,
        counts={"pending_days": pending_days},
        clock=clock,
    )
    return scheduled


class CombinedInventory:
    """An `Inventory` that adds up the references of several (for example one per lake)."""

    def __init__(self, inventories: Iterable[Inventory]) -> None:
        self._inventories = list(inventories)
        if not self._inventories:
            raise ValueError("CombinedInventory needs at least one inventory")

    def references(self, version: int) -> int:
        """Sum of `references(version)` over every inventory."""
        return sum(operator.index(inv.references(version)) for inv in self._inventories)

    def __repr__(self) -> str:
        return f"CombinedInventory({len(self._inventories)} inventories)"
