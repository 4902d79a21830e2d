"""`ReadLake` and `WriteLake`: Beam PTransforms that read and write keyturn lakes.

A lake written by `WriteLake` is the lake ``keyturn encrypt`` writes: the
same layout (`keyturn.lake.layout`), the same ``keyturn`` footer on every
file (`keyturn.lake.footer.footer_of_batch`, through
`keyturn.transforms.lakefiles.WriteLakeFiles`), the same staged commit
(`keyturn.lake.staging`), so ``keyturn status``, ``keyturn decrypt`` and
``keyturn reencrypt`` read it like any other. Lakes are local paths,
``s3://bucket/prefix`` (endpoint settings pickle with the `Lake`) or any
filesystem URI pyarrow supports.

`WriteLake(lake_uri, dataset=..., keys=...)` takes encrypted batches:
``EncryptBatches(...)`` output (the whole `KeyturnOutputs`, or just its
`main`), keyed ``(partition, RecordBatch)`` or bare tables/batches
(partition ""). The partition is the one the cells were encrypted under,
so WriteLake never re-partitions. The pipeline steps:

1. Stage: each element becomes one file
   ``<lake>/_keyturn/staging/<run-id>/<partition>/part-<uuid>.parquet.staged``
   (invisible to readers and to ``**/*.parquet`` globs), after checks: the
   dataset must have a contract in the key home (EncryptBatches pins it on
   the first write), and the batch must be sealed output of this key home
   for this dataset and partition (`keyturn.lake.admission`: contract
   columns ciphertext whose cells name their row's DEK, key columns on
   every row, every DEK in the key home's directory for this partition, no
   column shadowing a contract column by case; otherwise `ContractError`),
   and the partition must be a visible relative path. Input must be bounded
   and in the global window (`InputError` when the pipeline is built); an
   explicit `run_id` must be one plain name no earlier run left behind.
   Emits one record per file.
2. Side outputs: with a `KeyturnOutputs` input, its audit events,
   version-mismatch events and quarantine records go to
   ``<lake>/_keyturn/<kind>/<run-id>.avro``, as the CLI writes them, before
   the commit.
3. Commit, once, after every file is written (a final step over the
   gathered records, like Beam's WriteToFiles finalisation): the rows that
   reached WriteLake must equal the rows in the staged files' footers, each
   file's footer must name the dataset and its partition
   (`AccountingError` otherwise, nothing committed); staged files no
   record lists (written by bundle attempts the runner retried and
   discarded) are deleted; then the ``_COMMITTED`` marker, then every file
   is moved to ``<lake>/<partition>/part-<uuid>.parquet`` (exactly the
   files the marker lists: one that turns up later is never published), then the staging
   directory goes. A re-run of the commit step (a retried bundle) finds the
   marker and rolls forward, or finds the run published and does nothing.
   So a retried bundle never duplicates rows, and a failed or cancelled
   pipeline publishes nothing: its staging (no marker) is discarded by a
   later ``keyturn encrypt`` / ``ingest`` (`recover_staging`) once it is
   `keyturn.lake.staging.STALE_RUN_SECONDS` old (a Beam run's owner is no
   one process, so it cannot be checked sooner; until then it is left
   alone, as the live run it may be). WriteLake does not discard other
   runs' staging itself.

   Output: one report dict (run id, files, rows and bytes per partition,
   discarded attempt files, side-output records).

Lock: the commit step holds the lake lock shared (`keyturn.lake.lock`, as
``keyturn encrypt`` does), so a publish never overlaps a ``keyturn
reencrypt`` (exclusive) and a reencrypt never starts mid-publish; if one
holds the lake, the commit fails (`LakeLockedError`, never waits) and
nothing is published. Staging is not under the lock: it writes only into
the run's own staging directory. `lock=None` (default) locks where keyturn
has a lock (local and S3 lakes) and skips it on other filesystems;
``True`` requires it, ``False`` never locks.

`ReadLake(lake_uri)` lists the lake's data files when the pipeline is built
(``partitions=`` limits them) and reads each in batches of at most
`batch_rows` rows, as ``keyturn decrypt`` does. It returns
`LakeReadOutputs` (`main`, `quarantine`): `main` yields
``(partition, RecordBatch)`` (what `DecryptBatches` and `ReencryptBatches`
take; a file lacking the key columns gets them as nulls, so its rows count
as `missing`), or bare `pyarrow.Table`s with ``output="tables"`` (refused
for a partitioned lake: the partition is bound into every cell). A file
that is not readable Parquet goes to the `quarantine` output (a
QuarantineRecord with its bytes) and stays where it is. ReadLake writes
nothing into the lake and takes no lock (a reencrypt replaces files by
atomic renames, so a reader sees a file before or after, never a mix).
"""

