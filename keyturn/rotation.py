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
- `rewrap` moves every DEK directory entry wrapped under a decrypt-only
  version onto the active one (one KMS ReEncrypt per DEK, each entry
  swapped by compare-and-set); no lake byte changes. One event ``rewrap``
  per run that moved anything, with the counts and KMS request ids.

Retire is also refused (`InvalidTransitionError`) inside the transition
window: while the version left the active state less than
`transition_window_days` ago (the registry's ``state_changed_at``; the CLI
passes ``key_hierarchy.transition_window_days``). The message names the
instant from which retiring is allowed; `retire_allowed_at` computes it.

Retire and schedule-deletion are refused (`VersionInUseError`) while the
registry's DEK directory holds any DEK wrapped under the version; the
registry counts that inside its own write transaction, so no lake path a
caller passes (or omits) can change the answer. An optional `Inventory`
(one or several lakes, `CombinedInventory`) is consulted as well.

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

import hashlib
import operator
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import Any

from keyturn.audit.chain import AuditChain
from keyturn.audit.events import AuditAction, AuditEvent, build_event, utc_now
from keyturn.errors import AuditChainError, InvalidTransitionError
from keyturn.kms.base import KmsBackend
from keyturn.policy import KeyPolicy
from keyturn.registry.base import Inventory, KeyRegistry, KeyState, KeyVersion
from keyturn.rewrap import DirectoryRewrap, rewrap_entries

