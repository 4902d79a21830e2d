"""Re-encrypt one lake file under fresh DEKs: read, re-encrypt, verify, swap.

`rewrite_file` is the unit of work of the reencrypt job (Beam-free). Key
rotation itself never comes here: re-wrapping moves the DEK directory's
entries onto the new key version (`keyturn rewrap`) and changes no lake
byte. This is the other, payload-changing job, for DEK age policy and for
data whose DEK is still under a stale version:

1. decide from the file's key columns alone (``_keyturn_version`` and the
   dictionary of ``_keyturn_dek``) and the DEK directory whether any DEK of
   the file is stale or older than ``dek_max_age``; if not, leave it;
2. check the file against the dataset contract: a contract column that is
   missing or not ciphertext leaves the file untouched and reported;
3. read one row group at a time (memory stays bounded by a row group) and
   pass each through `keyturn.arrow_codec.reencrypt_batch`: readable rows
   sealed again under one fresh DEK scope per file (each DEK registered in
   the directory before use); retired, unknown, missing and corrupt rows
   stay byte for byte, in place, with the envelope their cells name;
   corrupt rows are also copied to the quarantine side output;
4. write every row group to a temp file next to the original (hidden name,
   see `keyturn.lake.layout`) with a new ``keyturn`` footer, and verify it as
   read back from storage: same row count and row groups, every
   non-sensitive column identical, decrypted plaintext equal to the
   original's, unreadable rows identical;
5. rename the temp file over the original path (same name), so a crash
   before the rename leaves the old file and a crash after it the new one:
   every row exactly once.

Data problems (an unreadable row group, a failed verification, a contract
violation) leave the original untouched and come back as a failed outcome
with a quarantine record; KMS outages raise (`KmsError`), so the job stops.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keyturn.arrow_codec import (
    conform,
    contract_schema,
    contract_violations,
    decrypt_batch,
    legacy_plain_columns,
    encrypted_columns,
    reencrypt_batch,
)
from keyturn.contract import DatasetContract
from keyturn.directory import DekDirectory
from keyturn.audit.events import AuditAction, build_event, build_quarantine, utc_now
from keyturn.errors import DecryptionError, KmsError
from keyturn.format import DEK_FIELD, VERSION_FIELD, parse_envelope
from keyturn.ipc import batch_to_ipc
from keyturn.kms.base import CountingKms, KmsBackend
from keyturn.lake.atomic import AtomicParquetWriter
from keyturn.crash import crashpoint
from keyturn.lake.footer import count_versions, dek_counts, envelope_rows, footer_for, merge_counts
from keyturn.lake.layout import DataFile, Lake
from keyturn.policy import KeyPolicy, ReadStatus, classify_keys, count_statuses
from keyturn.reader import DekReader
from keyturn.scope import DekScope, Location, ScopeLimits

__all__ = ["RewriteOutcome", "rewrite_file", "MODES"]

MODES = ("reencrypt",)


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
    directory: DekDirectory | None = None,
    contract: DatasetContract | None = None,
    mode: str = "reencrypt",
    limits: ScopeLimits = ScopeLimits(),
    dek_max_age: timedelta = timedelta(days=365),
    actor: str = "keyturn reencrypt",
    reason: str = "",
    clock: Callable[[], datetime] = utc_now,
) -> RewriteOutcome:
    """Re-encrypt `data_file`'s readable rows under fresh DEKs in place (see the module docstring).

    The file is rewritten when a DEK it uses is wrapped under a stale
    (decrypt-only) version, as the `directory` says, or was created more
    than `dek_max_age` ago. With the dataset's `contract`, a file in which a
    contract column is missing or not ciphertext is not rewritten: it is
    reported and left exactly as it is.
    """
    if mode not in MODES:
        raise ValueError(
            f"rewrite_file only re-encrypts (mode 'reencrypt'), not {mode!r}: re-wrapping is a directory "
            "operation (`keyturn rewrap`) that changes no lake byte"
        )
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
    with source, DekReader(counting, directory=directory) as reader:
        try:
            pf = pq.ParquetFile(source)
            schema = pf.schema_arrow
        except (OSError, pa.ArrowException, ValueError) as exc:
            return fail("unparseable", f"not a readable Parquet file: {_one_line(exc)}")
        outcome.rows = pf.metadata.num_rows
        if VERSION_FIELD not in schema.names or DEK_FIELD not in schema.names:
            outcome.reason, outcome.detail = "missing", "no key-version columns: nothing to rewrite"
            return outcome
        sensitive = contract.names if contract is not None else encrypted_columns(schema)
        groups = [g for g in range(pf.num_row_groups) if pf.metadata.row_group(g).num_rows > 0]

        # what the file holds, from its version and DEK columns only (cheap, exact)
        try:
            before: dict[int, int] = {}
            for g in groups:
                merge_counts(before, count_versions(pf.read_row_group(g, columns=[VERSION_FIELD]).column(0))[0])
            envelopes = list(envelope_rows(pf))
        except (OSError, pa.ArrowException, ValueError) as exc:
            return fail("unparseable", f"key columns unreadable: {_one_line(exc)}")
        outcome.versions_before = before
        due = _due_envelopes(envelopes, reader, policy, location, clock() - dek_max_age)
        if not due:
            outcome.reason, outcome.detail = "no_stale_rows", "no stale or over-age DEK: left as it is"
            return outcome
        if contract is not None:
            broken = contract_violations(schema, contract, _newest_revision(envelopes, reader))
            if broken:
                return fail("contract_violation", "; ".join(broken))
            legacy = legacy_plain_columns(schema, contract)
            if legacy:  # clear values nothing can prove genuine: neither sealed nor dropped
                outcome.reason = "legacy_plain_column"
                outcome.detail = (
                    f"contract column(s) {', '.join(legacy)} are held in clear (written before they joined the "
                    "contract); the file is left as it is; re-encrypt it from its plain source"
                )
                return outcome
        try:
            movable, stuck = _movable_due_rows(pf, groups, due, reader, policy, location, contract)
        except KmsError:
            raise
        except (OSError, pa.ArrowException, ValueError, DecryptionError) as exc:
            return fail("unparseable", f"row group unreadable: {_one_line(exc)}")
        if not movable:  # rewriting would only re-encrypt rows already current, again and again
            outcome.status_rows = stuck
            outcome.reason = "nothing_movable"
            outcome.detail = (
                f"the rows under a stale or over-age DEK cannot be read ({_kept_text(stuck)}); "
                "they stay as they are, and so does the file"
            )
            outcome.kms_calls = counting.calls.total
            outcome.kms_request_ids = list(counting.calls.request_ids)
            return outcome
        target_schema = contract_schema(schema, contract) if contract is not None else schema
        crashpoint("rewrite:before-write")

        digest = hashlib.sha256(data_file.relpath.encode() + b"\0" + str(sorted(before.items())).encode())
        after: dict[int, int] = {}
        deks_after: dict[bytes, int] = {}
        with DekScope(
            counting, policy.active, location, limits=limits, directory=directory, actor=actor,
            contract_revision=contract.revision if contract is not None else 0, clock=clock,
        ) as scope:
            with AtomicParquetWriter(lake, data_file.path, target_schema) as writer:
                try:
                    for n, g in enumerate(groups):
                        batch = _row_group_batch(pf, g)
                        digest.update(str(batch.num_rows).encode())
                        result = reencrypt_batch(batch, reader, scope, policy, location, contract=contract)
                        status = result.status
                        for k, v in result.counts().items():
                            statuses[k] += v
                        if result.changed:
                            outcome.rows_moved += sum(1 for st in status if st.readable)
                        corrupt = [i for i, st in enumerate(status) if st is ReadStatus.CORRUPT]
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
                        out = conform(result.batch, target_schema)
                        writer.write(out)
                        merge_counts(after, count_versions(out.column(VERSION_FIELD))[0])
                        merge_counts(deks_after, dek_counts(out))
                        if n == 0:
                            writer.flush()
                            crashpoint("rewrite:mid-write")
                except KmsError:
                    raise
                except (OSError, pa.ArrowException, ValueError, DecryptionError) as exc:
                    return fail("unparseable", f"row group unreadable: {_one_line(exc)}")
                outcome.status_rows = statuses
                outcome.versions_after = after
                if outcome.rows_moved == 0:  # every row turned out unreadable: nothing to gain
                    outcome.quarantine = corrupt_records
                    outcome.reason, outcome.detail = "nothing_moved", "no row could be moved onto a fresh DEK"
                    outcome.kms_calls = counting.calls.total
                    return outcome
                footer = footer_for(dataset, data_file.partition, after, outcome.rows, sensitive, deks_after)
                temp = writer.finish(footer)
                try:
                    _verify(lake, pf, temp, sensitive, reader, policy, location, contract)
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
        kept = {k: v for k, v in statuses.items() if k not in ("current", "stale") and v}
        if kept:  # rows that could not be read stay byte for byte, with the envelope they name
            outcome.detail = f"{sum(kept.values())} row(s) kept as they were ({_kept_text(kept)}); the others moved"
        outcome.quarantine = corrupt_records
        outcome.kms_calls = counting.calls.total
        outcome.kms_request_ids = list(counting.calls.request_ids)
        moved_from = sorted(v for v in before if v != policy.active.version)
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
            AuditAction.REENCRYPT,
            actor=actor,
            reason=reason or f"re-encrypt {data_file.relpath} under fresh DEKs on key version {policy.active.version}",
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


_KEPT_WHY = {
    "missing": "missing: no key version or DEK",
    "corrupt": "corrupt: failed to parse or authenticate",
    "unknown": "unknown: a DEK the directory does not know",
    "retired": "retired: under a retired key version",
}


def _kept_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {_KEPT_WHY.get(k, k)}" for k, n in counts.items() if n and k not in ("current", "stale"))


def _movable_due_rows(
    pf: pq.ParquetFile,
    groups: list[int],
    due: list[bytes],
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
    contract: DatasetContract | None,
) -> tuple[bool, dict[str, int]]:
    """(whether some row under a `due` envelope can be read, so a rewrite moves it; statuses of the due rows seen).

    A row with no key version is never read (missing), whatever its DEK, and
    a row whose cells fail to authenticate is corrupt: once such rows are the
    only ones left under a due DEK, rewriting the file would move nothing
    they hold, and a file kept "due" by them would be rewritten on every run.
    Stops at the first readable due row (one row group decrypted twice in
    the usual case); rows of no due DEK are not decrypted here.
    """
    counts = count_statuses([])
    for g in groups:
        keys = pf.read_row_group(g, columns=[VERSION_FIELD, DEK_FIELD])
        dek = _decoded(keys.column(DEK_FIELD).combine_chunks())
        under_due = pc.fill_null(pc.is_in(dek, value_set=pa.array(due, dek.type)), False)
        versioned = pc.is_valid(keys.column(VERSION_FIELD).combine_chunks())
        counts["missing"] += pc.sum(pc.and_(under_due, pc.invert(versioned))).as_py() or 0
        candidates = pc.and_(under_due, versioned)
        if not pc.any(candidates).as_py():
            continue
        batch = _row_group_batch(pf, g).filter(candidates)
        result = decrypt_batch(batch, reader, policy, location, contract=contract)
        if any(st.readable for st in result.status):
            return True, counts
        for k, v in result.counts().items():
            counts[k] += v
    return False, counts


def _newest_revision(envelopes: list[bytes], reader: DekReader) -> int | None:
    """The newest dataset-contract revision among the file's DEKs (None: some DEK has none, require everything)."""
    entries = reader.entries(envelopes) or {}
    revisions = [e.contract_revision if e is not None else 0 for e in entries.values()]
    return None if not revisions or 0 in revisions else max(revisions)