from __future__ import annotations

import contextlib
import posixpath
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, Dict, NamedTuple, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from apache_beam.pvalue import AsList, AsSingleton, TaggedOutput

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder and TableCoder)
from keyturn.lake.admission import admission_problems
from keyturn.crash import crashpoint
from keyturn.errors import AccountingError, ContractError, InputError, LakeError
from keyturn.lake.footer import parse_footer, read_footer
from keyturn.lake.footer import FOOTER_KEY
from keyturn.lake.layout import Lake, as_lake, is_hidden, new_run_id
from keyturn.lake.staging import (
    COMMIT_MARKER,
    OWNER_FILE,
    STAGED_SUFFIX,
    STAGING,
    begin_run,
    check_run_id,
    commit_run_marker,
    heartbeat,
    publish,
    staged_files,
)
from keyturn.transforms.lakefiles import ReadLakeFiles, WriteLakeFiles, WriteSideOutput, add_key_columns
from keyturn.transforms.outputs import KeyturnOutputs
from keyturn.transforms.partition import KeyBatches, main_of
from keyturn.transforms.runners import check_runner
from keyturn.transforms.tags import QUARANTINE

__all__ = ["ReadLake", "WriteLake", "LakeReadOutputs", "commit_run"]

Keyed = Tuple[str, pa.RecordBatch]
_HEARTBEAT_SECONDS = 600  # how often a staging worker renews its run's owner record (STALE_RUN_SECONDS is 24 h)


# ------------------------------------------------------------------ WriteLake


def _staged_name(partition: str, batch: pa.RecordBatch) -> str:
    return f"part-{uuid.uuid4().hex}.parquet{STAGED_SUFFIX}"


def _check_partition(partition: str) -> None:
    """`InputError` unless `partition` is a relative path of visible names (data under a hidden one is invisible)."""
    if partition == "":
        return
    bad = [p for p in partition.split("/") if not p or p in (".", "..") or is_hidden(p) or "\\" in p]
    if bad or partition.startswith("/"):
        raise InputError(
            f"partition {partition!r} cannot be a lake directory: each '/'-separated name must be non-empty, "
            "not '.', '..' and not start with '_' or '.' (readers skip hidden directories)"
        )


class _StageFiles(WriteLakeFiles):
    """WriteLakeFiles into the run's staging directory, after the contract and partition checks."""

    def __init__(self, lake: Lake, run_id: str, dataset: str, keys: Any) -> None:
        super().__init__(lake.sub(lake.keyturn_path(STAGING, run_id)), footer_dataset=dataset, name_fn=_staged_name)
        self.lake = lake
        self.run_id = run_id
        self.dataset = dataset
        self.keys = keys
        self._registry: Any = None
        self._contract: Any = None
        self._beat = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_registry": None, "_contract": None}

    def setup(self) -> None:
        super().setup()
        self._registry = self.keys.open_registry()
        if not _exists(self.lake, posixpath.join(self.lake.keyturn_path(STAGING, self.run_id), OWNER_FILE)):
            begin_run(self.lake, self.run_id, process=False)  # a live run: other jobs' recovery leaves it alone

    def start_bundle(self) -> None:
        self._contract = None  # read once per bundle: a contract pinned meanwhile (first write) is seen
        if time.monotonic() - self._beat >= _HEARTBEAT_SECONDS:  # the run is alive: other jobs' recovery leaves it
            heartbeat(self.lake, self.run_id)
            self._beat = time.monotonic()

    def process(self, element: Keyed) -> Iterator[Dict[str, Any]]:
        partition, batch = element
        _check_partition(partition)
        if self._contract is None:
            self._contract = self._registry.get_contract(self.dataset)
        if self._contract is None:
            raise ContractError(
                f"dataset {self.dataset!r} has no contract in the key home, so nothing says which columns must be "
                "ciphertext; encrypt with EncryptBatches (which pins it on the first write) before WriteLake"
            )
        problems = admission_problems(batch, partition, self._contract, self._registry, self.dataset)
        if problems:
            raise ContractError(
                f"WriteLake refuses a batch of partition {partition!r}: {problems[0]}"
                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; {self._contract.describe()}"
            )
        yield from super().process(element)

    def teardown(self) -> None:
        self._registry = None


