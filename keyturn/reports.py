"""What a keyturn job tells its caller: `Progress` along the way, a typed `Report` at the end.

Every job (``keyturn.pipelines.<job>.run``) and every control-plane verb of
the CLI returns one of the dataclasses below. A report has one JSON form,
`Report.to_json()`: a JSON-able dict whose keys are the dataclass fields
(nested reports become their JSON form, datetimes ISO-8601 strings), minus
fields marked ``omit_if_none`` that are None and fields marked
``json=False`` (kept only for the text rendering); fields marked ``last``
come after the others, in field order. How a report is shown,
as text or JSON, is decided in one place: `keyturn.pipelines.output`.

`Progress` is the structured event a job passes to its ``progress``
callback; `ProgressRelay` carries counts from a job's Beam steps back to
that callback when the steps run in the job's own process.

This module is Beam-free.
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import cached_property
from typing import Any

__all__ = [
    "Progress", "ProgressFn", "ProgressRelay", "say", "Report", "jsonable", "STATUSES",
    "EncryptReport", "DecryptReport", "IngestReport", "ReencryptReport", "StatusReport", "DemoReport",
    "InitReport", "RotateReport", "RotationNotDueReport", "RewrapReport", "DirectoryReport", "RebuildReport",
    "ContractReport", "RetireReport", "ScheduleDeletionReport", "AuditReport",
]


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """Where a job is: the stage it is in, and the files and rows that stage has done so far.

    `files_total` is None when the stage does not know it in advance (e.g.
    ingest watching a directory). Counts are cumulative within a stage.
    """

    stage: str
    files_done: int = 0
    files_total: int | None = None
    rows_done: int = 0


ProgressFn = Callable[[Progress], None]


def say(progress: ProgressFn | None, stage: str, **counts: Any) -> None:
    """Call `progress` (if any) with a `Progress` for `stage`."""
    if progress is not None:
        progress(Progress(stage, **counts))


_OPEN_RELAYS: dict[str, "ProgressRelay"] = {}
_RELAYS_LOCK = threading.Lock()


class ProgressRelay:
    """Counts files and rows for one stage and passes each new total to a `progress` callback.

    Use it as a context manager around the stage; hand it to the stage's
    DoFns, which call `add(files=, rows=)`. It pickles as its token only: a
    copy in this process (Beam's in-process runners pickle DoFns too)
    reaches the open relay through the token, while a copy on a worker in
    another process finds none and does nothing, so progress is then shown
    per stage only. With `progress` None it does nothing at all.
    """

    def __init__(self, progress: ProgressFn | None, stage: str, *, files_total: int | None = None) -> None:
        self.token = uuid.uuid4().hex
        self.stage = stage
        self.files_total = files_total
        self.files_done = 0
        self.rows_done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def __enter__(self) -> ProgressRelay:
        if self._progress is not None:
            with _RELAYS_LOCK:
                _OPEN_RELAYS[self.token] = self
            self._emit()
        return self

    def __exit__(self, *exc: Any) -> None:
        with _RELAYS_LOCK:
            _OPEN_RELAYS.pop(self.token, None)

    def __getstate__(self) -> dict[str, Any]:
        return {"token": self.token}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(None, "")  # type: ignore[misc]
        self.token = state["token"]

    def add(self, *, files: int = 0, rows: int = 0) -> None:
        """Add to the counts of the open relay this one stands for (if it is open in this process)."""
        with _RELAYS_LOCK:
            live = _OPEN_RELAYS.get(self.token)
        if live is None:
            return
        with live._lock:
            live.files_done += files
            live.rows_done += rows
            live._emit()

    def _emit(self) -> None:
        if self._progress is not None:
            self._progress(Progress(self.stage, self.files_done, self.files_total, self.rows_done))


# --------------------------------------------------------------------------- reports


STATUSES = ("current", "stale", "retired", "unknown", "missing", "corrupt")
"""The read statuses a report counts rows by (`keyturn.policy.ReadStatus`, plus ``corrupt``)."""


def jsonable(value: Any) -> Any:
    """`value` with reports as their JSON form, datetimes as ISO-8601, tuples and sets as lists."""
    if isinstance(value, Report):
        return value.to_json()
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    return value


def _omit(*, last: bool = False) -> Any:
    """A field left out of the JSON form while it is None (a key only some runs have)."""
    return field(default=None, metadata={"omit_if_none": True, "last": last})


def _last(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field that comes after the others in the JSON form."""
    return field(default=default, default_factory=factory, metadata={"last": True})


def _text_only(default: Any = None) -> Any:
    """A field the text rendering uses that is not part of the JSON form."""
    return field(default=default, metadata={"json": False})


def _list() -> Any:
    return field(default_factory=list)


def _dict() -> Any:
    return field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Report(Mapping[str, Any]):
    """A job's typed report. New code reads attributes.

    For existing callers it is also a read-only `Mapping` over its JSON form
    (``report["rows_written"]``, ``report.get(...)``, ``dict(report)``), and
    compares equal to a mapping with the same JSON form. `problems` (a list
    of ``{"path", "partition", "reason", "detail"}`` records) decides the
    CLI's exit code, see `keyturn.pipelines.exitcodes.report_exit_code`.
    """

    def to_json(self) -> dict[str, Any]:
        """The one JSON form: field name -> JSON-able value (see the module docstring)."""
        out: dict[str, Any] = {}
        for f in self._fields():
            value = getattr(self, f.name)
            if f.metadata.get("json", True) is False or (value is None and f.metadata.get("omit_if_none")):
                continue
            out[f.name] = jsonable(value)
        return out

    @classmethod
    def _fields(cls) -> list[dataclasses.Field[Any]]:
        """The fields in JSON-form order: those marked ``last`` after the others."""
        return sorted(dataclasses.fields(cls), key=lambda f: f.metadata.get("last", False))

    @cached_property
    def _json(self) -> dict[str, Any]:
        return self.to_json()

    def __getitem__(self, key: str) -> Any:
        return self._json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._json!r})"


