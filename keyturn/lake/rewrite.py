"""Rewrite one lake file onto the active key version: read, rewrap or re-encrypt, verify, swap.

`rewrite_file` is the unit of work of the reencrypt job (Beam-free):

1. read the file one row group at a time (memory stays bounded by a row
   group), and pass each through `keyturn.arrow_codec.rewrap_batch` (only
   stale DEK envelopes change; each distinct DEK is re-wrapped once per
   file) or `reencrypt_batch` (readable rows sealed again under one fresh
   DEK scope per file). Rows that are retired, unknown, missing or corrupt
   stay byte for byte, in place; corrupt rows are also copied to the
   quarantine side output;
2. write every row group to a temp file next to the original
   (``.keyturn-tmp-<uuid>-<name>``) with a new ``keyturn`` footer;
3. verify the temp file as read back from storage: same row count and row
   groups, every non-sensitive column identical; for rewrap every
   sensitive cell identical and every new envelope unwraps (and matches its
   commitment); for re-encrypt the decrypted plaintext equals the
   original's and unreadable rows are identical;
4. rename the temp file over the original path (same name), so a crash
   before the rename leaves the old file and a crash after it the new one:
   every row exactly once.

A file with no stale rows left (another run got there first) is not
rewritten. Data problems (an unreadable row group, a failed verification)
leave the original untouched and come back as a failed outcome with a
quarantine record; KMS outages raise (`KmsError`), so the job stops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from keyturn.arrow_codec import decrypt_batch, encrypted_columns, reencrypt_batch, rewrap_batch
from keyturn.audit.events import AuditAction, build_event, build_quarantine, utc_now
from keyturn.errors import DecryptionError, KmsError
from keyturn.format import DEK_FIELD, VERSION_FIELD
from keyturn.ipc import batch_to_ipc
from keyturn.kms.base import CountingKms, KmsBackend
from keyturn.lake.atomic import AtomicParquetWriter
from keyturn.lake.crash import crashpoint
from keyturn.lake.footer import count_versions, footer_for, merge_counts
from keyturn.lake.layout import DataFile, Lake
from keyturn.policy import KeyPolicy, ReadStatus, count_statuses
from keyturn.reader import DekReader
from keyturn.scope import DekScope, Location, ScopeLimits

__all__ = ["RewriteOutcome", "rewrite_file", "choose_mode", "MODES"]

MODES = ("rewrap", "reencrypt", "auto")


class _VerifyError(Exception):
    """The temp file does not match the original; the original stays."""


@dataclass
class RewriteOutcome:
    """What happened to one file. `result` is rewritten, unchanged or failed."""

    relpath: str
    partition: str
    result: str
    mode: str
    rows: int = 0
    rows_moved: int = 0
    status_rows: dict[str, int] = field(default_factory=dict)
    versions_before: dict[int, int] = field(default_factory=dict)
    versions_after: dict[int, int] = field(default_factory=dict)
    kms_calls: int = 0
    kms_request_ids: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    reason: str | None = None
    detail: str | None = None
    audit: dict[str, Any] | None = None
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.relpath,
            "partition": self.partition,
            "result": self.result,
            "mode": self.mode,
            "rows": self.rows,
            "rows_moved": self.rows_moved,
            "status_rows": dict(self.status_rows),
            "versions_before": {str(k): v for k, v in sorted(self.versions_before.items())},
            "versions_after": {str(k): v for k, v in sorted(self.versions_after.items())},
            "kms_calls": self.kms_calls,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "reason": self.reason,
            "detail": self.detail,
        }


class _FileRewraps:
    """The KMS as `rewrap_batch` sees it for one file: each distinct wrapped DEK is re-wrapped once.

    Row groups of a file usually share DEKs; without this each row group
    would cost a KMS call per DEK and give one DEK several envelopes. Holds
    wrapped keys and request ids only, never key material.
    """

    def __init__(self, kms: KmsBackend) -> None:
        self._kms = kms
        self._done: dict[tuple[Any, ...], Any] = {}

    def rewrap(self, wrapped: bytes, **kwargs: Any) -> Any:
        key = (bytes(wrapped),) + tuple(
            sorted((k, tuple(sorted(v.items())) if isinstance(v, Mapping) else v) for k, v in kwargs.items())
        )
        result = self._done.get(key)
        if result is None:
            result = self._done[key] = self._kms.rewrap(wrapped, **kwargs)
        return result


def choose_mode(mode: str, versions: Mapping[int, int], policy: KeyPolicy, now: datetime, dek_max_age: timedelta) -> str:
    """`mode`, with ``auto`` resolved: re-encrypt if a stale version is older than `dek_max_age`, else rewrap."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode != "auto":
        return mode
    cutoff = now - dek_max_age
    for v in versions:
        if policy.classify(v) is ReadStatus.STALE and v in policy.created_at and policy.created_at[v] < cutoff:
            return "reencrypt"
    return "rewrap"