def _rows(element: Keyed) -> int:
    return element[1].num_rows


def _rel(run_dir: str, path: str) -> str:
    """`path` relative to the run's staging directory (records and listings compared by it)."""
    prefix = run_dir.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


def _final_path(lake: Lake, rel: str) -> str:
    return lake.path(rel[: -len(STAGED_SUFFIX)] if rel.endswith(STAGED_SUFFIX) else rel)


def _exists(lake: Lake, path: str) -> bool:
    return lake.fs.get_file_info(path).type == pafs.FileType.File


def _lock(lake: Lake, lock: bool | None, owner: str) -> Any:
    if lock is False or (lock is None and not (lake.is_local or lake.is_s3)):
        return contextlib.nullcontext()
    return lake.lock(exclusive=False, owner=owner)


def _file_facts(lake: Lake, path: str) -> tuple[Any, int]:
    """(footer or None, Parquet row count) of a staged file, from its footer only."""
    with lake.fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata
    return parse_footer((meta.metadata or {}).get(FOOTER_KEY)), meta.num_rows


def commit_run(
    records: list[dict[str, Any]],
    rows_in: int,
    side_counts: Sequence[tuple[str, int]] = (),
    *,
    lake: Lake,
    run_id: str,
    dataset: str,
    lock: bool | None = None,
) -> dict[str, Any]:
    """Commit WriteLake's run `run_id` (see the module docstring); idempotent. Returns the run's report."""
    run_dir = lake.keyturn_path(STAGING, run_id)
    by_path = {_rel(run_dir, r["path"]): r for r in records}  # a record seen twice is one file
    finals = {p: _final_path(lake, p) for p in by_path}
    report: dict[str, Any] = {
        "run_id": run_id,
        "lake": lake.uri,
        "dataset": dataset,
        "files": len(by_path),
        "rows": sum(int(r["rows"]) for r in by_path.values()),
        "partitions": {},
        "discarded_files": 0,
        "side_outputs": {kind: n for kind, n in sorted(side_counts)},
    }
    for r in sorted(by_path.values(), key=lambda r: r["path"]):
        part = report["partitions"].setdefault(r["partition"], {"files": 0, "rows": 0, "bytes": 0})
        part["files"] += 1
        part["rows"] += int(r["rows"])
        part["bytes"] += int(r["bytes"])
    if lake.fs.get_file_info(run_dir).type == pafs.FileType.Directory:
        heartbeat(lake, run_id)  # keep the run live while this step verifies and publishes it
    with _lock(lake, lock, f"beam WriteLake {run_id}"):
        marker = posixpath.join(run_dir, COMMIT_MARKER)
        if _exists(lake, marker):  # an earlier attempt of this step committed: roll forward
            publish(lake, run_dir)
            lake.fs.delete_dir(run_dir)
            return report
        if lake.fs.get_file_info(run_dir).type != pafs.FileType.Directory:
            if all(_exists(lake, f) for f in finals.values()):
                return report  # published by an earlier attempt of this step (or nothing to write)
            raise LakeError(f"the staging directory of run {run_id} is gone and its files are not in the lake; nothing was committed")
        staged = {_rel(run_dir, path): path for path, _ in staged_files(lake, run_dir)}
        missing = sorted(set(by_path) - set(staged))
        problems = [f"staged file {rel} of run {run_id} is missing" for rel in missing]
        rows_staged = 0
        for rel, record in sorted(by_path.items()):
            if rel in missing:
                continue
            footer, rows = _file_facts(lake, staged[rel])
            if footer is None or footer.rows != rows or rows != int(record["rows"]):
                problems.append(f"staged file {rel} holds {rows:,} rows, its record says {int(record['rows']):,}")
            elif footer.dataset != dataset or footer.partition != record["partition"]:
                problems.append(f"staged file {rel} names dataset {footer.dataset!r}, partition {footer.partition!r}")
            rows_staged += rows
        if not problems and rows_staged != rows_in:
            problems.append(f"{rows_in:,} rows reached WriteLake but {rows_staged:,} were staged")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise AccountingError(f"not every row of run {run_id} is accounted for: {problems[0]}{more}; nothing was committed")
        orphans = sorted(set(staged) - set(by_path))  # files of bundle attempts the runner discarded
        for rel in orphans:
            lake.fs.delete_file(staged[rel])
        report["discarded_files"] = len(orphans)
        crashpoint("writelake:before-commit")
        commit_run_marker(lake, run_dir, run_id, sorted(by_path))  # exactly the verified files, nothing that turns up later
        publish(lake, run_dir)
        crashpoint("writelake:before-cleanup")
        lake.fs.delete_dir(run_dir)
    return report


