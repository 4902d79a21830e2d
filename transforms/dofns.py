"""The DoFns: thin shells that hold configuration and call the keyturn core.

Each DoFn builds its KMS client and registry in `setup()` (so a pickled
DoFn holds neither a key nor a client), snapshots the key policy in
`start_bundle()`, keeps DEK scopes per (partition, window) for the bundle
only, and in `finish_bundle()` emits one audit event per scope and closes
every scope. No plaintext key survives `finish_bundle()`.

Elements are `(partition, payload)` pairs; a payload is one record batch or
a list of Avro records (see `keyturn.transforms.adapters`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from keyturn.audit.events import AuditAction, MismatchReason, build_event, build_mismatch, build_quarantine
from keyturn.kms.decorators import CountingKms
from keyturn.keysource import KeySource
from keyturn.contract import DatasetContract
from keyturn.errors import KmsError, RegistryError
from keyturn.policy import KeyPolicy, ReadStatus, VersionRules, classify_keys
from keyturn.reader import DekReader, envelope_dek_id
from keyturn.rewrap import DirectoryRewrap, rewrap_entries
from keyturn.scope import DekScope, Location, ScopeLimits
from keyturn.transforms.adapters import PayloadAdapter, Rewritten
from keyturn.transforms.tags import AUDIT, QUARANTINE, VERSION_MISMATCH

__all__ = ["EncryptFn", "DecryptFn", "ReencryptFn"]

NAMESPACE = "keyturn"
_MISMATCH_REASONS = {
    ReadStatus.STALE: MismatchReason.STALE,
    ReadStatus.RETIRED: MismatchReason.RETIRED,
    ReadStatus.UNKNOWN: MismatchReason.UNKNOWN,
    ReadStatus.MISSING: MismatchReason.MISSING,
}


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class _ScopeLedger:
    """What one (partition, window) scope did in this bundle; no key material."""

    partition: str
    window: Any
    scope: DekScope | None = None
    digests: list[bytes] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    versions_from: set[int] = field(default_factory=set)
    kms_request_ids: list[str] = field(default_factory=list)

    def add(self, **counts: int) -> None:
        for name, n in counts.items():
            self.counts[name] = self.counts.get(name, 0) + n

    def scope_key(self) -> str:
        """Deterministic for the same input: digests sorted, so element order does not matter."""
        h = hashlib.sha256()
        for digest in sorted(self.digests):
            h.update(digest)
        return h.hexdigest()


class _KeyturnFn(beam.DoFn):
    """Shared lifecycle: clients in setup, policy per bundle, one audit event per scope."""

    action: AuditAction
    limits: ScopeLimits = ScopeLimits()

    def __init__(self, adapter: PayloadAdapter, keys: KeySource, dataset: str, *, actor: str, reason: str) -> None:
        if not dataset:
            raise ValueError("dataset must be non-empty")
        self.adapter = adapter
        self.keys = keys
        self.dataset = dataset
        self.actor = actor
        self.reason = reason
        self.clock: Callable[[], datetime] = _utc_now
        self._kms: CountingKms | None = None
        self._registry: Any = None
        self._ledgers: dict[tuple[str, Any], _ScopeLedger] = {}
        self._counters: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(
            _kms=None, _registry=None, _ledgers={}, _counters={}, _policy=None, _reader=None, _contract=None, _rewrapped=set()
        )
        return state

    def _count(self, name: str, n: int) -> None:
        if n:
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
            counter.inc(n)

    def setup(self) -> None:
        self._kms = CountingKms(self.keys.open_kms())
        self._registry = self.keys.open_registry()

    uses_reader = False  # open a DekReader per bundle (decrypting DoFns)

    def start_bundle(self) -> None:
        self._policy = KeyPolicy.from_registry(self._registry)
        self._ledgers = {}
        self._contract = None
        self._reader = DekReader(self._kms, directory=self._registry) if self.uses_reader else None

    def _dataset_contract(self, payload: Any = None) -> DatasetContract | None:
        """The dataset's contract from the registry, read once per bundle.

        Given a `payload` (writers), a dataset without a contract gets one
        pinned from it: the first write decides, and two first writers agree
        on whichever registered first.
        """
        if self._contract is None:
            contract = self._registry.get_contract(self.dataset)
            if contract is None and payload is not None:
                contract = self._registry.pin_contract(
                    self.adapter.propose_contract(self.dataset, payload),
                    actor=self.actor,
                    reason=f"first write to dataset {self.dataset!r} pins its contract",
                )
            self._contract = contract
        return self._contract

    def _ledger(self, partition: str, window: Any) -> _ScopeLedger:
        key = (partition, window)
        ledger = self._ledgers.get(key)
        if ledger is None:
            ledger = self._ledgers[key] = _ScopeLedger(partition, window)
        return ledger

    def _open_scope(self, ledger: _ScopeLedger, contract: DatasetContract | None) -> DekScope:
        """The ledger's DEK scope; every DEK it makes is registered in the directory before use."""
        if ledger.scope is None:
            ledger.scope = DekScope(
                self._kms,
                self._policy.active,
                Location(self.dataset, ledger.partition),
                limits=self.limits,
                directory=self._registry,
                actor=self.actor,
                contract_revision=contract.revision if contract is not None else 0,
                clock=self.clock,
            )
        return ledger.scope

    def _close_ledger(self, ledger: _ScopeLedger) -> dict[str, Any]:
        if ledger.scope is not None:
            stats = ledger.scope.stats
            ledger.add(deks=stats.deks_generated, cells=stats.cells, bytes=stats.bytes)
            ledger.kms_request_ids.extend(stats.kms_request_ids)
            self._count("deks_generated", stats.deks_generated)
            self._count("kms_calls", stats.deks_generated)
            ledger.scope.close()
            ledger.scope = None
        versions = sorted(ledger.versions_from)
        return build_event(
            self.action,
            actor=self.actor,
            reason=self.reason,
            dataset=self.dataset,
            partition=ledger.partition,
            version_from=versions[0] if versions else None,
            version_to=self._version_to(),
            counts=ledger.counts,
            kms_request_ids=ledger.kms_request_ids,
            scope_key=ledger.scope_key(),
            clock=self.clock,
        ).to_dict()

    def _version_to(self) -> int | None:
        return self._policy.active.version

    def finish_bundle(self) -> Iterator[Any]:
        try:
            for ledger in self._ledgers.values():
                event = self._close_ledger(ledger)
                window = ledger.window
                yield TaggedOutput(AUDIT, WindowedValue(event, window.max_timestamp(), [window]))
        finally:
            for ledger in self._ledgers.values():
                if ledger.scope is not None:
                    ledger.scope.close()
            self._ledgers = {}
            self._close_bundle()

    def _close_bundle(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def teardown(self) -> None:
        self._kms = None
        self._registry = None

    # -- side outputs for rows that are not current ------------------------
    def _report(
        self,
        partition: str,
        payload: Any,
        status: list[ReadStatus],
        report_stale: bool,
        versions: list[int | None] | None = None,
    ) -> Iterator[Any]:
        """Version-mismatch events (with rows) and quarantine records for non-current rows.

        `versions` are the rows' effective key versions (the directory's); by default the rows' own.
        """
        if versions is None:
            versions = self.adapter.row_versions(payload)
        groups: dict[tuple[ReadStatus, int | None], list[int]] = {}
        for i, s in enumerate(status):
            if s is ReadStatus.CURRENT or (s is ReadStatus.STALE and not report_stale):
                continue
            groups.setdefault((s, versions[i] if s is not ReadStatus.MISSING else None), []).append(i)
        current = self._policy.active.version
        for (s, version), rows in sorted(groups.items(), key=lambda kv: (kv[0][0].value, kv[0][1] or 0)):
            self._count(f"rows_{s.value}", len(rows))
            subset = self.adapter.take(payload, rows)
            if s is ReadStatus.CORRUPT:
                record = build_quarantine(
                    "corrupt",
                    dataset=self.dataset,
                    partition=partition,
                    detail="rows failed to parse or authenticate",
                    payload=self.adapter.serialize(subset),
                    payload_format=self.adapter.payload_format,
                    rows=len(rows),
                    clock=self.clock,
                )
                yield TaggedOutput(QUARANTINE, record.to_dict())
                continue
            scope_key = hashlib.sha256(self.adapter.fingerprint(subset, encrypted=True)).hexdigest()
            event = build_mismatch(
                _MISMATCH_REASONS[s],
                dataset=self.dataset,
                partition=partition,
                found_version=version,
                current_version=current,
                rows=len(rows),
                scope_key=scope_key,
                clock=self.clock,
            )
            yield TaggedOutput(VERSION_MISMATCH, (event.to_dict(), subset))


class EncryptFn(_KeyturnFn):
    """Encrypts each payload under its (partition, window) scope's DEK."""

    action = AuditAction.ENCRYPT

    def __init__(self, adapter: PayloadAdapter, keys: KeySource, dataset: str, *, limits: ScopeLimits, actor: str, reason: str) -> None:
        super().__init__(adapter, keys, dataset, actor=actor, reason=reason)
        self.limits = limits

    def process(self, element: tuple[str, Any], window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        partition, payload = element
        ledger = self._ledger(partition, window)
        contract = self._dataset_contract(payload)
        scope = self._open_scope(ledger, contract)
        before = scope.stats.cells
        sealed = self.adapter.encrypt(payload, scope, contract)
        ledger.digests.append(self.adapter.fingerprint(payload, encrypted=False))
        rows = self.adapter.rows(payload)
        ledger.add(rows=rows)
        self._count("rows_encrypted", rows)
        self._count("cells_encrypted", scope.stats.cells - before)
        yield partition, sealed


class DecryptFn(_KeyturnFn):
    """Decrypts readable rows to the main output; reports the rest on side outputs.

    With `stale_to_main` (the default) stale rows are decrypted into the main
    output AND reported on `version_mismatch` (reason `stale`, with their
    encrypted rows) so a consumer can re-encrypt them lazily; without it they
    go only to `version_mismatch`.

    `version_rules` (``version_tracking.on_missing_version`` /
    ``on_unknown_version``): with ``reject``, an element holding such rows
    raises `VersionMismatchError` before anything of it is emitted; with
    ``quarantine`` (the default) they go to `version_mismatch`.

    `rewrap_stale` (``lifecycle.reencryption_strategy: lazy``): the directory
    entries of the stale DEKs this DoFn reads are re-wrapped onto the active
    version, once per DEK per bundle (one KMS call each, compare-and-set; no
    payload byte changes). Best effort: a KMS or registry failure of the
    re-wrap is counted (``rewrap_errors``), never fails the read. The audit
    event of the scope counts ``rewrapped_deks``.
    """

    action = AuditAction.DECRYPT
    uses_reader = True

    def __init__(
        self,
        adapter: PayloadAdapter,
        keys: KeySource,
        dataset: str,
        *,
        stale_to_main: bool,
        actor: str,
        reason: str,
        version_rules: VersionRules | None = None,
        rewrap_stale: bool = False,
    ) -> None:
        super().__init__(adapter, keys, dataset, actor=actor, reason=reason)
        self.stale_to_main = stale_to_main
        self.version_rules = version_rules if version_rules is not None else VersionRules()
        self.rewrap_stale = rewrap_stale
        self._rewrapped: set[bytes] = set()

    def start_bundle(self) -> None:
        super().start_bundle()
        self._rewrapped = set()

    def _rewrap_read_deks(self, payload: Any, status: list[ReadStatus], ledger: _ScopeLedger) -> None:
        """Lazy rotation: move the stale DEKs just read onto the active version in the directory."""
        _, envelopes = self.adapter.row_keys(payload)
        entries = self._reader.entries(envelopes) or {}
        stale: dict[bytes, Any] = {}
        for s, env in zip(status, envelopes):
            if s is ReadStatus.STALE and env is not None:
                dek_id = envelope_dek_id(env)
                entry = entries.get(dek_id) if dek_id is not None else None
                if entry is not None and dek_id not in self._rewrapped:
                    stale[dek_id] = entry
        if not stale:
            return
        self._rewrapped.update(stale)
        done = DirectoryRewrap()
        try:
            rewrap_entries(self._registry, self._kms, stale.values(), self._policy.active, result=done)
        except (KmsError, RegistryError):  # the read succeeded; the next reader or `keyturn rewrap` moves the rest
            errors = len(stale) - done.moved - done.raced
            ledger.add(rewrap_errors=errors)
            self._count("rewrap_errors", errors)
        ledger.kms_request_ids.extend(done.kms_request_ids)  # every KMS call made, swapped in or not
        ledger.add(rewrapped_deks=done.moved)
        self._count("deks_rewrapped", done.moved)
        self._count("kms_calls", done.kms_calls)

    def _version_to(self) -> int | None:
        return None

    def process(self, element: tuple[str, Any], window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        partition, payload = element
        ledger = self._ledger(partition, window)
        unwraps_before = len(self._reader.stats.kms_request_ids)
        result = self.adapter.decrypt(
            payload, self._reader, self._policy, Location(self.dataset, partition), self._dataset_contract()
        )
        self.version_rules.check(result.status, dataset=self.dataset, partition=partition)
        new_ids = self._reader.stats.kms_request_ids[unwraps_before:]
        ledger.kms_request_ids.extend(new_ids)
        self._count("kms_calls", len(new_ids))
        ledger.digests.append(self.adapter.fingerprint(payload, encrypted=True))
        versions = result.versions
        readable = [i for i, s in enumerate(result.status) if s.readable]
        ledger.versions_from.update(versions[i] for i in readable)
        counts = {s.value: 0 for s in ReadStatus}
        for s in result.status:
            counts[s.value] += 1
        ledger.add(rows=len(result.status), unwraps=len(new_ids), **counts)
        self._count("rows_decrypted", len(readable))
        self._count("cells_decrypted", self.adapter.sealed_cells(payload, readable))
        keep = {ReadStatus.CURRENT, ReadStatus.STALE} if self.stale_to_main else {ReadStatus.CURRENT}
        plain = self.adapter.select_plain(result, keep)
        if self.rewrap_stale:
            self._rewrap_read_deks(payload, result.status, ledger)
        if not self.adapter.empty(plain):
            yield partition, plain
        yield from self._report(partition, payload, result.status, report_stale=True, versions=versions)


class ReencryptFn(_KeyturnFn):
    """Brings stale rows onto the active version; every input row stays in the main output.

    `mode`: `rewrap` (the stale DEKs' entries in the DEK directory are
    re-wrapped onto the active version, one KMS call per distinct DEK per
    bundle; the payload passes through byte for byte, because readers take
    the wrapping from the directory), `reencrypt` (fresh DEK per scope,
    payload bytes change), or `auto` (re-encrypt when a stale row's key
    version is older than `dek_max_age`, else rewrap). Retired, unknown,
    missing and corrupt rows are kept unchanged in the main output, so
    writing it back loses nothing, and are reported on `version_mismatch` /
    `quarantine` (a copy).
    """

    uses_reader = True

    def __init__(
        self,
        adapter: PayloadAdapter,
        keys: KeySource,
        dataset: str,
        *,
        mode: str,
        dek_max_age: timedelta,
        limits: ScopeLimits,
        actor: str,
        reason: str,
    ) -> None:
        super().__init__(adapter, keys, dataset, actor=actor, reason=reason)
        if mode not in ("rewrap", "reencrypt", "auto"):
            raise ValueError(f"mode must be rewrap, reencrypt or auto, not {mode!r}")
        self.mode = mode
        self.dek_max_age = dek_max_age
        self.limits = limits
        self.action = AuditAction.REWRAP if mode == "rewrap" else AuditAction.REENCRYPT
        self._rewrapped: set[bytes] = set()

    def start_bundle(self) -> None:
        super().start_bundle()
        self._rewrapped = set()

    def _too_old(self, versions: list[int | None], status: list[ReadStatus]) -> bool:
        cutoff = self.clock() - self.dek_max_age
        created = self._policy.created_at
        return any(
            s is ReadStatus.STALE and v in created and created[v] < cutoff for v, s in zip(versions, status)
        )

    def _rewrap_in_directory(self, payload: Any, location: Location) -> tuple[Rewritten, list[int | None]]:
        """Re-wrap the directory entries of the payload's stale DEKs; the payload itself is not changed."""
        row_versions, envelopes = self.adapter.row_keys(payload)
        entries = self._reader.entries(envelopes) or {}
        keys = classify_keys(self._policy, row_versions, envelopes, entries=entries, location=location)
        stale: dict[bytes, Any] = {}
        for s, env in zip(keys.status, envelopes):
            if s is ReadStatus.STALE and env is not None:
                dek_id = envelope_dek_id(env)
                entry = entries.get(dek_id) if dek_id is not None else None
                if entry is not None and dek_id not in self._rewrapped:
                    stale[dek_id] = entry
        done = rewrap_entries(self._registry, self._kms, stale.values(), self._policy.active)
        self._rewrapped.update(stale)
        return Rewritten(payload, keys.status, done.kms_request_ids, done.moved), keys.versions

    def process(self, element: tuple[str, Any], window: Any = beam.DoFn.WindowParam) -> Iterator[Any]:
        partition, payload = element
        location = Location(self.dataset, partition)
        ledger = self._ledger(partition, window)
        row_versions, envelopes = self.adapter.row_keys(payload)
        keys = classify_keys(
            self._policy, row_versions, envelopes, entries=self._reader.entries(envelopes) or {}, location=location
        )
        mode = self.mode
        if mode == "auto":
            mode = "reencrypt" if self._too_old(keys.versions, keys.status) else "rewrap"
        if mode == "rewrap":
            out, versions = self._rewrap_in_directory(payload, location)
            ledger.add(rewrapped_deks=out.deks_rewrapped)
        else:
            unwraps_before = len(self._reader.stats.kms_request_ids)
            contract = self._dataset_contract()
            scope = self._open_scope(ledger, contract)
            out = self.adapter.reencrypt(payload, self._reader, scope, self._policy, location, contract)
            out.kms_request_ids.extend(self._reader.stats.kms_request_ids[unwraps_before:])
            versions = keys.versions
        ledger.kms_request_ids.extend(out.kms_request_ids)
        self._count("kms_calls", len(out.kms_request_ids))
        ledger.digests.append(self.adapter.fingerprint(payload, encrypted=True))
        moved = [v for v, s in zip(versions, out.status) if s is ReadStatus.STALE]
        ledger.versions_from.update(v for v in moved if v is not None)
        counts = {s.value: 0 for s in ReadStatus}
        for s in out.status:
            counts[s.value] += 1
        ledger.add(rows=len(out.status), **counts)
        yield partition, out.payload
        yield from self._report(partition, payload, out.status, report_stale=False, versions=versions)
