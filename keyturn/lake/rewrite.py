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
3. read `REWRITE_BATCH_ROWS` rows at a time and decrypt them once: readable rows are
   sealed again under one fresh DEK scope per file (each DEK registered in
   the directory before use); retired, unknown, missing and corrupt rows
   stay byte for byte, in place, with the envelope their cells name;
   corrupt rows are also copied to the quarantine side output. Row groups
   wait unsealed until one holds a readable row under a due DEK, so a file
   whose due rows are all unreadable makes no DEK and is left as it is;
4. write every row group to a temp file next to the original (hidden name,
   see `keyturn.lake.layout`) with a new ``keyturn`` footer, and verify it as
   read back from storage against what step 3 kept (SHA-256 digests of the
   decrypted plaintext, every column, of the readable rows, of their
   positions and of the unreadable rows as they were): same row count, one
   row group per batch of step 3, the new file decrypted once, its readable
   rows the same rows on the active version with the same plaintext,
   unreadable rows identical. Per cell: one decrypt, one encrypt, one
   verifying decrypt. Memory is bounded by `REWRITE_BATCH_ROWS` per file in
   flight, not by the file or the lake;
5. rename the temp file over the original path (same name), so a crash
   before the rename leaves the old file and a crash after it the new one:
   every row exactly once.

Data problems (an unreadable row group, a failed verification, a contract
violation) leave the original untouched and come back as a failed outcome
with a quarantine record; KMS outages raise (`KmsError`), so the job stops.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keyturn.arrow_codec import (
    META_BIND,
    DecryptResult,
    conform,
    contract_schema,
    contract_violations,
    decrypt_batch,
    legacy_plain_columns,
    encrypt_batch,
    encrypted_columns,
)
from keyturn.contract import DatasetContract
from keyturn.directory import DekDirectory
from keyturn.audit.events import AuditAction, build_event, build_quarantine, utc_now
from keyturn.errors import DecryptionError, KmsError
from keyturn.format import DEK_FIELD, VERSION_FIELD, parse_envelope
from keyturn.ipc import batch_ipc_buffer, batch_to_ipc
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
        target_schema = contract_schema(schema, contract) if contract is not None else schema
        digest = hashlib.sha256(data_file.relpath.encode() + b"\0" + str(sorted(before.items())).encode())
        after: dict[int, int] = {}
        deks_after: dict[bytes, int] = {}
        held: list[_Held] = []  # what verification checks the new file against: no second decrypt of the original
        # Row groups are decrypted once each, in order. Until one holds a readable row under a due DEK,
        # they wait here unsealed, so a file whose due rows are all unreadable makes no DEK at all.
        pending: list[tuple[int, pa.RecordBatch, DecryptResult]] = []
        movable = False
        due_set = pa.array(due, pa.binary())
        with DekScope(
            counting, policy.active, location, limits=limits, directory=directory, actor=actor,
            contract_revision=contract.revision if contract is not None else 0, clock=clock,
        ) as scope, ExitStack() as stack:
            writer: AtomicParquetWriter | None = None  # opened once a due row turns out readable; removed unless committed
            try:
                for g, batch in _slices(pf, groups):
                    decrypted = decrypt_batch(batch, reader, policy, location, contract=contract)
                    pending.append((g, batch, decrypted))
                    if not movable:
                        movable = _due_row_readable(batch, decrypted.status, due_set)
                        if not movable:
                            continue
                        crashpoint("rewrite:before-write")
                        writer = stack.enter_context(AtomicParquetWriter(lake, data_file.path, target_schema))
                    for g_, batch_, decrypted_ in pending:
                        digest.update(str(batch_.num_rows).encode())
                        out = _rewrite_group(
                            g_, batch_, decrypted_, scope, contract, target_schema, statuses, outcome,
                            corrupt_records, held, dataset=dataset, data_file=data_file, clock=clock,
                        )
                        writer.write(out)
                        merge_counts(after, count_versions(out.column(VERSION_FIELD))[0])
                        merge_counts(deks_after, dek_counts(out))
                        if len(held) == 1:  # test hook: a crash with part of the file written
                            writer.flush()
                            crashpoint("rewrite:mid-write")
                    pending.clear()
            except KmsError:
                raise
            except (OSError, pa.ArrowException, ValueError, DecryptionError) as exc:
                return fail("unparseable", f"row group unreadable: {_one_line(exc)}")
            if writer is None:  # rewriting would only re-encrypt rows already current, again and again
                outcome.status_rows = _due_statuses(pending, due_set)
                outcome.reason = "nothing_movable"
                outcome.detail = (
                    f"the rows under a stale or over-age DEK cannot be read ({_kept_text(outcome.status_rows)}); "
                    "they stay as they are, and so does the file"
                )
                outcome.kms_calls = counting.calls.total
                outcome.kms_request_ids = list(counting.calls.request_ids)
                return outcome
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
                _verify(lake, temp, held, outcome.rows, reader, policy, location, contract)
            except KmsError:
                raise
            except (_VerifyError, OSError, pa.ArrowException, ValueError, DecryptionError) as exc:
                return fail("verify_failed", f"the rewritten file did not verify ({_one_line(exc)})")
            held.clear()
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


