"""Shared fixtures for the core suite: a counting in-memory KMS, key policies, a location.

Fixtures that other test modules define under the same name (for example a
module-level ``kms``) take precedence over these, so nothing here is autouse.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone

import pytest

from keyturn.kms.base import CountingKms
from keyturn.kms.local import LocalKms
from keyturn.policy import KeyPolicy
from keyturn.registry.base import KeyState, KeyVersion
from keyturn.scope import DekScope, KekRef, Location, ScopeLimits

KEK_IDS = ("kek-1", "kek-2", "kek-3")
_T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def kek_id_for(version: int) -> str:
    """The KEK id the fixtures use for a key version: version n is ``kek-n``."""
    return f"kek-{version}"


@pytest.fixture
def kek_materials() -> dict[str, bytes]:
    """Fresh random 32-byte material for kek-1..kek-3."""
    return {kek_id: os.urandom(32) for kek_id in KEK_IDS}


@pytest.fixture
def local_kms(kek_materials) -> LocalKms:
    """An in-memory LocalKms holding kek-1..kek-3."""
    return LocalKms.in_memory(kek_materials)


@pytest.fixture
def kms(local_kms) -> CountingKms:
    """The in-memory LocalKms wrapped in CountingKms (`kms.calls.generate/decrypt/rewrap`)."""
    return CountingKms(local_kms)


@pytest.fixture
def location() -> Location:
    return Location("sales", "2024-01-01")


def _make_policy(
    active: int = 1,
    decrypt_only: Iterable[int] = (),
    retired: Iterable[int] = (),
    pending_deletion: Iterable[int] = (),
) -> KeyPolicy:
    states: dict[int, KeyState] = {active: KeyState.ACTIVE}
    for versions, state in (
        (decrypt_only, KeyState.DECRYPT_ONLY),
        (retired, KeyState.RETIRED),
        (pending_deletion, KeyState.PENDING_DELETION),
    ):
        for v in versions:
            if v in states:
                raise ValueError(f"version {v} given two states")
            states[v] = state
    versions = [
        KeyVersion(
            version=v,
            kek_id=kek_id_for(v),
            state=state,
            created_at=_T0 + timedelta(days=90 * v),
            actor="tests",
            reason="fixture",
            state_changed_at=_T0 + timedelta(days=90 * v),
            delete_after=_T0 + timedelta(days=400) if state is KeyState.PENDING_DELETION else None,
        )
        for v, state in sorted(states.items())
    ]
    return KeyPolicy.from_versions(versions)


@pytest.fixture
def make_policy() -> Callable[..., KeyPolicy]:
    """Factory: ``make_policy(active=2, decrypt_only=[1], retired=[], pending_deletion=[])``.

    Version n is implemented by KEK ``kek-n``.
    """
    return _make_policy


@pytest.fixture
def policy() -> KeyPolicy:
    """Version 1 (kek-1) active, nothing else."""
    return _make_policy(active=1)


@pytest.fixture
def make_scope(kms, location) -> Callable[..., DekScope]:
    """Factory: ``make_scope(version=1, limits=None, at=None)``: a DekScope on the counting KMS (at `location` unless `at`)."""

    def make(version: int = 1, *, limits: ScopeLimits | None = None, at: Location | None = None) -> DekScope:
        return DekScope(
            kms,
            KekRef(version, kek_id_for(version)),
            at or location,
            limits=limits or ScopeLimits(),
        )

    return make