def _side_count(n: int, kind: str) -> tuple[str, int]:
    return kind, n


def _check_bounded_global(pcoll: beam.PCollection) -> None:
    """`InputError` for windowed or unbounded input: WriteLake commits once, after all of a bounded input."""
    from apache_beam.transforms.window import GlobalWindows

    windowfn = getattr(getattr(pcoll, "windowing", None), "windowfn", None)
    if not getattr(pcoll, "is_bounded", True) or (windowfn is not None and not isinstance(windowfn, GlobalWindows)):
        raise InputError(
            "WriteLake writes a bounded PCollection in the global window (it commits once, after every file is "
            "written); for a stream, window it into bounded runs yourself or use `keyturn ingest`"
        )


def _run_id_used(lake: Lake, run_id: str) -> bool:
    """Whether `run_id` already names a staged run or a side-output file of the lake."""
    paths = [lake.keyturn_path(STAGING, run_id)] + [lake.side_output_path(k, run_id) for k in ("audit", "mismatch", "quarantine")]
    return any(lake.fs.get_file_info(p).type != pafs.FileType.NotFound for p in paths)


class WriteLake(beam.PTransform):
    """Write encrypted batches as a keyturn lake, committed atomically once the pipeline wrote them all.

    `keys` is the key source EncryptBatches took (or a `keyturn.home.KeyHome`,
    whose dataset is then the default); `dataset` names the dataset. See
    the module docstring for the steps, the lock and the output report.
    """

    def __init__(
        self,
        lake_uri: str | Lake,
        *,
        dataset: str | None = None,
        keys: Any,
        run_id: str | None = None,
        lock: bool | None = None,
    ) -> None:
        super().__init__()
        if hasattr(keys, "key_source"):  # a KeyHome: its key source and dataset
            dataset = dataset or keys.dataset
            keys = keys.key_source()
        if not dataset:
            raise ValueError("WriteLake needs the dataset name")
        self.lake_uri = lake_uri
        self.dataset = dataset
        self.keys = keys
        self.run_id = None if run_id is None else check_run_id(run_id)
        self.lock = lock

    def expand(self, pvalueish: Any) -> beam.PCollection:
        outputs = pvalueish if isinstance(pvalueish, KeyturnOutputs) else None
        main = main_of(pvalueish)
        check_runner(main.pipeline, "WriteLake")
        _check_bounded_global(main)
        lake = as_lake(self.lake_uri)
        run_id = self.run_id or new_run_id(prefix="beam")
        if self.run_id is not None and _run_id_used(lake, run_id):
            raise InputError(f"run id {run_id!r} was used before in the lake {lake.uri}: give each WriteLake run its own")
        keyed = main | "Key" >> KeyBatches(what="WriteLake")
        records = keyed | "Stage" >> beam.ParDo(_StageFiles(lake, run_id, self.dataset, self.keys)).with_output_types(Dict[str, Any])
        rows_in = keyed | "RowsIn" >> beam.Map(_rows) | "SumRows" >> beam.CombineGlobally(sum)
        sides = []
        if outputs is not None:
            for kind, pcoll in (("audit", outputs.audit), ("mismatch", outputs.version_mismatch), ("quarantine", outputs.quarantine)):
                sides.append(
                    pcoll
                    | f"Side-{kind}" >> WriteSideOutput(lake, kind, run_id)
                    | f"Count-{kind}" >> beam.Map(_side_count, kind)
                )
        side_counts = (sides | "Sides" >> beam.Flatten()) if sides else (main.pipeline | "NoSides" >> beam.Create([]))
        return (
            records
            | "Gather" >> beam.combiners.ToList()
            | "Commit"
            >> beam.Map(
                commit_run, AsSingleton(rows_in), AsList(side_counts),
                lake=lake, run_id=run_id, dataset=self.dataset, lock=self.lock,
            ).with_output_types(Dict[str, Any])
        )