def _row_group_batch(pf: pq.ParquetFile, g: int) -> pa.RecordBatch:
    table = pf.read_row_group(g).combine_chunks()
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    return pa.RecordBatch.from_pylist([], schema=table.schema) if not batches else table.combine_chunks().to_batches()[0]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def rewrite_file(
    lake: Lake,
    data_file: DataFile,
    *,
    kms: KmsBackend,
    policy: KeyPolicy,
    dataset: str,
    mode: str = "rewrap",
    limits: ScopeLimits = ScopeLimits(),
    dek_max_age: timedelta = timedelta(days=365),
    actor: str = "keyturn reencrypt",
    reason: str = "",
    clock: Callable[[], datetime] = utc_now,
) -> RewriteOutcome:
    """Bring `data_file`'s stale rows onto the active version in place (see the module docstring)."""
    location = Location(dataset, data_file.partition)
    counting = CountingKms(kms)
    outcome = RewriteOutcome(data_file.relpath, data_file.partition, "unchanged", mode, bytes_before=data_file.size)
    statuses: dict[str, int] = count_statuses([])
    corrupt_records: list[dict[str, Any]] = []

    def fail(reason_code: str, detail: str) -> RewriteOutcome:
        outcome.result, outcome.reason, outcome.detail = "failed", reason_code, detail
        outcome.quarantine = corrupt_records + [
            build_quarantine(
                reason_code,
                dataset=dataset,
                partition=data_file.partition,
                detail=f"{data_file.relpath}: {detail}; the file is left as it was",
                payload=b"",
                payload_format="raw",
                rows=outcome.rows,
                clock=clock,
            ).to_dict()
        ]
        outcome.kms_calls = counting.calls.total
        outcome.kms_request_ids = list(counting.calls.request_ids)
        return outcome

    try:
        source = lake.fs.open_input_file(data_file.path)
    except OSError as exc:
        return fail("unparseable", f"cannot open: {_one_line(exc)}")
    with source:
        try:
            pf = pq.ParquetFile(source)
            schema = pf.schema_arrow
        except (OSError, pa.ArrowException, ValueError) as exc:
            return fail("unparseable", f"not a readable Parquet file: {_one_line(exc)}")
        outcome.rows = pf.metadata.num_rows
        if VERSION_FIELD not in schema.names or DEK_FIELD not in schema.names:
            outcome.reason, outcome.detail = "missing", "no key-version columns: nothing to rewrite"
            return outcome
        sensitive = encrypted_columns(schema)
        groups = [g for g in range(pf.num_row_groups) if pf.metadata.row_group(g).num_rows > 0]

        # what the file holds, from its version column only (cheap, exact)
        try:
            before: dict[int, int] = {}
            for g in groups:
                merge_counts(before, count_versions(pf.read_row_group(g, columns=[VERSION_FIELD]).column(0))[0])
        except (OSError, pa.ArrowException, ValueError) as exc:
            return fail("unparseable", f"version column unreadable: {_one_line(exc)}")
        outcome.versions_before = before
        stale = {v for v in before if policy.classify(v) is ReadStatus.STALE}
        if not stale:
            outcome.reason, outcome.detail = "no_stale_rows", "no stale rows: left as it is"
            return outcome
        outcome.mode = mode = choose_mode(mode, before, policy, clock(), dek_max_age)
        crashpoint("rewrite:before-write")

        digest = hashlib.sha256(data_file.relpath.encode() + b"\0" + str(sorted(before.items())).encode())
        after: dict[int, int] = {}
        with DekReader(counting) as reader, DekScope(counting, policy.active, location, limits=limits) as scope:
            rewraps = _FileRewraps(counting)
            with AtomicParquetWriter(lake, data_file.path, schema) as writer:
                try:
                    for n, g in enumerate(groups):
                        batch = _row_group_batch(pf, g)
                        digest.update(str(batch.num_rows).encode())
                        if mode == "rewrap":
                            result = rewrap_batch(batch, rewraps, policy, location)
                        else:
                            result = reencrypt_batch(batch, reader, scope, policy, location)
                        status = result.status
                        for k, v in result.counts().items():
                            statuses[k] += v
                        corrupt = [i for i, s in enumerate(status) if s is ReadStatus.CORRUPT]
                        if corrupt:
                            rows = batch.take(pa.array(corrupt, pa.int64()))
                            corrupt_records.append(
                                build_quarantine(
                                    "corrupt",
                                    dataset=dataset,
                                    partition=data_file.partition,
                                    detail=f"{data_file.relpath} row group {g}: rows failed to parse or authenticate; kept in place",
                                    payload=batch_to_ipc(rows),
                                    payload_format="arrow_ipc",
                                    rows=len(corrupt),
                                    clock=clock,
                                ).to_dict()
                            )
                        writer.write(result.batch)
                        merge_counts(after, count_versions(result.batch.column(VERSION_FIELD))[0])
                        if n == 0:
                            writer.flush()
                            crashpoint("rewrite:mid-write")
                except KmsError:
                    raise
                except (OSError, pa.ArrowException, ValueError, DecryptionError) as exc:
                    return fail("unparseable", f"row group unreadable: {_one_line(exc)}")
                outcome.status_rows = statuses
                outcome.versions_after = after
                outcome.rows_moved = sum(n for v, n in before.items() if v in stale) - sum(
                    n for v, n in after.items() if v in stale
                )
                if outcome.rows_moved == 0:  # every stale row turned out corrupt: nothing to gain
                    outcome.quarantine = corrupt_records
                    outcome.reason, outcome.detail = "nothing_moved", "no row could be moved onto the active version"
                    outcome.kms_calls = counting.calls.total
                    return outcome
                footer = footer_for(dataset, data_file.partition, after, outcome.rows, sensitive)
                temp = writer.finish(footer)
                try:
                    _verify(lake, pf, temp, mode, sensitive, reader, policy, location)
                except KmsError:
                    raise
                except (_VerifyError, OSError, pa.ArrowException, ValueError, DecryptionError) as exc:
                    return fail("verify_failed", f"the rewritten file did not verify ({_one_line(exc)})")
                crashpoint("rewrite:before-swap")
                source.close()
                writer.commit()
                outcome.bytes_after = lake.fs.get_file_info(data_file.path).size or 0
        crashpoint("rewrite:after-swap")
        outcome.result = "rewritten"
        outcome.quarantine = corrupt_records
        outcome.kms_calls = counting.calls.total
        outcome.kms_request_ids = list(counting.calls.request_ids)
        moved_from = sorted(v for v in stale if before.get(v, 0) > after.get(v, 0))
        counts = {
            "rows": outcome.rows,
            "rows_moved": outcome.rows_moved,
            "row_groups": len(groups),
            "kms_calls": outcome.kms_calls,
            "bytes_written": outcome.bytes_after,
            **{f"rows_{k}": v for k, v in statuses.items()},
            "deks_generated": scope.stats.deks_generated,
        }
        outcome.audit = build_event(
            AuditAction.REWRAP if mode == "rewrap" else AuditAction.REENCRYPT,
            actor=actor,
            reason=reason or f"{mode} {data_file.relpath} onto key version {policy.active.version}",
            dataset=dataset,
            partition=data_file.partition,
            version_from=moved_from[0] if moved_from else None,
            version_to=policy.active.version,
            counts=counts,
            kms_request_ids=outcome.kms_request_ids,
            scope_key=digest.hexdigest(),
            clock=clock,
        ).to_dict()
        return outcome