# ------------------------------------------------------------------ lake jobs


@dataclass(frozen=True, eq=False)
class _JobReport(Report):
    """A lake job's report: `command` first; `seconds` and `problems` last in the JSON form."""

    command: str = ""
    seconds: float = _last(0.0)
    problems: list[dict[str, Any]] = _last(factory=list)

    def __repr__(self) -> str:
        # the dataclass repr, in the JSON form's order (subclasses are declared with repr=False)
        return f"{type(self).__qualname__}({', '.join(f'{f.name}={getattr(self, f.name)!r}' for f in self._fields())})"


@dataclass(frozen=True, eq=False, repr=False)
class _ForwardingJobReport(_JobReport):
    """A lake job whose audit events may be forwarded too: their count ends the JSON form, when known."""

    audit_events_forwarded: int | None = _omit(last=True)


@dataclass(frozen=True, eq=False, repr=False)
class EncryptReport(_ForwardingJobReport):
    """`keyturn encrypt`: what was written, skipped, and at what KMS cost."""

    command: str = "encrypt"
    run_id: str = ""
    dataset: str = ""
    source: str = ""
    lake: str = ""
    columns: list[str] = _list()
    partition_by: list[str] = _list()
    bind: list[str] = _list()
    source_files: int = 0
    partitions_written: dict[str, dict[str, int]] = _dict()
    partitions_skipped: dict[str, int] = _dict()
    rows_source: int = 0
    rows_written: int = 0
    rows_skipped: int = 0
    files_written: int = 0
    bytes_written: int = 0
    kms_calls: int = 0
    audit_events: int = 0
    audit_file: str | None = None
    recovered: dict[str, int] = _dict()