# ------------------------------------------------------------------ ReadLake


class _ReadFn(ReadLakeFiles):
    """ReadLakeFiles, each whole-file batch with its key columns (nulls where absent); optionally as tables."""

    def __init__(self, lake: Lake, dataset: str, *, batch_rows: int, tables: bool) -> None:
        super().__init__(lake, dataset, batch_rows=batch_rows)
        self.tables = tables

    def process(self, element: tuple[str, str]) -> Iterator[Any]:
        for out in super().process(element):
            if isinstance(out, TaggedOutput):
                yield out
            else:
                partition, batch = out
                batch = add_key_columns(batch)
                yield pa.Table.from_batches([batch]) if self.tables else (partition, batch)


def _dataset_of(lake: Lake, files: Sequence[Any]) -> str:
    """The dataset the lake's first readable footer names ("unknown" if none does)."""
    for f in files:
        try:
            footer = read_footer(lake.fs, f.path)
        except (OSError, pa.ArrowException, ValueError):
            continue
        if footer is not None:
            return footer.dataset
    return "unknown"


class LakeReadOutputs(NamedTuple):
    """`ReadLake`'s outputs: `main` (keyed batches or tables) and `quarantine` (QuarantineRecord dicts)."""

    main: beam.PCollection
    quarantine: beam.PCollection


class ReadLake(beam.PTransform):
    """Read a keyturn lake: `main` (keyed batches, or tables) and `quarantine` (unreadable files).

    Returns `LakeReadOutputs`; the keyturn transforms take it whole
    (``p | ReadLake(...) | DecryptBatches(...)`` reads its `main`), any
    other transform takes ``.main``. `dataset` (for quarantine records)
    defaults to the one the lake's footers name. See the module docstring.
    """

    def __init__(
        self,
        lake_uri: str | Lake,
        *,
        dataset: str | None = None,
        partitions: Sequence[str] | None = None,
        batch_rows: int = 65_536,
        output: str = "keyed",
    ) -> None:
        super().__init__()
        if output not in ("keyed", "tables"):
            raise ValueError(f"output must be keyed or tables, not {output!r}")
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        self.lake_uri = lake_uri
        self.dataset = dataset
        self.partitions = None if partitions is None else list(partitions)
        self.batch_rows = batch_rows
        self.output = output

    def expand(self, pbegin: beam.pvalue.PBegin) -> Any:
        check_runner(pbegin.pipeline, "ReadLake")
        lake = as_lake(self.lake_uri)
        lake.require()
        files = lake.data_files()
        if self.partitions is not None:
            missing = sorted(set(self.partitions) - {f.partition for f in files})
            if missing:
                raise InputError(f"no data files in partition(s) {', '.join(missing)} of the lake {lake.uri}")
            files = [f for f in files if f.partition in set(self.partitions)]
        tables = self.output == "tables"
        if tables and any(f.partition for f in files):
            raise InputError(
                f"the lake {lake.uri} is partitioned, and bare tables would lose the partition every cell is bound to; "
                'read keyed batches (output="keyed") and use DecryptBatches(output="tables") to get tables back'
            )
        dataset = self.dataset or _dataset_of(lake, files)
        main_type = pa.Table if tables else Keyed
        read = (
            pbegin
            | "Files" >> beam.Create([(f.partition, f.path) for f in files]).with_output_types(Tuple[str, str])
            | "Spread" >> beam.Reshuffle()
            | "Read"
            >> beam.ParDo(_ReadFn(lake, dataset, batch_rows=self.batch_rows, tables=tables))
            .with_output_types(main_type, quarantine=Dict[str, Any])
            .with_outputs(QUARANTINE, main="main")
        )
        return LakeReadOutputs(read.main, read[QUARANTINE])