def _due_envelopes(
    envelopes: list[bytes], reader: DekReader, policy: KeyPolicy, location: Location, cutoff: datetime
) -> list[bytes]:
    """The file's envelopes whose DEK is readable and stale, or readable and created before `cutoff`."""
    versions = []
    for env in envelopes:
        try:
            versions.append(parse_envelope(env).key_version)
        except DecryptionError:
            versions.append(None)
    entries = reader.entries(envelopes)
    keys = classify_keys(policy, versions, envelopes, entries=entries, location=location if entries is not None else None)
    due = []
    for env, st in zip(envelopes, keys.status):
        if st is ReadStatus.STALE:
            due.append(env)
        elif st is ReadStatus.CURRENT and entries is not None:
            entry = entries.get(parse_envelope(env).dek_id)
            if entry is not None and entry.created_at < cutoff:
                due.append(env)
    return due


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
    sensitive: list[str],
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
    contract: DatasetContract | None,
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
        for g_new, g_old in enumerate(old_groups):
            old = _row_group_batch(original, g_old)
            fresh = _row_group_batch(new, g_new)
            if fresh.num_rows != old.num_rows:
                raise _VerifyError(f"row group {g_old}: {fresh.num_rows} rows, expected {old.num_rows}")
            for name in plain_columns:
                if not _same(fresh.column(name), old.column(name)):
                    raise _VerifyError(f"column {name!r} changed")
            old_read = decrypt_batch(old, reader, policy, location, contract=contract)
            new_read = decrypt_batch(fresh, reader, policy, location, contract=contract)
            if not new_read.plain.equals(old_read.plain):
                raise _VerifyError("decrypted plaintext differs")
            if any(s.readable and t is not ReadStatus.CURRENT for s, t in zip(old_read.status, new_read.status)):
                raise _VerifyError("a readable row is not on the active version")
            unread = [i for i, s in enumerate(old_read.status) if not s.readable]
            if unread:
                take = pa.array(unread, pa.int64())
                if not _same(fresh.take(take), old.take(take)):
                    raise _VerifyError("an unreadable row changed")