REWRITE_BATCH_ROWS = 32_768
"""Rows decrypted, sealed and written at a time (each becomes a row group of the new file): with the
threads' files in flight, what bounds a rewrite's memory, however large the files are."""


def _slices(pf: pq.ParquetFile, groups: list[int]) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(row group, batch) of the file's rows, `REWRITE_BATCH_ROWS` at most, in file order."""
    schema = pf.schema_arrow
    for g in groups:
        for batch in pf.iter_batches(batch_size=REWRITE_BATCH_ROWS, row_groups=[g], use_threads=False):
            if batch.num_rows:
                yield g, pa.RecordBatch.from_arrays(batch.columns, schema=schema)


def _digest(batch: pa.RecordBatch | None) -> bytes:
    """SHA-256 of `batch`'s column names and values (dictionary columns decoded, metadata ignored)."""
    if batch is None:
        return b""
    columns = [_decoded(c) for c in batch.columns]
    bare = pa.RecordBatch.from_arrays(
        columns, schema=pa.schema([pa.field(n, c.type) for n, c in zip(batch.schema.names, columns)])
    )
    return hashlib.sha256(batch_ipc_buffer(bare)).digest()


@dataclass
class _Held:
    """What one rewritten batch must read back as, in digests (so memory does not grow with the file):
    the decrypted readable rows of the original (every column), their positions (empty: every row),
    and the kept original rows (unreadable, byte for byte)."""

    rows: int
    plain: bytes
    readable: bytes
    kept: bytes


def _positions_digest(readable: np.ndarray | None) -> bytes:
    return b"" if readable is None else hashlib.sha256(np.ascontiguousarray(readable, dtype=np.int64).tobytes()).digest()


def _readable_positions(status: list[ReadStatus], tally: Mapping[ReadStatus, int]) -> np.ndarray | None:
    """Positions of the readable rows; None when every row is readable (no per-row work for a uniform group)."""
    if all(st.readable for st in tally):
        return None
    if not any(st.readable for st in tally):
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(np.fromiter(map(_READABLE.__getitem__, status), dtype=bool, count=len(status)))


_READABLE = {st: st.readable for st in ReadStatus}


def _under(batch: pa.RecordBatch, envelopes: pa.Array) -> pa.Array:
    """Per row, whether its ``_keyturn_dek`` is one of `envelopes` (False for a null)."""
    dek = _decoded(batch.column(DEK_FIELD))
    return pc.fill_null(pc.is_in(dek, value_set=envelopes.cast(dek.type)), False)


def _due_row_readable(batch: pa.RecordBatch, status: list[ReadStatus], due: pa.Array) -> bool:
    """Whether some row of `batch` under a `due` envelope was read (so a rewrite moves it).

    A row with no key version is never read (missing), whatever its DEK, and
    a row whose cells fail to authenticate is corrupt: once such rows are the
    only ones left under a due DEK, rewriting the file would move nothing
    they hold, and a file kept "due" by them would be rewritten on every run.
    """
    tally = Counter(status)
    readable = _readable_positions(status, tally)
    if readable is not None and not len(readable):
        return False
    under = _under(batch, due)
    if readable is None:
        return bool(pc.any(under).as_py())
    return bool(under.to_numpy(zero_copy_only=False)[readable].any())


def _due_statuses(groups: list[tuple[int, pa.RecordBatch, DecryptResult]], due: pa.Array) -> dict[str, int]:
    """Rows per status of the rows under a `due` envelope (the file is left as it is; a rare path)."""
    counts = count_statuses([])
    for _, batch, decrypted in groups:
        under = _under(batch, due).to_numpy(zero_copy_only=False)
        for k, v in count_statuses([st for st, u in zip(decrypted.status, under) if u]).items():
            counts[k] += v
    return counts


def _rewrite_group(
    g: int,
    batch: pa.RecordBatch,
    decrypted: DecryptResult,
    scope: DekScope,
    contract: DatasetContract | None,
    target_schema: pa.Schema,
    statuses: dict[str, int],
    outcome: RewriteOutcome,
    corrupt_records: list[dict[str, Any]],
    held: list[_Held],
    *,
    dataset: str,
    data_file: DataFile,
    clock: Callable[[], datetime],
) -> pa.RecordBatch:
    """One row group, decrypted once, sealed again (`_reseal`); counts its rows, quarantines its corrupt
    rows, and keeps what verification needs in `held`. Returns the batch to write."""
    status = decrypted.status
    tally = Counter(status)
    for st, n in tally.items():
        statuses[st.value] += n
    readable = _readable_positions(status, tally)
    sealed, changed = _reseal(batch, decrypted, readable, scope, contract)
    if changed:
        outcome.rows_moved += batch.num_rows if readable is None else len(readable)
    if tally.get(ReadStatus.CORRUPT):
        corrupt = [i for i, st in enumerate(status) if st is ReadStatus.CORRUPT]
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
    kept = None
    if readable is not None:
        unread = np.setdiff1d(np.arange(batch.num_rows), readable, assume_unique=True)
        kept = batch.take(pa.array(unread, pa.int64()))
    held.append(_Held(batch.num_rows, _digest(decrypted.plain), _positions_digest(readable), _digest(kept)))
    return conform(sealed, target_schema)


