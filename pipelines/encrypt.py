"""`keyturn encrypt`: plain Parquet or Avro in, an encrypted hive-partitioned Parquet lake out.

    keyturn [--home DIR] encrypt --source PATH --lake PATH --columns a,b [--partition-by COL] [-- beam options]

The pipeline:

1. On the driver: list the source files (`keyturn.sources`), read every
   file's schema (footers / headers only), and check the request: each
   column to encrypt and each partition column exists in every file, no
   partition column is encrypted, the source is not already encrypted, and
   the files' schemas agree, every partition column name can be a hive
   directory (`check_partition_names`: not hidden, not ``_keyturn``, no
   "/", "=", not empty or twice), and the `--bind` row-key columns are
   clear data columns of every file. Any problem is an `InputError`
   *before* anything is written.
2. Incremental: partitions that already hold keyturn files in the lake are
   skipped (their source rows are counted in the report as skipped), so
   running the same command again, or with a source that grew new
   partitions, adds only what is missing. That is how a legacy plain lake
   is adopted: point `--source` at it and `--lake` at a new directory, and
   run again as partitions land. The source and the lake must not overlap
   (in-place adoption would need a per-file swap; refused with a clear error).
3. Beam: `Create(files)` -> read each file in batches of at most
   `batch_rows` rows -> key by partition (the source's own hive path, plus
   `col=value` segments for `--partition-by` columns found in the data;
   values URI-encoded as pyarrow writes them, null as
   `__HIVE_DEFAULT_PARTITION__`, the literal string as
   `NULL_LITERAL_SEGMENT`) and drop the partition columns from the
   data -> gather each partition's pieces into batches of `file_rows` rows
   (on `DirectBatchRunner` in the read step itself: the files of one bundle
   share lake files, the rest of each partition leaves at the bundle's end;
   on other runners, whose bundles may be single files, `PartitionBatches`) ->
   `EncryptBatches` (one DEK per partition scope, caps from the config,
   the row-key `bind` columns) -> one Parquet file per element with the
   "keyturn" footer (at most `file_rows` rows each). On `DirectBatchRunner`
   read, encrypt and write are one fused Beam stage: batches never leave the
   process that read them (no coder round trip), and the files in flight
   bound memory. Audit events
   (one per scope) go to `<lake>/_keyturn/audit/<run-id>.avro`. Each
   file's rows read are counted. With no runner options, a large source
   runs on worker threads, one per core
   (`keyturn.pipelines.runner.lake_job_args`).
4. Commit: files are written under `<lake>/_keyturn/staging/<run-id>/` as
   ``part-<uuid>.parquet.staged``, invisible to readers (also to DuckDB's
   ``**/*.parquet`` globs, which do not skip hidden directories). When the
   pipeline has finished, the driver checks that every source row is
   accounted for (rows read = each Parquet footer's count, and = rows
   staged + rows of skipped partitions; else `AccountingError` and nothing
   is committed), writes a `_COMMITTED` marker there and moves each file
   into `<lake>/<partition>/` under its ``.parquet`` name. A crash before the marker leaves only staging,
   which the next run deletes; a crash after it is rolled forward by the
   next run. So a partition appears with all of this run's files or none,
   and never twice. Crashpoints (test hooks, `keyturn.crash`):
   ``encrypt:before-commit``, ``encrypt:mid-publish`` (after each moved
   file), ``encrypt:before-record`` (ingest's source ledger),
   ``encrypt:before-cleanup``. `encrypt_files` is this step, shared with
   `keyturn.pipelines.ingest`.

`run` returns an `EncryptReport` (`keyturn.reports`) and tells its
``progress`` callback the files and rows read as the pipeline reads them.

Encrypt and ingest hold the lake lock shared; `reencrypt` (which replaces
files) holds it exclusively, so they never overlap.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Dict, Tuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from keyturn.audit.events import build_quarantine, utc_now
from keyturn.contract import settle_arrow_contract
from keyturn.crash import crashpoint
from keyturn.encrypt_plan import EncryptPlan, check_bind, plan
from keyturn.errors import AccountingError, InputError
from keyturn.home import lake_of
from keyturn.lake.atomic import write_json_atomically
from keyturn.lake.footer import read_footer
from keyturn.lake.hive import split_by_partition
from keyturn.lake.layout import Lake, as_lake, new_run_id
from keyturn.lake.ledger import record_sources
from keyturn.lake.sideoutputs import read_side_outputs
from keyturn.reports import EncryptReport, ProgressFn, ProgressRelay, say
from keyturn.lake.staging import (
    FAILED_FILE,
    READ_FILE,
    SKIPPED_FILE,
    STAGED_SUFFIX,
    begin_run,
    commit_run_marker,
    encrypted_partitions,
    publish,
    read_json,
    recover_staging,
    staged_files,
)
from keyturn.scope import ScopeLimits
from keyturn.sources import DEFAULT_BATCH_ROWS, SourceFile, read_batches, resolve
from keyturn.transforms.arrow import EncryptBatches
from keyturn.transforms.lakefiles import MAX_QUARANTINE_BYTES, WriteLakeFiles, WriteSideOutput
from keyturn.transforms.partition import PartitionBatches, concat_batches
from keyturn.transforms.tags import QUARANTINE
from keyturn.pipelines.runner import lake_job_args, pipeline_options, runs_in_process_engine

__all__ = ["run", "encrypt_files", "quarantine_source", "resolve_bind"]

DEFAULT_FILE_ROWS = 262_144
Keyed = Tuple[str, pa.RecordBatch]



def _overlap(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


# ------------------------------------------------------------------ staging and commit


# ------------------------------------------------------------------ the pipeline


_READ_ERRORS = (OSError, pa.ArrowException, ValueError, TypeError, KeyError, EOFError)


class _ReadSplit(beam.DoFn):
    """Source files -> `(partition, batch)` of at most `file_rows` rows; pieces of already-encrypted partitions -> `skipped`.

    With `gather`, a partition's pieces gather across the files of a bundle
    into batches of `file_rows` rows; what is left of each partition is
    emitted when the bundle finishes (so memory holds at most `file_rows`
    pending rows per partition, besides the file being read). Without it,
    pieces go out as they are read (for `PartitionBatches` to group).

    With `whole_file`, a file is read completely before any piece is emitted,
    and a file that cannot be read goes to `failed` (its path) and to
    `quarantine` (its bytes) instead of failing the pipeline: nothing of a
    bad file reaches the lake. Each file read is counted on `relay`
    (files and rows, for the job's progress display).
    """

    SKIPPED = "skipped"
    FAILED = "failed"
    READ = "read"

    def __init__(
        self, plan: EncryptPlan, skip: frozenset[str], batch_rows: int, *, whole_file: bool = False, dataset: str = "",
        relay: ProgressRelay | None = None, file_rows: int = DEFAULT_FILE_ROWS, gather: bool = True,
    ) -> None:
        self.schema = plan.data_schema
        self.split_columns = plan.split_columns
        self.drop = plan.drop
        self.skip = skip
        self.batch_rows = batch_rows
        self.file_rows = file_rows
        self.gather = gather
        self.whole_file = whole_file
        self.dataset = dataset
        self.relay = relay or ProgressRelay(None, "")

    def _pieces(self, source: SourceFile, read: list[int]) -> Iterator[Keyed]:
        try:
            for batch in read_batches(source, batch_rows=self.batch_rows):
                read[0] += batch.num_rows
                yield from split_by_partition(batch, source.partition, self.split_columns, self.drop, self.schema)
        except InputError:
            raise
        except _READ_ERRORS as exc:  # name the file; the run fails and nothing is committed
            raise InputError(f"source file {source.path!r} cannot be read: {' '.join(str(exc).split())[:300]}") from None

    def start_bundle(self) -> None:
        self._pending: dict[str, list[pa.RecordBatch]] = {}
        self._rows: dict[str, int] = {}

    def _gather(self, partition: str, piece: pa.RecordBatch) -> Iterator[Keyed]:
        """Add `piece` to its partition's pending rows; yield each full batch of `file_rows` rows."""
        self._pending.setdefault(partition, []).append(piece)
        self._rows[partition] = self._rows.get(partition, 0) + piece.num_rows
        if self._rows[partition] < self.file_rows:
            return
        full = list(concat_batches(self._pending.pop(partition), self.file_rows))
        self._rows.pop(partition)
        if full and full[-1].num_rows < self.file_rows:  # the remainder waits for more rows
            rest = full.pop()
            self._pending[partition], self._rows[partition] = [rest], rest.num_rows
        for batch in full:
            yield partition, batch

    def process(self, source: SourceFile) -> Iterator[Any]:
        read = [0]  # rows read from the file, before any split: what the accounting checks against
        pieces: Any = self._pieces(source, read)
        if self.whole_file:
            try:
                pieces = list(pieces)
            except _READ_ERRORS as exc:
                yield beam.pvalue.TaggedOutput(self.FAILED, source.path)
                yield beam.pvalue.TaggedOutput(QUARANTINE, quarantine_source(source, self.dataset, exc))
                return
        for partition, piece in pieces:
            if partition in self.skip:
                yield beam.pvalue.TaggedOutput(self.SKIPPED, (partition, piece.num_rows))
            elif self.gather:
                yield from self._gather(partition, piece)
            else:
                yield partition, piece
        self.relay.add(files=1, rows=read[0])
        yield beam.pvalue.TaggedOutput(self.READ, (source.path, read[0]))

    def finish_bundle(self) -> Iterator[Any]:
        """The bundle's remaining rows, per partition (the files of a bundle share lake files)."""
        pending, self._pending, self._rows = self._pending, {}, {}
        window = GlobalWindow()
        for partition, pieces in pending.items():
            for batch in concat_batches(pieces, self.file_rows):
                yield WindowedValue((partition, batch), window.max_timestamp(), [window])


def _staged_name(partition: str, batch: pa.RecordBatch) -> str:
    """A staged data file's name: ``part-<uuid>.parquet.staged`` (renamed to ``part-<uuid>.parquet`` on publish)."""
    return f"part-{uuid.uuid4().hex}.parquet{STAGED_SUFFIX}"


def quarantine_source(source: SourceFile, dataset: str, exc: BaseException) -> dict[str, Any]:
    """A quarantine record holding a source file's bytes (up to `MAX_QUARANTINE_BYTES`)."""
    fs, path = resolve(source.path)
    with fs.open_input_stream(path) as f:
        payload = f.read(MAX_QUARANTINE_BYTES)
    detail = f"source file {source.path} could not be read ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return build_quarantine(
        "unparseable", dataset=dataset, partition=source.partition, detail=detail[:1000],
        payload=payload, payload_format="raw", rows=0,
    ).to_dict()


