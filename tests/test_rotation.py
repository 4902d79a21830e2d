"""keyturn.rotation: audited rotate, retire and schedule_deletion over a real SQLite registry and chain."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from keyturn.audit.chain import AuditChain, verify_chain
from keyturn.errors import AuditChainError, InvalidTransitionError, UnknownVersionError, VersionInUseError
from keyturn.registry.base import KeyState
from keyturn.registry.sqlite import SqliteKeyRegistry
from keyturn.rotation import (
    CombinedInventory,
    kek_id_for,
    next_rotation_due,
    retire,
    rewrap,
    rotate,
    rotation_due,
    schedule_deletion,
)

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Refs:
    """An inventory with fixed counts per version."""

    def __init__(self, **counts: int) -> None:
        self.counts = {int(k[1:]): v for k, v in counts.items()}
        self.asked: list[int] = []

    def references(self, version: int) -> int:
        self.asked.append(version)
        return self.counts.get(version, 0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def registry(tmp_path, clock) -> SqliteKeyRegistry:
    reg = SqliteKeyRegistry(tmp_path / "registry.sqlite", clock=clock)
    reg.initialize(kek_id_for(1), actor="test", reason="first")
    return reg


@pytest.fixture
def chain(tmp_path) -> AuditChain:
    return AuditChain(tmp_path / "audit.log")


def provisioner(made: list[int]):
    def provision(version: int) -> str:
        made.append(version)
        return kek_id_for(version)

    return provision


def test_kek_id_for():
    assert kek_id_for(1) == "kek-0001"
    assert kek_id_for(12345) == "kek-12345"
    for bad in (0, -1, True, "1"):
        with pytest.raises(ValueError):
            kek_id_for(bad)


def test_rotate_provisions_next_kek_rotates_and_audits(registry, chain, clock):
    made: list[int] = []
    clock.now = T0 + timedelta(days=100)
    new = rotate(registry, provisioner(made), chain, actor="alice", reason="quarterly", clock=clock, dataset="sales")
    assert made == [2]
    assert (new.version, new.kek_id, new.state) == (2, "kek-0002", KeyState.ACTIVE)
    assert registry.get(1).state is KeyState.DECRYPT_ONLY
    assert new.created_at == clock.now
    [entry] = chain.entries()
    event = entry.event
    assert (event.action.value, event.version_from, event.version_to) == ("rotate", 1, 2)
    assert (event.actor, event.reason, event.dataset, event.partition) == ("alice", "quarterly", "sales", "")
    assert event.at.startswith("2025-04-11T")
    assert verify_chain(chain.path) == 1

    rotate(registry, provisioner(made), chain, actor="bob", reason="again", clock=clock)
    assert made == [2, 3]
    assert [e.event.version_to for e in chain.entries()] == [2, 3]
    assert [v.state for v in registry.versions()] == [KeyState.DECRYPT_ONLY, KeyState.DECRYPT_ONLY, KeyState.ACTIVE]


def test_rotate_failing_provisioner_changes_nothing(registry, chain):
    def broken(version: int) -> str:
        raise RuntimeError("kms down")

    with pytest.raises(RuntimeError):
        rotate(registry, broken, chain, actor="a", reason="r")
    assert [v.version for v in registry.versions()] == [1]
    assert chain.entries() == []


def test_rotate_rejects_bad_kek_id_from_provisioner(registry, chain):
    with pytest.raises(TypeError):
        rotate(registry, lambda v: "", chain, actor="a", reason="r")
    assert registry.active().version == 1


def test_rotation_due_follows_interval(registry, clock):
    assert next_rotation_due(registry, 90) == T0 + timedelta(days=90)
    assert not rotation_due(registry, 90, T0)
    assert not rotation_due(registry, 90, T0 + timedelta(days=89, hours=23))
    assert rotation_due(registry, 90, T0 + timedelta(days=90))
    assert rotation_due(registry, 1, T0 + timedelta(days=2))
    with pytest.raises(ValueError):
        rotation_due(registry, 90, datetime(2025, 6, 1))  # naive
    with pytest.raises(ValueError):
        rotation_due(registry, 0, T0)


def test_rotation_due_is_measured_from_the_newest_version(registry, chain, clock):
    clock.now = T0 + timedelta(days=200)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    assert not rotation_due(registry, 90, T0 + timedelta(days=250))
    assert rotation_due(registry, 90, T0 + timedelta(days=290))


def test_retire_refused_while_inventory_finds_data(registry, chain):
    rotate(registry, provisioner([]), chain, actor="a", reason="r")
    refs = Refs(v1=7)
    with pytest.raises(VersionInUseError, match="the inventory still finds 7 reference"):
        retire(registry, 1, chain, inventory=refs, actor="a", reason="done")
    assert refs.asked == [1]
    assert registry.get(1).state is KeyState.DECRYPT_ONLY
    assert [e.event.action.value for e in chain.entries()] == ["rotate"]


def test_retire_then_schedule_deletion_audited(registry, chain, clock):
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    retired = retire(registry, 1, chain, inventory=Refs(), actor="ops", reason="migrated", clock=clock)
    assert retired.state is KeyState.RETIRED
    scheduled = schedule_deletion(
        registry, 1, chain, inventory=Refs(), pending_days=30, actor="ops", reason="cleanup", clock=clock
    )
    assert scheduled.state is KeyState.PENDING_DELETION
    assert scheduled.delete_after == clock.now + timedelta(days=30)
    events = [e.event for e in chain.entries()]
    assert [e.action.value for e in events] == ["rotate", "retire", "schedule_deletion"]
    assert events[1].version_from == 1 and events[1].version_to is None
    assert events[2].counts == {"pending_days": 30}
    assert verify_chain(chain.path) == 3


def test_schedule_deletion_refused_while_data_remains(registry, chain):
    rotate(registry, provisioner([]), chain, actor="a", reason="r")
    retire(registry, 1, chain, inventory=Refs(), actor="a", reason="r")
    with pytest.raises(VersionInUseError):
        schedule_deletion(registry, 1, chain, inventory=Refs(v1=1), pending_days=7, actor="a", reason="r")
    assert registry.get(1).state is KeyState.RETIRED
    assert len(chain.entries()) == 2


def test_invalid_transitions_write_no_event(registry, chain):
    with pytest.raises(InvalidTransitionError):
        retire(registry, 1, chain, inventory=Refs(), actor="a", reason="active cannot be retired")
    with pytest.raises(UnknownVersionError):
        retire(registry, 5, chain, inventory=Refs(), actor="a", reason="r")
    rotate(registry, provisioner([]), chain, actor="a", reason="r")
    with pytest.raises(InvalidTransitionError):
        schedule_deletion(registry, 1, chain, inventory=Refs(), pending_days=7, actor="a", reason="not retired yet")
    with pytest.raises(ValueError):
        retire(registry, 1, chain, inventory=Refs(v1=-1), actor="a", reason="an inventory answering nonsense")
    with pytest.raises(ValueError):
        schedule_deletion(registry, 1, chain, inventory=Refs(), pending_days=-1, actor="a", reason="r")
    assert [e.event.action.value for e in chain.entries()] == ["rotate"]


@pytest.fixture
def kms():
    import os

    from keyturn.kms.local import LocalKms

    return LocalKms.in_memory({kek_id_for(v): os.urandom(32) for v in (1, 2, 3)})


def register_deks(registry, kms, n: int) -> None:
    """Seal a cell under `n` fresh DEKs on the active version; each scope registers its DEK in the directory."""
    import pyarrow as pa

    from keyturn.arrow_codec import encrypt_batch
    from keyturn.scope import DekScope, KekRef, Location

    active = registry.active()
    batch = pa.record_batch({"id": [1], "email": ["a@example.com"]})
    for i in range(n):
        with DekScope(kms, KekRef(active.version, active.kek_id), Location("sales", f"p={i}"), directory=registry) as scope:
            encrypt_batch(batch, ["email"], scope)


def test_retire_without_an_inventory_is_decided_by_the_directory(registry, chain, kms, clock):
    register_deks(registry, kms, 3)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    assert registry.deks_by_version() == {1: 3}
    for inventory in (None, Refs()):  # a lake finding nothing does not overrule the directory
        with pytest.raises(VersionInUseError, match=r"the DEK directory holds 3 DEK\(s\) wrapped under it"):
            retire(registry, 1, chain, inventory=inventory, actor="a", reason="done")
    assert registry.get(1).state is KeyState.DECRYPT_ONLY
    assert [e.event.action.value for e in chain.entries()] == ["rotate"]

    report = rewrap(registry, kms, chain, actor="ops", reason="move DEKs", clock=clock)
    assert (report["deks_moved"], report["kms_calls"], report["complete"]) == (3, 3, True)
    assert report["lake_bytes_written"] == 0 and registry.deks_by_version() == {2: 3}
    retired = retire(registry, 1, chain, actor="ops", reason="migrated", clock=clock)  # no inventory at all
    assert retired.state is KeyState.RETIRED
    events = [e.event for e in chain.entries()]
    assert [e.action.value for e in events] == ["rotate", "rewrap", "retire"]
    assert (events[1].version_from, events[1].version_to, events[1].counts["deks_moved"]) == (1, 2, 3)
    assert len(events[1].kms_request_ids) == 3
    assert verify_chain(chain.path) == 3


def test_rewrap_is_bounded_resumable_and_idempotent(registry, chain, kms, clock):
    register_deks(registry, kms, 5)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    first = rewrap(registry, kms, chain, actor="ops", reason="r", clock=clock, max_deks=2)
    assert (first["deks_moved"], first["complete"], first["remaining"]) == (2, False, {"1": 3})
    with pytest.raises(VersionInUseError, match="holds 3 DEK"):
        retire(registry, 1, chain, actor="ops", reason="too early")
    second = rewrap(registry, kms, chain, actor="ops", reason="r", clock=clock)
    assert (second["deks_moved"], second["kms_calls"], second["complete"]) == (3, 3, True)
    third = rewrap(registry, kms, chain, actor="ops", reason="r", clock=clock)
    assert (third["deks_moved"], third["kms_calls"], third["complete"]) == (0, 0, True)
    assert "audit_event" not in third  # nothing moved: nothing logged
    assert [e.event.action.value for e in chain.entries()] == ["rotate", "rewrap", "rewrap"]
    assert registry.deks_by_version() == {2: 5}


def test_schedule_deletion_without_an_inventory_after_rewrap(registry, chain, kms, clock):
    register_deks(registry, kms, 1)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    rewrap(registry, kms, chain, actor="ops", reason="r", clock=clock)
    retire(registry, 1, chain, actor="ops", reason="r", clock=clock)
    scheduled = schedule_deletion(registry, 1, chain, pending_days=3, actor="ops", reason="r", clock=clock)
    assert scheduled.state is KeyState.PENDING_DELETION and scheduled.delete_after == clock.now + timedelta(days=3)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    with pytest.raises(VersionInUseError, match="holds 1 DEK"):  # version 2 now wraps the DEK
        retire(registry, 2, chain, actor="ops", reason="r", clock=clock)


def test_combined_inventory_sums_every_lake():
    combined = CombinedInventory([Refs(v1=2), Refs(v1=3, v2=1), Refs()])
    assert combined.references(1) == 5
    assert combined.references(2) == 1
    assert combined.references(3) == 0
    with pytest.raises(ValueError):
        CombinedInventory([])


def test_rotation_module_never_imports_beam():
    import subprocess
    import sys

    code = "import sys, keyturn.rotation; sys.exit(1 if any(m.startswith('apache_beam') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _damage(chain: AuditChain) -> None:
    with open(chain.path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines[0] = lines[0].replace(b'"reason":"r"', b'"reason":"x"')
    with open(chain.path, "wb") as f:
        f.writelines(lines)


def test_damaged_chain_stops_changes_before_they_happen(registry, chain):
    rotate(registry, provisioner([]), chain, actor="a", reason="r")
    _damage(chain)
    made: list[int] = []
    with pytest.raises(AuditChainError) as info:
        rotate(registry, provisioner(made), chain, actor="a", reason="r")
    assert info.value.index == 0
    assert made == [] and registry.active().version == 2
    with pytest.raises(AuditChainError):
        retire(registry, 1, chain, inventory=Refs(), actor="a", reason="r")
    assert registry.get(1).state is KeyState.DECRYPT_ONLY


def test_append_failure_after_the_change_says_so(registry, chain, monkeypatch):
    def refuse(event):
        raise AuditChainError(4, "refusing to append: disk says no")

    monkeypatch.setattr(chain, "append", refuse)
    with pytest.raises(AuditChainError, match="made in the registry but its audit event was not logged"):
        rotate(registry, provisioner([]), chain, actor="a", reason="r")
    assert registry.active().version == 2


class _SwapLog:
    """A directory that forwards to the registry and records each `replace_wrappings` batch, with its own batch size."""

    def __init__(self, registry, swap_batch: int) -> None:
        self._registry, self.swap_batch, self.batches = registry, swap_batch, []

    def replace_wrappings(self, swaps):
        self.batches.append(len(swaps))
        return self._registry.replace_wrappings(swaps)

    def __getattr__(self, name):
        return getattr(self._registry, name)


class _KmsDownAtCall:
    """A KMS whose `down_at`-th rewrap call fails as an outage (the others go to `inner`)."""

    def __init__(self, inner, down_at: int) -> None:
        self._inner, self._down_at, self.calls = inner, down_at, 0

    def rewrap(self, *args, **kwargs):
        from keyturn.errors import KmsUnavailableError

        self.calls += 1
        if self.calls == self._down_at:
            raise KmsUnavailableError("the KMS is down")
        return self._inner.rewrap(*args, **kwargs)


def _stale_entries(registry):
    return registry.list_deks(key_version=1)


def test_rewrap_entries_swaps_a_batch_per_write_and_counts_each_swap(registry, chain, kms, clock):
    from keyturn.rewrap import rewrap_entries
    from keyturn.scope import KekRef

    register_deks(registry, kms, 5)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    target = KekRef(2, kek_id_for(2))
    log = _SwapLog(registry, swap_batch=2)
    done = rewrap_entries(log, kms, _stale_entries(registry), target)
    assert log.batches == [2, 2, 1]  # five DEKs, two per write
    assert (done.moved, done.raced, done.kms_calls, done.failed) == (5, 0, 5, [])
    assert registry.deks_by_version() == {2: 5}
    assert rewrap_entries(log, kms, registry.list_deks(), target).kms_calls == 0  # nothing left: no KMS call, no write
    assert log.batches == [2, 2, 1]


def test_a_kms_outage_in_the_middle_of_a_batch_keeps_what_the_kms_already_rewrapped(registry, chain, kms, clock):
    from keyturn.errors import KmsUnavailableError
    from keyturn.rewrap import DirectoryRewrap, rewrap_entries
    from keyturn.scope import KekRef

    register_deks(registry, kms, 5)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    log, result = _SwapLog(registry, swap_batch=256), DirectoryRewrap()
    with pytest.raises(KmsUnavailableError):
        rewrap_entries(log, _KmsDownAtCall(kms, 3), _stale_entries(registry), KekRef(2, kek_id_for(2)), result=result)
    assert log.batches == [2] and result.moved == 2  # the two DEKs re-wrapped before the outage are swapped in
    assert registry.deks_by_version() == {1: 3, 2: 2}
    report = rewrap(registry, kms, chain, actor="ops", reason="after the outage", clock=clock)
    assert (report["deks_moved"], report["kms_calls"], report["complete"]) == (3, 3, True)


class _CommitFails(_SwapLog):
    """Each batch's write fails as a locked SQLite file would, after the KMS calls were made."""

    def replace_wrappings(self, swaps):
        from keyturn.errors import RegistryError

        self.batches.append(len(swaps))
        raise RegistryError("sqlite key registry: database is locked")