@dataclass(frozen=True, eq=False, repr=False)
class DecryptReport(_ForwardingJobReport):
    """`keyturn decrypt`: every row of the lake, written or counted by status, and the side outputs."""

    command: str = "decrypt"
    run_id: str = ""
    dataset: str = ""
    lake: str = ""
    out: str = ""
    columns: list[str] | None = None
    only_partitions: list[str] | None = None
    files_read: int = 0
    files_unreadable: int = 0
    unreadable: list[str] = _list()
    files_written: int = 0
    rows_written: int = 0
    partitions: dict[str, int] = _dict()
    rows_by_status: dict[str, int] = _dict()
    rows_not_written: int = 0
    mismatch_events: int = 0
    side_outputs: str | None = None
    mismatch_file: str | None = None
    quarantined_records: int = 0
    quarantine_file: str | None = None
    audit_events: int = 0
    audit_file: str | None = None
    kms_calls: int | None = 0
    reencryption_strategy: str = ""
    deks_rewrapped: int | None = 0


@dataclass(frozen=True, eq=False, repr=False)
class IngestReport(_JobReport):
    """`keyturn ingest`: the batches committed, files ingested or quarantined, and why it stopped."""

    command: str = "ingest"
    dataset: str = ""
    watch: str = ""
    lake: str = ""
    columns: list[str] = _list()
    partition_by: list[str] = _list()
    stopped: str = "stopped"
    batches: int = 0
    files_ingested: int = 0
    files_quarantined: int = 0
    quarantined: list[str] = _list()
    rows_written: int = 0
    files_written: int = 0
    bytes_written: int = 0
    partitions: dict[str, int] = _dict()
    kms_calls: int = 0
    ledger_key_kms_calls: int = 0
    lock_waits: int = 0
    run_ids: list[str] = _list()
    recovered: dict[str, int] = _dict()


@dataclass(frozen=True, eq=False)
class ReencryptReport(Report):
    """`keyturn reencrypt`: the plan, what was rewritten, and the inventory after.

    A dry run has `inventory` (the one it took) and `temp_files`; a real run
    has `inventory_before`, `temp_files_removed` and the outcome fields
    (`files` ... `side_outputs`), with `inventory` the one taken after.
    """

    run_id: str = ""
    lake: str = ""
    dataset: str = ""
    mode: str = ""
    dry_run: bool = False
    max_files: int | None = None
    workers: int = 0
    active_version: int = 0
    directory_rewrap: dict[str, Any] | None = None
    plan: dict[str, Any] = _dict()
    inventory: dict[str, Any] = _dict()
    files_rewritten: int = 0
    kms_calls: int = 0
    problems: list[dict[str, Any]] = _list()
    complete: bool = True
    temp_files: int | None = _omit()
    inventory_before: dict[str, Any] | None = _omit()
    temp_files_removed: list[str] | None = _omit()
    files: list[dict[str, Any]] | None = _omit()
    files_truncated: bool | None = _omit()
    results: dict[str, int] | None = _omit()
    files_failed: int | None = _omit()
    rows_moved: int | None = _omit()
    bytes_rewritten: int | None = _omit()
    corrupt_rows: int | None = _omit()
    mismatch_events: int | None = _omit()
    side_outputs: dict[str, str] | None = _omit()
    audit_events_forwarded: int | None = _omit()


@dataclass(frozen=True, eq=False)
class StatusReport(Report):
    """`keyturn status`: rows and files per key version and partition, and rotation progress."""

    lake: str = ""
    dataset: str = ""
    taken_at: str = ""
    active_version: int = 0
    rows: int = 0
    files: int = 0
    partition_count: int = 0
    percent_current: float = 100.0
    status_rows: dict[str, int] = _dict()
    status_files: dict[str, int] = _dict()
    stale_files: int = 0
    current_files: int = 0
    versions: dict[str, dict[str, Any]] = _dict()
    partitions: dict[str, dict[str, Any]] = _dict()
    problems: list[dict[str, Any]] = _list()
    directory: dict[str, int] = _dict()
    contract: dict[str, Any] | None = None
    report: str | None = None


@dataclass(frozen=True, eq=False, repr=False)
class DemoReport(_JobReport):
    """`keyturn demo`: each step's numbers, the demo's own checks, and `summary` (its account in plain words)."""

    command: str = "demo"
    out: str = ""
    rows: int = 0
    partitions: int = 0
    sensitive_columns: list[str] = _list()
    steps: dict[str, dict[str, Any]] = _dict()
    encrypt: dict[str, Any] = _dict()
    percent_current: dict[str, float] = _dict()
    rewrap: dict[str, Any] = _dict()
    sample: dict[str, Any] = _dict()
    status_report: str | None = None
    summary: str = _last("")