def _write_json(lake_uri: str | Lake, path: str, items: list[Any]) -> int:
    lake = as_lake(lake_uri)
    counts: dict[str, int] = {}
    for item in items:
        partition, rows = item if isinstance(item, tuple) else (item, 1)
        counts[partition] = counts.get(partition, 0) + rows
    write_json_atomically(lake, path, counts)
    return len(counts)


def build_pipeline(
    p: beam.Pipeline,
    *,
    plan: EncryptPlan,
    skip: frozenset[str],
    keys: Any,
    dataset: str,
    columns: Sequence[str],
    limits: ScopeLimits,
    lake_uri: str | Lake,
    staging_uri: str | Lake,
    run_id: str,
    batch_rows: int,
    file_rows: int,
    audit: bool,
    actor: str,
    reason: str,
    whole_file: bool = False,
    bind: Sequence[str] = (),
    relay: ProgressRelay | None = None,
    gather_in_bundle: bool = True,
) -> None:
    """Add the encrypt steps to `p` (files -> staged lake files, audit, skipped, failed and read lists).

    `gather_in_bundle`: gather each partition's rows into lake files within a
    bundle (`DirectBatchRunner`: one fused stage, no coder round trip);
    otherwise `PartitionBatches` groups them across bundles (other runners).
    """
    pieces = (
        p
        | "Files" >> beam.Create(plan.files)
        | "Spread" >> beam.Reshuffle()
        | "ReadSplit"
        >> beam.ParDo(
            _ReadSplit(
                plan, skip, batch_rows, whole_file=whole_file, dataset=dataset, relay=relay, file_rows=file_rows,
                gather=gather_in_bundle,
            )
        )
        .with_output_types(Keyed, skipped=Tuple[str, int], failed=str, quarantine=Dict[str, Any], read=Tuple[str, int])
        .with_outputs(_ReadSplit.SKIPPED, _ReadSplit.FAILED, QUARANTINE, _ReadSplit.READ, main="main")
    )
    batches = pieces.main
    if not gather_in_bundle:  # a runner with small bundles: group each partition's pieces across bundles
        batches = batches | "Batch" >> PartitionBatches(max_rows=file_rows, max_batches=16, max_buffering_secs=None)
    # gathered in the bundle, read -> encrypt -> write fuse into one stage: batches never leave the process
    enc = (
        batches
        | "Encrypt"
        >> EncryptBatches(keys, dataset, columns, bind_columns=list(bind), limits=limits, actor=actor, reason=reason)
    )
    _ = enc.main | "Write" >> beam.ParDo(WriteLakeFiles(staging_uri, footer_dataset=dataset, name_fn=_staged_name))
    if audit:
        _ = enc.audit | "Audit" >> WriteSideOutput(lake_uri, "audit", run_id)
    for tag, name in ((_ReadSplit.SKIPPED, SKIPPED_FILE), (_ReadSplit.FAILED, FAILED_FILE), (_ReadSplit.READ, READ_FILE)):
        target = posixpath.join(as_lake(staging_uri).root, name)
        _ = (
            pieces[tag]
            | f"Gather-{tag}" >> beam.combiners.ToList()
            | f"Write-{tag}" >> beam.Map(lambda items, target=target: _write_json(lake_uri, target, items))
        )
    if whole_file:
        _ = pieces[QUARANTINE] | "Quarantine" >> WriteSideOutput(lake_uri, "quarantine", run_id)