__all__ = [
    "rotate",
    "retire",
    "schedule_deletion",
    "rotation_due",
    "next_rotation_due",
    "retire_allowed_at",
    "check_transition_window",
    "kek_id_for",
    "CombinedInventory",
    "rewrap",
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
    kms_request_ids: Iterable[str] = (),
    scope_key: str | None = None,
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
        kms_request_ids=kms_request_ids,
        scope_key=scope_key or f"{action.value}:{version_from}:{version_to}",
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
    current = registry.active().version
    next_version = current + 1  # the active version is always the newest
    kek_id = provision_kek(next_version)
    if not isinstance(kek_id, str) or not kek_id:
        raise TypeError(f"provision_kek must return a non-empty KEK id, got {kek_id!r}")
    # compare-and-set: a rotation that raced this one and committed first makes this one a refusal,
    # so a KEK provisioned for version N never ends up under two versions
    new = registry.rotate(kek_id, actor=actor, reason=reason, expect_active=current)
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


def retire_allowed_at(version: KeyVersion, transition_window_days: int) -> datetime | None:
    """When a decrypt-only `version` may be retired: `transition_window_days` after it left the active state.

    None when the window does not apply: a window of 0 days (the DEK
    directory alone decides), or a version in any other state (the registry
    decides those transitions).
    """
    _check_days("transition_window_days", transition_window_days, minimum=0)
    if not transition_window_days or version.state is not KeyState.DECRYPT_ONLY:
        return None
    return _aware("state_changed_at", version.state_changed_at) + timedelta(days=transition_window_days)


def check_transition_window(
    registry: KeyRegistry, version: int, transition_window_days: int, now: datetime
) -> KeyVersion:
    """The registry's `version`; `InvalidTransitionError` (one line, naming the date) while it is inside the window."""
    found = registry.get(version)
    allowed_at = retire_allowed_at(found, transition_window_days)
    if allowed_at is not None and _aware("now", now) < allowed_at:
        left = _aware("state_changed_at", found.state_changed_at)
        raise InvalidTransitionError(
            f"cannot retire key version {version} before {allowed_at:%Y-%m-%d %H:%M} UTC: it left the active state "
            f"on {left:%Y-%m-%d %H:%M} UTC and stays decrypt-only for the transition window of "
            f"{transition_window_days} day(s) (key_hierarchy.transition_window_days)"
        )
    return found


def _audited_change(
    chain: AuditChain,
    action: AuditAction,
    version: int,
    change: Callable[[], KeyVersion],
    counts: dict[str, int],
    *,
    actor: str,
    reason: str,
    dataset: str,
    clock: Callable[[], datetime],
) -> KeyVersion:
    """Run `change` (a registry state transition of key `version`) on a usable `chain`, then audit it as `action`."""
    _check_chain(chain)
    changed = change()
    _audit(
        chain, action, actor=actor, reason=reason, dataset=dataset, version_from=version, version_to=None, counts=counts, clock=clock
    )
    return changed


def retire(
    registry: KeyRegistry,
    version: int,
    chain: AuditChain,
    *,
    inventory: Inventory | None = None,
    actor: str,
    reason: str,
    clock: Callable[[], datetime] = utc_now,
    dataset: str = "default",
    transition_window_days: int = 0,
) -> KeyVersion:
    """decrypt_only -> retired; audited. Refused (`VersionInUseError`) while the DEK directory
    holds a DEK wrapped under the version, or `inventory` (optional) finds data under it, and
    (`InvalidTransitionError`) while the version left the active state less than
    `transition_window_days` ago by `clock`."""
    _check_days("transition_window_days", transition_window_days, minimum=0)

    def change() -> KeyVersion:
        if transition_window_days:
            check_transition_window(registry, version, transition_window_days, clock())
        return registry.retire(version, actor=actor, reason=reason, inventory=inventory)

    return _audited_change(chain, AuditAction.RETIRE, version, change, {}, actor=actor, reason=reason, dataset=dataset, clock=clock)


def schedule_deletion(
    registry: KeyRegistry,
    version: int,
    chain: AuditChain,
    *,
    inventory: Inventory | None = None,
    pending_days: int,
    actor: str,
    reason: str,
    clock: Callable[[], datetime] = utc_now,
    dataset: str = "default",
) -> KeyVersion:
    """retired -> pending_deletion after `pending_days`, refused while `inventory` finds data; audited."""
    _check_days("pending_days", pending_days, minimum=0)
    return _audited_change(
        chain,
        AuditAction.SCHEDULE_DELETION,
        version,
        lambda: registry.schedule_deletion(version, actor=actor, reason=reason, inventory=inventory, pending_days=pending_days),
        {"pending_days": pending_days},
        actor=actor,
        reason=reason,
        dataset=dataset,
        clock=clock,
    )


def rewrap(
    registry: Any,
    kms: KmsBackend,
    chain: AuditChain,
    *,
    actor: str,
    reason: str,
    clock: Callable[[], datetime] = utc_now,
    dataset: str = "default",
    max_deks: int | None = None,
    page: int = 500,
) -> dict[str, Any]:
    """Re-wrap the directory's DEKs from decrypt-only versions onto the active version; audited.

    Resumable and idempotent: each run lists what is still under an older
    readable version, so a rerun after a crash or a `max_deks` bound goes
    on where the last stopped, and a run with nothing to move makes no KMS
    call and logs nothing. Retired and pending-deletion versions are never
    touched (policy refuses them). Returns a report (counts, no keys).
    """
    if max_deks is not None and max_deks < 0:
        raise ValueError("max_deks must be >= 0")
    _check_chain(chain)
    policy = KeyPolicy.from_registry(registry)
    target = policy.active
    sources = sorted(v for v, state in policy.states.items() if state is KeyState.DECRYPT_ONLY)
    result = DirectoryRewrap()
    budget = max_deks
    try:
        for version in sources:
            after = None
            while budget is None or budget > 0:
                limit = page if budget is None else min(page, budget)
                entries = registry.list_deks(key_version=version, after=after, limit=limit)
                if not entries:
                    break
                rewrap_entries(registry, kms, entries, target, result=result)
                if budget is not None:
                    budget -= len(entries)
                after = entries[-1].dek_id
    except Exception:  # a KMS or registry outage mid-run: what already moved, and every KMS call made, is audited
        if result.moved or result.failed or result.kms_calls:
            _rewrap_event(chain, result, sources, target.version, actor=actor, reason=reason, clock=clock,
                          dataset=dataset, interrupted=True)
        raise
    remaining = {str(v): registry.dek_count(v) for v in sources}
    report: dict[str, Any] = {
        "active_version": target.version,
        "from_versions": sources,
        "deks_moved": result.moved,
        "deks_raced": result.raced,
        "deks_failed": result.failed,
        "kms_calls": result.kms_calls,
        "remaining": remaining,
        "complete": not any(remaining.values()),
        "lake_bytes_written": 0,
    }
    if result.moved or result.failed or result.kms_calls:
        event = _rewrap_event(chain, result, sources, target.version, actor=actor, reason=reason, clock=clock,
                              dataset=dataset, interrupted=False)
        report["audit_event"] = event.event_id
    return report


def _rewrap_event(
    chain: AuditChain,
    result: DirectoryRewrap,
    sources: list[int],
    target: int,
    *,
    actor: str,
    reason: str,
    clock: Callable[[], datetime],
    dataset: str,
    interrupted: bool,
) -> AuditEvent:
    """The one ``rewrap`` event of a run; its id is unique to the run (it covers the run's KMS request ids)."""
    digest = hashlib.sha256("\0".join([str(target), *sorted(result.kms_request_ids), *sorted(result.failed)]).encode())
    counts = {"deks_moved": result.moved, "deks_failed": len(result.failed), "kms_calls": result.kms_calls}
    if interrupted:
        counts["interrupted"] = 1
    return _audit(
        chain,
        AuditAction.REWRAP,
        actor=actor,
        reason=reason,
        dataset=dataset,
        version_from=sources[0] if sources else None,
        version_to=target,
        counts=counts,
        clock=clock,
        kms_request_ids=result.kms_request_ids,
        scope_key=f"rewrap:{digest.hexdigest()}",
    )


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