def test_a_batch_whose_write_fails_is_audited_with_every_kms_call_and_nothing_counted_as_moved(registry, chain, kms, clock):
    from keyturn.errors import RegistryError

    register_deks(registry, kms, 3)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    with pytest.raises(RegistryError, match="locked"):
        rewrap(_CommitFails(registry, swap_batch=256), kms, chain, actor="ops", reason="r", clock=clock)
    assert registry.deks_by_version() == {1: 3}  # rolled back: every entry on its old, readable wrapping
    event = [e.event for e in chain.entries()][-1]
    assert event.action.value == "rewrap"
    assert (event.counts["deks_moved"], event.counts["kms_calls"], event.counts["interrupted"]) == (0, 3, 1)
    assert len(event.kms_request_ids) == 3
    assert verify_chain(chain.path) == 2
    report = rewrap(registry, kms, chain, actor="ops", reason="again", clock=clock)
    assert (report["deks_moved"], report["kms_calls"], report["complete"]) == (3, 3, True)


def test_a_kms_outage_stays_the_error_when_the_swap_before_it_fails_too(registry, chain, kms, clock):
    from keyturn.errors import KmsUnavailableError
    from keyturn.rewrap import rewrap_entries
    from keyturn.scope import KekRef

    register_deks(registry, kms, 3)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    with pytest.raises(KmsUnavailableError, match="down") as raised:
        rewrap_entries(_CommitFails(registry, swap_batch=256), _KmsDownAtCall(kms, 2), _stale_entries(registry), KekRef(2, kek_id_for(2)))
    assert any("not swapped in" in note and "locked" in note for note in raised.value.__notes__)
    assert registry.deks_by_version() == {1: 3}