def _reseal(
    batch: pa.RecordBatch,
    decrypted: DecryptResult,
    readable: np.ndarray | None,
    scope: DekScope,
    contract: DatasetContract | None,
) -> tuple[pa.RecordBatch, bool]:
    """`reencrypt_batch` from an already decrypted batch: (the batch with its readable rows sealed under
    `scope`, whether anything changed). Unreadable rows stay byte for byte, in place; row order is kept.

    The same rules as `keyturn.arrow_codec.reencrypt_batch`, which decrypts
    the batch itself: a contract column held in clear, or absent while some
    rows are unreadable (they could not share one schema), leaves the batch
    unchanged.
    """
    n = batch.num_rows
    if readable is not None and not len(readable):
        return batch, False
    if contract is not None:
        absent = [c for c in contract.names if c not in batch.schema.names]
        if legacy_plain_columns(batch.schema, contract) or (absent and readable is not None):
            return batch, False
        sensitive, binds = contract.names, list(contract.bind)
        out_schema = contract_schema(batch.schema, contract)
    else:
        sensitive = encrypted_columns(batch.schema)
        binds = sorted({b for name in sensitive for b in json.loads(batch.schema.field(name).metadata.get(META_BIND, b"[]"))})
    sealed = encrypt_batch(decrypted.plain, sensitive, scope, bind_columns=binds)
    take = None if readable is None else pa.array(readable, pa.int64())
    if contract is None:
        out_schema = pa.schema(
            [sealed.schema.field(f.name) if f.name in sealed.schema.names else f for f in batch.schema],
            metadata=batch.schema.metadata,
        )
    # columns left out of `plain` (another keyturn format) are all null in readable rows: keep them as they are
    sealed = pa.RecordBatch.from_arrays(
        [
            sealed.column(f.name) if f.name in sealed.schema.names
            else batch.column(f.name) if take is None else batch.column(f.name).take(take)
            for f in out_schema
        ],
        schema=out_schema,
    )
    if readable is None:
        return sealed, True
    others = np.setdiff1d(np.arange(n), readable, assume_unique=True)
    kept = conform(batch.take(pa.array(others, pa.int64())), out_schema)
    combined = pa.Table.from_batches([sealed, kept]).combine_chunks()
    position = np.empty(n, dtype=np.int64)
    position[np.concatenate([readable, others])] = np.arange(n)
    out = combined.take(pa.array(position)).combine_chunks().to_batches()
    return (out[0] if out else sealed.slice(0, 0)), True


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


def _verify(
    lake: Lake,
    temp_path: str,
    held: list[_Held],
    rows: int,
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
    contract: DatasetContract | None,
) -> None:
    """Read the temp file back and check it against what the rewrite held (`held`); `_VerifyError` if anything differs.

    Each new row group is decrypted once (the only decrypt here; the
    original is never decrypted again): its readable rows must be exactly
    the original's readable rows, all on the active version, with the same
    plaintext in every column; its other rows byte for byte the original's.
    """
    with lake.fs.open_input_file(temp_path) as f:
        new = pq.ParquetFile(f)
        if new.metadata.num_rows != rows:
            raise _VerifyError(f"row count {new.metadata.num_rows} != {rows}")
        if new.num_row_groups != len(held):
            raise _VerifyError("row groups differ")
        for g, want in enumerate(held):
            fresh = _row_group_batch(new, g)
            if fresh.num_rows != want.rows:
                raise _VerifyError(f"row group {g}: {fresh.num_rows} rows, expected {want.rows}")
            new_read = decrypt_batch(fresh, reader, policy, location, contract=contract)
            if set(Counter(new_read.plain_status)) - {ReadStatus.CURRENT}:
                raise _VerifyError("a readable row is not on the active version")
            readable = _readable_positions(new_read.status, Counter(new_read.status))
            if _positions_digest(readable) != want.readable:
                raise _VerifyError("the readable rows differ")
            if _digest(new_read.plain) != want.plain:
                raise _VerifyError("decrypted plaintext differs")
            kept = None
            if readable is not None:
                kept = fresh.take(pa.array(np.setdiff1d(np.arange(want.rows), readable, assume_unique=True), pa.int64()))
            if _digest(kept) != want.kept:
                raise _VerifyError("an unreadable row changed")