def _decoded(array: pa.Array) -> pa.Array:
    if pa.types.is_dictionary(array.type):
        return array.cast(array.type.value_type)
    return array


def _same(a: pa.Array | pa.RecordBatch, b: pa.Array | pa.RecordBatch) -> bool:
    """Equal values, ignoring how dictionary-encoded columns happen to be encoded."""
    if isinstance(a, pa.RecordBatch):
        return a.schema.names == b.schema.names and all(_same(x, y) for x, y in zip(a.columns, b.columns))
    return _decoded(a).equals(_decoded(b))


def _verify(
    lake: Lake,
    original: pq.ParquetFile,
    temp_path: str,
    mode: str,
    sensitive: list[str],
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
) -> None:
    """Read the temp file back and check it against the original; `_VerifyError` if anything differs."""
    with lake.fs.open_input_file(temp_path) as f:
        new = pq.ParquetFile(f)
        if new.metadata.num_rows != original.metadata.num_rows:
            raise _VerifyError(f"row count {new.metadata.num_rows} != {original.metadata.num_rows}")
        old_groups = [g for g in range(original.num_row_groups) if original.metadata.row_group(g).num_rows > 0]
        if new.num_row_groups != len(old_groups):
            raise _VerifyError("row groups differ")
        plain_columns = [n for n in original.schema_arrow.names if n not in sensitive and n not in (VERSION_FIELD, DEK_FIELD)]
        checked: set[bytes] = set()
        active = policy.active.version
        for g_new, g_old in enumerate(old_groups):
            old = _row_group_batch(original, g_old)
            fresh = _row_group_batch(new, g_new)
            if fresh.num_rows != old.num_rows:
                raise _VerifyError(f"row group {g_old}: {fresh.num_rows} rows, expected {old.num_rows}")
            for name in plain_columns:
                if not _same(fresh.column(name), old.column(name)):
                    raise _VerifyError(f"column {name!r} changed")
            if mode == "rewrap":
                for name in sensitive:
                    if not fresh.column(name).equals(old.column(name)):
                        raise _VerifyError(f"sensitive column {name!r} changed in a rewrap")
                versions = fresh.column(VERSION_FIELD).to_pylist()
                for was, now in zip(old.column(VERSION_FIELD).to_pylist(), versions):
                    if was != now and not (was is not None and policy.classify(was) is ReadStatus.STALE and now == active):
                        raise _VerifyError("a row changed key version other than stale -> active")
                deks = fresh.column(DEK_FIELD)
                envelopes = deks.dictionary.to_pylist() if pa.types.is_dictionary(deks.type) else None
                indices = deks.indices.to_pylist() if envelopes is not None else None
                values = deks.to_pylist() if envelopes is None else None
                for i, v in enumerate(versions):
                    env = (envelopes[indices[i]] if indices[i] is not None else None) if envelopes is not None else values[i]
                    if v == active and env is not None and env not in checked:
                        reader.open(env, location)  # DecryptionError unless it unwraps and its commitment matches
                        checked.add(env)
            else:
                old_read = decrypt_batch(old, reader, policy, location)
                new_read = decrypt_batch(fresh, reader, policy, location)
                if not new_read.plain.equals(old_read.plain):
                    raise _VerifyError("decrypted plaintext differs")
                if any(s.readable and t is not ReadStatus.CURRENT for s, t in zip(old_read.status, new_read.status)):
                    raise _VerifyError("a readable row is not on the active version")
                unread = [i for i, s in enumerate(old_read.status) if not s.readable]
                if unread:
                    take = pa.array(unread, pa.int64())
                    if not _same(fresh.take(take), old.take(take)):
                        raise _VerifyError("an unreadable row changed")