def test_a_directory_with_only_the_one_entry_swap_still_rewraps_one_by_one(registry, chain, kms, clock):
    from keyturn.directory import DekDirectory
    from keyturn.rewrap import rewrap_entries
    from keyturn.scope import KekRef

    class OneByOne:  # a directory written to the protocol before `replace_wrappings` existed
        def __init__(self, inner) -> None:
            self._inner, self.swaps = inner, 0

        def register_deks(self, entries):
            return self._inner.register_deks(entries)

        def lookup_deks(self, dek_ids):
            return self._inner.lookup_deks(dek_ids)

        def list_deks(self, **kwargs):
            return self._inner.list_deks(**kwargs)

        def dek_count(self, key_version=None):
            return self._inner.dek_count(key_version)

        def deks_by_version(self):
            return self._inner.deks_by_version()

        def replace_wrapping(self, dek_id, *, expected_envelope, new_envelope):
            self.swaps += 1
            return self._inner.replace_wrapping(dek_id, expected_envelope=expected_envelope, new_envelope=new_envelope)

    register_deks(registry, kms, 3)
    rotate(registry, provisioner([]), chain, actor="a", reason="r", clock=clock)
    old = OneByOne(registry)
    assert isinstance(old, DekDirectory)
    seen = []
    done = rewrap_entries(old, kms, _stale_entries(registry), KekRef(2, kek_id_for(2)), on_entry=seen.append)
    assert (done.moved, done.kms_calls, old.swaps) == (3, 3, 3)
    assert [e.dek_id for e in seen] == [e.dek_id for e in registry.list_deks()]
    assert registry.deks_by_version() == {2: 3}