def _run_pipeline(beam_args: Sequence[str] | None, **steps: Any) -> None:
    options = pipeline_options(beam_args)
    with beam.Pipeline(options=options) as p:
        build_pipeline(p, gather_in_bundle=runs_in_process_engine(options), **steps)


def encrypt_files(
    home: Any,
    lake: Lake,
    the_plan: EncryptPlan,
    columns: Sequence[str],
    *,
    run_id: str,
    skip: frozenset[str] = frozenset(),
    beam_args: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    file_rows: int = DEFAULT_FILE_ROWS,
    actor: str = "keyturn",
    reason: str = "keyturn encrypt",
    whole_file: bool = False,
    sources: Callable[[list[str]], dict[str, dict[str, Any]]] | None = None,
    bind: Sequence[str] | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Run the pipeline into staging, then commit (marker, publish, ledger, cleanup). Caller holds the lock.

    `sources(failed_paths)` gives the ledger entries to record with the
    commit (ingest); returns what was written, skipped and failed. `bind`:
    the row-key columns bound into every cell (default: `resolve_bind`).
    `progress` hears the files and rows read (stage "encrypting"), then
    "committing". Before the commit marker, every source row must be
    accounted for (`AccountingError` otherwise, and nothing is committed).
    """
    bind = resolve_bind(home, bind)
    data_schema = pa.schema([f for f in the_plan.data_schema if f.name not in the_plan.split_columns])
    check_bind(bind, columns, the_plan.drop, [(f, data_schema) for f in the_plan.files[:1]])
    # the key home decides which columns are ciphertext: pin the contract on the first write, refuse a
    # write that breaks it, all before any DEK exists
    settle_arrow_contract(
        home.registry(), home.dataset, data_schema, list(columns), bind=bind, partition_by=the_plan.drop, actor=actor
    )
    staging_uri = begin_run(lake, run_id)  # its owner record: other runs' recovery leaves it alone while this one lives
    dek = home.config.dek
    try:
        with ProgressRelay(progress, "encrypting", files_total=len(the_plan.files)) as relay:
            rows = sum(n or 0 for n in the_plan.source_rows.values())
            _run_pipeline(
                lake_job_args(beam_args, rows=rows, items=len(the_plan.files)),
                plan=the_plan,
                skip=skip,
                keys=home.key_source(),
                dataset=home.dataset,
                columns=list(columns),
                limits=ScopeLimits(max_cells=dek.max_cells, max_bytes=dek.max_bytes),
                lake_uri=lake,
                staging_uri=lake.sub(staging_uri),
                run_id=run_id,
                batch_rows=batch_rows,
                file_rows=file_rows,
                audit=home.config.audit.log_encrypt,
                actor=actor,
                reason=reason,
                whole_file=whole_file,
                bind=bind,
                relay=relay,
            )
        staged = staged_files(lake, staging_uri)
        skipped = read_json(lake, posixpath.join(staging_uri, SKIPPED_FILE))
        failed = sorted(read_json(lake, posixpath.join(staging_uri, FAILED_FILE)))
        read = read_json(lake, posixpath.join(staging_uri, READ_FILE))
        written: dict[str, dict[str, int]] = {}
        for staged_path, final in staged:
            size = lake.fs.get_file_info(staged_path).size or 0
            footer = read_footer(lake.fs, staged_path)
            part = written.setdefault(Lake.partition_of(lake.relpath(final)), {"files": 0, "rows": 0, "bytes": 0})
            part["files"] += 1
            part["rows"] += footer.rows if footer is not None else 0
            part["bytes"] += size
        accounting = _account(the_plan, read, failed, written, skipped)
    except BaseException:
        try:  # nothing was committed: leave no staging behind (the next run would discard it anyway)
            lake.fs.delete_dir(staging_uri)
        except OSError:
            pass
        raise
    ledger = sources(failed) if sources else {}
    say(progress, "committing", files_done=len(staged), files_total=len(staged))
    crashpoint("encrypt:before-commit")
    verified = [path[len(staging_uri.rstrip("/")) + 1 :] for path, _ in staged]  # exactly these are published
    commit_run_marker(lake, staging_uri, run_id, verified, ledger)
    publish(lake, staging_uri)
    crashpoint("encrypt:before-record")
    record_sources(lake, ledger)
    crashpoint("encrypt:before-cleanup")
    lake.fs.delete_dir(staging_uri)
    events = read_side_outputs(lake, "audit", run_id=run_id)
    return {
        "written": dict(sorted(written.items())),
        "skipped": dict(sorted(skipped.items())),
        "failed": failed,
        "kms_calls": sum(int(e["counts"].get("deks", 0)) for e in events),
        "audit_events": len(events),
        "bind": list(bind),
        **accounting,
    }


def resolve_bind(home: Any, bind: Sequence[str] | str | None) -> list[str]:
    """The row-key columns a write binds: `bind` if given, else the config's `encryption.bind_columns`
    if set, else the dataset contract's (none for a first write without either)."""
    if bind is not None:
        return _names(bind)
    configured = home.config.encryption.bind_columns
    if configured is not None:
        return list(configured)
    contract = home.registry().get_contract(home.dataset)
    return list(contract.bind) if contract is not None else []


def _account(
    the_plan: EncryptPlan,
    read: dict[str, int],
    failed: Sequence[str],
    written: dict[str, dict[str, int]],
    skipped: dict[str, int],
) -> dict[str, int]:
    """Check that every source row is written, skipped or quarantined; `AccountingError` if not.

    Each file read whole must have given as many rows as its Parquet footer
    says (Avro: the rows read), and the rows read must equal the rows in the
    staged data files plus the rows of partitions skipped as already in the
    lake. A quarantined file (ingest) counts with its footer's rows.
    """
    failed_set = set(failed)
    problems = []
    for f in the_plan.files:
        if f.path in failed_set:
            continue
        expected = the_plan.source_rows.get(f.path)
        if f.path not in read:
            problems.append(f"source file {f.path!r} was not read")
        elif expected is not None and read[f.path] != expected:
            problems.append(f"source file {f.path!r} gave {read[f.path]:,} rows, its footer says {expected:,}")
    rows_read = sum(n for path, n in read.items() if path not in failed_set)
    rows_written = sum(p["rows"] for p in written.values())
    rows_skipped = sum(skipped.values())
    rows_quarantined = sum(the_plan.source_rows.get(path) or 0 for path in failed_set)
    if rows_written + rows_skipped != rows_read:
        problems.append(
            f"{rows_read:,} source rows were read but {rows_written:,} written and {rows_skipped:,} skipped"
        )
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise AccountingError(f"not every source row is accounted for: {problems[0]}{more}; nothing was committed")
    return {
        "rows_source": rows_read + rows_quarantined,
        "rows_written": rows_written,
        "rows_skipped": rows_skipped,
        "rows_quarantined": rows_quarantined,
    }


def run(
    *,
    home: Any,
    source: str,
    lake: str | Lake,
    columns: Sequence[str],
    partition_by: str | Sequence[str] | None = None,
    bind: str | Sequence[str] | None = None,
    beam_args: Sequence[str] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    file_rows: int = DEFAULT_FILE_ROWS,
    actor: str = "keyturn",
    reason: str = "keyturn encrypt",
    clock: Callable[[], datetime] = utc_now,
    progress: ProgressFn | None = None,
) -> EncryptReport:
    """Encrypt `source` into `lake`; returns its report (see the module docstring).

    `bind`: row-key columns bound into every cell, so a cell swapped between
    rows fails authentication (default: the config's
    `encryption.bind_columns`, else the dataset contract's, else none).
    `home` is a `KeyHome` or its path (opened with `clock`); `progress`, if
    given, hears each stage, and the files and rows read while encrypting.
    """
    started = time.monotonic()
    pipeline_options(beam_args)  # a runner keyturn refuses (or a bad option) fails before anything is pinned or written
    home = _open_home(home, clock)
    columns = _names(columns)
    partition_by = _names(partition_by)
    bind = resolve_bind(home, bind)
    the_lake = lake_of(lake, home)
    lake = the_lake.uri
    if _overlap(source, lake):
        raise InputError(f"the source {source!r} and the lake {lake!r} overlap; encrypt into a separate lake directory")
    say(progress, "checking the source")
    the_plan = plan(source, columns, partition_by, bind)

    the_lake.fs.create_dir(the_lake.root, recursive=True)
    run_id = new_run_id()
    with the_lake.lock(exclusive=False, owner=f"encrypt {run_id}"):
        recovered = recover_staging(the_lake)
        say(progress, "taking the lake inventory")
        existing = encrypted_partitions(the_lake)
        done = encrypt_files(
            home, the_lake, the_plan, columns, run_id=run_id, skip=frozenset(existing), beam_args=beam_args,
            batch_rows=batch_rows, file_rows=file_rows, actor=actor, reason=reason, bind=bind, progress=progress,
        )
    written, skipped = done["written"], done["skipped"]
    return EncryptReport(
        run_id=run_id,
        dataset=home.dataset,
        source=source,
        lake=lake,
        columns=list(columns),
        partition_by=list(partition_by),
        bind=list(bind),
        source_files=len(the_plan.files),
        partitions_written=written,
        partitions_skipped=skipped,
        rows_source=done["rows_source"],
        rows_written=sum(p["rows"] for p in written.values()),
        rows_skipped=sum(skipped.values()),
        files_written=sum(p["files"] for p in written.values()),
        bytes_written=sum(p["bytes"] for p in written.values()),
        kms_calls=done["kms_calls"],
        audit_events=done["audit_events"],
        audit_file=the_lake.side_output_path("audit", run_id) if done["audit_events"] else None,
        recovered=recovered,
        seconds=round(time.monotonic() - started, 3),
        problems=[],
    )


def _names(value: str | Sequence[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [c.strip() for c in value.split(",") if c.strip()]
    return list(value)


def _open_home(home: Any, clock: Callable[[], datetime] = utc_now) -> Any:
    """`home` if it is a `KeyHome`, else the key home at that path, opened with `clock`."""
    if isinstance(home, (str, os.PathLike)):
        from keyturn.home import KeyHome

        return KeyHome.open(home, clock=clock)
    return home