# ------------------------------------------------------------------ control plane


@dataclass(frozen=True, eq=False)
class InitReport(Report):
    """`keyturn init`: the new key home."""

    home: str = ""
    dataset: str = ""
    provider: str = ""
    registry: str = ""
    registry_table: str | None = None
    audit_sink: str = ""
    active_version: int = 0
    kek_id: str = ""
    rotation_interval_days: int = 0
    log_group: str | None = _text_only()


@dataclass(frozen=True, eq=False)
class RewrapReport(Report):
    """`keyturn rewrap` (`keyturn.rotation.rewrap`'s result): DEKs moved onto the active version.

    `problems` is set by the `rewrap` verb (one per DEK that did not
    re-wrap); inside a `RotateReport` it is absent.
    """

    active_version: int = 0
    from_versions: list[int] = _list()
    deks_moved: int = 0
    deks_raced: int = 0
    deks_failed: list[str] = _list()
    kms_calls: int = 0
    remaining: dict[str, int] = _dict()
    complete: bool = True
    lake_bytes_written: int = 0
    audit_event: str | None = _omit()
    problems: list[dict[str, Any]] | None = _omit()


@dataclass(frozen=True, eq=False)
class RotateReport(Report):
    """`keyturn rotate`: the new active version, and the re-wrap done with it (if any)."""

    rotated: bool = True
    version_from: int = 0
    version_to: int = 0
    kek_id: str = ""
    rotation_model: str | None = None
    reason: str = ""
    next_due: datetime | None = None
    reencryption_strategy: str = ""
    rewrap: RewrapReport | None = None


@dataclass(frozen=True, eq=False)
class RotationNotDueReport(Report):
    """`keyturn rotate --if-due` before the rotation is due: nothing changed."""

    rotated: bool = False
    due: bool = False
    active_version: int = 0
    next_due: datetime | None = None
    rotation_interval_days: int = 0


@dataclass(frozen=True, eq=False)
class DirectoryReport(Report):
    """`keyturn directory show`: DEKs per key version, and each version's state."""

    deks_by_version: dict[str, int] = _dict()
    states: dict[str, str] = _dict()


@dataclass(frozen=True, eq=False)
class RebuildReport(Report):
    """`keyturn directory rebuild` (`keyturn.lake.rebuild.rebuild_directory`'s result)."""

    lake: str = ""
    dataset: str = ""
    files: int = 0
    deks_in_lake: int = 0
    deks_already_known: int = 0
    deks_registered: int = 0
    contract_pinned: dict[str, Any] | None = None
    problems: list[dict[str, Any]] = _list()


@dataclass(frozen=True, eq=False)
class ContractReport(Report):
    """`keyturn dataset show` / `add-column`: the dataset's contract (None before its first write)."""

    dataset: str = ""
    contract: dict[str, Any] | None = None
    history: list[dict[str, Any]] | None = _omit()
    added_column: str | None = _text_only()
    described: str | None = _text_only()


@dataclass(frozen=True, eq=False)
class RetireReport(Report):
    """`keyturn retire`."""

    version: int = 0
    state: str = ""
    lakes: list[str] = _list()
    reason: str = ""


@dataclass(frozen=True, eq=False)
class ScheduleDeletionReport(Report):
    """`keyturn schedule-deletion`."""

    version: int = 0
    state: str = ""
    delete_after: str | None = None
    pending_days: int = 0
    lakes: list[str] = _list()
    reason: str = ""


@dataclass(frozen=True, eq=False)
class AuditReport(Report):
    """`keyturn audit verify`: the hash chain is intact (a broken one is an error, not a report)."""

    ok: bool = True
    log: str = ""
    entries: int = 0
    head: str | None = None
    anchored_in: str | None = None
    anchor: dict[str, Any] | None = None
    unanchored_entries: int = 0
