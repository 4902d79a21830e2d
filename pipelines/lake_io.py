"""Beam I/O for the lake: read lake files as `(partition, RecordBatch)`, write batches as new lake files.

- `ReadLakeFiles`: elements `(partition, path)` -> `(partition, batch)`,
  batches of at most `batch_rows` rows, read with `ParquetFile.iter_batches`.
  A file that cannot be read as Parquet goes to the `quarantine` output as a
  `QuarantineRecord` (reason `unparseable`, its raw bytes up to
  `MAX_QUARANTINE_BYTES`); the file itself is left where it is.
- `WriteLakeFiles`: `(partition, batch)` -> one Parquet file per element
  under `<root>/<partition>/`, written atomically (temp file in the same
  directory, fsync, rename) with the "keyturn" footer (`footer_for`), so an
  inventory reads only footers (`keyturn.lake.write_parquet_atomically`).
  Emits a small dict per written file.
- `WriteSideOutput`: gathers a side output (audit events, version-mismatch
  events, quarantine records) and writes one Avro container file
  `<lake>/_keyturn/<kind>/<run-id>.avro` with the shipped schema
  (`keyturn.lake.sideoutputs`); nothing is written when the output is empty.

Each takes the lake as a `keyturn.lake.Lake` (or a local path): a `Lake`
pickles with its filesystem settings, so workers reach an ``s3://`` lake at
the same endpoint as the driver.

`pipeline_options(beam_args)` builds the `PipelineOptions` every lake
pipeline uses. With no `--runner`, or with ``--runner=DirectRunner``, the
pipeline runs on `DirectBatchRunner`: the FnApiRunner, which is the engine
Beam's DirectRunner picks for a batch pipeline, taken directly, with every
pipeline option (``--direct_num_workers``, ``--direct_running_mode`` and the
rest) handed to it and its SDK workers. Beam 2.77's DirectRunner itself
would first try to download and start the Prism runner from GitHub, and a
pipeline holding ``GroupIntoBatches`` (encrypt, through `PartitionBatches`:
its processing-time buffering timer exists even without a buffering
duration) it sends to the BundleBasedDirectRunner instead, which fails an
assertion in its GroupByKey when a combine (the audit side output's
``ToList``) follows the stateful step. Any other ``--runner`` (PortableRunner,
DataflowRunner, FlinkRunner, ...) is passed to Beam as given.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Dict, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.runner import PipelineRunner

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder)
from keyturn.arrow_codec import VERSION_COLUMN, encrypted_columns
from keyturn.audit.events import build_quarantine
from keyturn.lake import Lake, as_lake, crashpoint
from keyturn.lake import footer_for as lake_footer_for
from keyturn.lake import write_parquet_atomically as lake_write_parquet
from keyturn.lake.footer import FOOTER_FORMAT, FOOTER_KEY, dek_counts
from keyturn.lake.sideoutputs import read_side_outputs, write_side_output
from keyturn.home import lake_of
from keyturn.transforms.tags import QUARANTINE

__all__ = [
    "lake_of",
    "FOOTER_KEY",
    "FOOTER_FORMAT",
    "MAX_QUARANTINE_BYTES",
    "DEFAULT_RUNNER",
    "DirectBatchRunner",
    "pipeline_options",
    "new_run_id",
    "footer_for",
    "strip_footer",
    "read_footer",
    "write_parquet_atomically",
    "side_output_records",
    "ReadLakeFiles",
    "WriteLakeFiles",
    "WriteSideOutput",
]

MAX_QUARANTINE_BYTES = 64 << 20
DEFAULT_RUNNER = "keyturn.pipelines.lake_io.DirectBatchRunner"
SIDE_OUTPUT_SCHEMAS = {"audit": "audit_event", "mismatch": "version_mismatch", "quarantine": "quarantine_record"}

Keyed = Tuple[str, pa.RecordBatch]


class DirectBatchRunner(PipelineRunner):
    """The DirectRunner's batch engine, the FnApiRunner, without the DirectRunner's detours.

    Built the way Beam's DirectRunner builds it for a batch pipeline: the
    pipeline options are provisioned to the SDK workers (the worker
    processes of ``--direct_running_mode=multi_processing`` read them, for
    example ``--default_sdk_harness_log_level``). When the driver silenced
    Beam's loggers (the CLI without --debug), the worker processes' stderr
    goes to the null device: they log what they do and every traceback at
    start-up, before any option reaches them, and an error they hit comes
    back to the driver anyway (the CLI reports it as one line).
    """

    def run_pipeline(self, pipeline: beam.Pipeline, options: PipelineOptions) -> Any:
        from apache_beam.options.pipeline_options import DirectOptions
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle
        from apache_beam.transforms.environments import SubprocessSDKEnvironment

        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        direct = options.view_as(DirectOptions)
        if direct.direct_running_mode != "multi_processing" or not _beam_silenced():
            return fn_runner.FnApiRunner(provision_info=provision).run_pipeline(pipeline, options)
        # The FnApiRunner's own multi-processing command, its stderr to the null device. The FnApiRunner
        # replaces its environment only for the multi_* modes, so it runs with in_memory set meanwhile (its
        # workers were given the real options above); it runs the pipeline to the end before it returns.
        command = f"{shlex.quote(sys.executable)} -m apache_beam.runners.worker.sdk_worker_main 2>{os.devnull}"
        environment = SubprocessSDKEnvironment.from_command_string(command_string=command)
        runner = fn_runner.FnApiRunner(default_environment=environment, provision_info=provision)
        direct.direct_running_mode = "in_memory"
        try:
            return runner.run_pipeline(pipeline, options)
        finally:
            direct.direct_running_mode = "multi_processing"


def _beam_silenced() -> bool:
    return logging.getLogger("apache_beam").getEffectiveLevel() > logging.CRITICAL


# Names under which Beam's create_runner finds its (switching) DirectRunner.
_DIRECT_RUNNER_NAMES = frozenset({"direct", "directrunner", "switchingdirectrunner"})
_DIRECT_RUNNER_MODULE = "apache_beam.runners.direct.direct_runner"


def _runner_arg(args: Sequence[str]) -> tuple[int, int, str] | None:
    """(first index, index after, runner name) of the last ``--runner`` option in `args`, or None."""
    found = None
    for i, arg in enumerate(args):
        if arg.startswith("--runner="):
            found = (i, i + 1, arg.split("=", 1)[1])
        elif arg == "--runner" and i + 1 < len(args):
            found = (i, i + 2, args[i + 1])
    return found


def _is_direct_runner(name: str) -> bool:
    module, _, cls = name.strip().rpartition(".")
    return cls.lower() in _DIRECT_RUNNER_NAMES and module in ("", _DIRECT_RUNNER_MODULE)


def pipeline_options(beam_args: Sequence[str] | None = None) -> PipelineOptions:
    """`PipelineOptions(beam_args)`; no runner or the DirectRunner means `DirectBatchRunner` (see the module doc).

    Unless `beam_args` set ``--default_sdk_harness_log_level``, SDK worker
    processes log at the driver's level (the CLI's: ERROR, INFO with --debug).
    """
    args = list(beam_args or [])
    found = _runner_arg(args)
    streaming = any(a == "--streaming" or a.startswith("--streaming=") for a in args)
    if found is None:
        args.append(f"--runner={DEFAULT_RUNNER}")
    elif _is_direct_runner(found[2]) and not streaming:
        start, end, _ = found
        args[start:end] = [f"--runner={DEFAULT_RUNNER}"]
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        if isinstance(level, str) and level in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            args.append(f"--default_sdk_harness_log_level={level}")
    return PipelineOptions(args)


def new_run_id(clock: Callable[[], datetime] | None = None) -> str:
    """A sortable, unique run id: ``20250131T120000Z-1a2b3c4d``."""
    now = (clock or (lambda: datetime.now(timezone.utc)))()
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ footers


def footer_for(batch: pa.RecordBatch | pa.Table, dataset: str, partition: str) -> dict[str, Any]:
    """The "keyturn" footer of a lake file holding `batch`: rows per key version, encrypted columns."""
    versions: dict[str, int] = {}
    if VERSION_COLUMN in batch.schema.names:
        for item in batch.column(VERSION_COLUMN).value_counts().to_pylist():
            if item["values"] is not None:  # rows without a version are rows - sum(versions)
                versions[str(item["values"])] = item["counts"]
    return {
        "format": FOOTER_FORMAT,
        "dataset": dataset,
        "partition": partition,
        "rows": batch.num_rows,
        "versions": dict(sorted(versions.items(), key=lambda kv: int(kv[0]))),
        "encrypted_columns": encrypted_columns(batch.schema),
        "deks": {d.hex(): n for d, n in sorted(dek_counts(batch).items())},
    }


def strip_footer(schema: pa.Schema) -> pa.Schema:
    """`schema` without the "keyturn" footer key (which describes one file, not the data)."""
    meta = dict(schema.metadata or {})
    if FOOTER_KEY not in meta:
        return schema
    meta.pop(FOOTER_KEY)
    return schema.with_metadata(meta) if meta else schema.remove_metadata()


def read_footer(fs: pafs.FileSystem, path: str) -> dict[str, Any] | None:
    """A file's "keyturn" footer (None if it has none); reads the Parquet footer only."""
    with fs.open_input_file(path) as f:
        meta = pq.ParquetFile(f).metadata.metadata or {}
    raw = meta.get(FOOTER_KEY)
    return None if raw is None else json.loads(raw)


# ------------------------------------------------------------------ writes (through keyturn.lake)


def write_parquet_atomically(lake: Lake, path: str, table: pa.Table | pa.RecordBatch, footer: Mapping[str, Any] | None) -> None:
    """Write `table` to `path` with `keyturn.lake.write_parquet_atomically`; `footer` is a `footer_for` dict."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    parsed = None
    if footer is not None:
        versions = {int(v): n for v, n in footer["versions"].items()}
        deks = None if footer.get("deks") is None else {bytes.fromhex(d): n for d, n in footer["deks"].items()}
        parsed = lake_footer_for(
            footer["dataset"], footer["partition"], versions, footer["rows"], footer["encrypted_columns"], deks
        )
    lake_write_parquet(lake, path, table, parsed)


def side_output_records(lake: Lake, kind: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """Records of `<lake>/_keyturn/<kind>/` Avro files (of one run, or all), for reports and tests."""
    return read_side_outputs(lake, kind, run_id=run_id)


# ------------------------------------------------------------------ DoFns


class ReadLakeFiles(beam.DoFn):
    """`(partition, path)` -> `(partition, RecordBatch)`; unreadable files -> `quarantine`."""

    def __init__(self, lake_uri: str | Lake, dataset: str, *, batch_rows: int = 65_536, columns: Sequence[str] | None = None) -> None:
        self.lake_uri = lake_uri  # a Lake pickles its filesystem settings (S3 endpoint) to the workers
        self.dataset = dataset
        self.batch_rows = batch_rows
        self.columns = None if columns is None else list(columns)
        self._lake: Lake | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lake": None}

    def setup(self) -> None:
        self._lake = as_lake(self.lake_uri)

    def process(self, element: tuple[str, str]) -> Iterator[Any]:
        partition, path = element
        fs = self._lake.fs
        try:
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                schema = strip_footer(pf.schema_arrow)
                batches = [
                    b for b in pf.iter_batches(batch_size=self.batch_rows, columns=self.columns) if b.num_rows
                ]
        except (OSError, pa.ArrowException, ValueError) as exc:
            yield TaggedOutput(QUARANTINE, self._quarantine(partition, path, exc))
            return
        for batch in batches:
            yield partition, pa.RecordBatch.from_arrays(batch.columns, schema=schema if self.columns is None else strip_footer(batch.schema))

    def _quarantine(self, partition: str, path: str, exc: BaseException) -> dict[str, Any]:
        fs = self._lake.fs
        size = fs.get_file_info(path).size or 0
        with fs.open_input_stream(path) as f:
            payload = f.read(MAX_QUARANTINE_BYTES)
        note = "" if size <= MAX_QUARANTINE_BYTES else f"; first {MAX_QUARANTINE_BYTES} of {size} bytes kept"
        detail = f"not a readable Parquet file: {self._lake.relpath(path)} ({type(exc).__name__}){note}; file left in place"
        return build_quarantine(
            "unparseable",
            dataset=self.dataset,
            partition=partition,
            detail=detail[:1000],
            payload=payload,
            payload_format="raw",
            rows=0,
        ).to_dict()


class WriteLakeFiles(beam.DoFn):
    """`(partition, RecordBatch)` -> one Parquet file under `<root>/<partition>/`, atomically.

    `footer_dataset` set: the file gets the "keyturn" footer (an encrypted lake
    file). `name_fn(partition, batch)` chooses the file name (deterministic
    names make a re-run replace a file instead of adding a second copy);
    by default ``part-<uuid>.parquet``. Emits `{"partition", "path", "rows", "bytes"}`.
    Crashpoint (test hook): ``write:after-file``, after each file is in place.
    """

    def __init__(
        self,
        root_uri: str | Lake,
        *,
        footer_dataset: str | None,
        name_fn: Callable[[str, pa.RecordBatch], str] | None = None,
    ) -> None:
        self.root_uri = root_uri
        self.footer_dataset = footer_dataset
        self.name_fn = name_fn
        self._lake: Lake | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lake": None}

    def setup(self) -> None:
        self._lake = as_lake(self.root_uri)

    def process(self, element: Keyed) -> Iterator[Dict[str, Any]]:
        partition, batch = element
        if not batch.num_rows:
            return
        name = self.name_fn(partition, batch) if self.name_fn else f"part-{uuid.uuid4().hex}.parquet"
        path = self._lake.path(partition, name)
        table = pa.Table.from_batches([batch]).replace_schema_metadata(strip_footer(batch.schema).metadata)
        footer = None if self.footer_dataset is None else footer_for(batch, self.footer_dataset, partition)
        write_parquet_atomically(self._lake, path, table, footer)
        crashpoint("write:after-file")
        size = self._lake.fs.get_file_info(path).size or 0
        yield {"partition": partition, "path": path, "rows": batch.num_rows, "bytes": size}


class WriteSideOutput(beam.PTransform):
    """Write one side output (kind audit, mismatch or quarantine) to `<lake>/_keyturn/<kind>/<run-id>.avro`.

    Elements are the dicts the transforms emit; version-mismatch elements
    `(event, rows)` are written as their event. Outputs the record count.
    """

    def __init__(self, lake_uri: str | Lake, kind: str, run_id: str) -> None:
        super().__init__()
        if kind not in SIDE_OUTPUT_SCHEMAS:
            raise ValueError(f"kind must be one of {sorted(SIDE_OUTPUT_SCHEMAS)}, not {kind!r}")
        self.lake_uri = lake_uri
        self.kind = kind
        self.run_id = run_id

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        lake_uri, kind, run_id = self.lake_uri, self.kind, self.run_id
        records = pcoll | "Event" >> beam.Map(_event_of).with_output_types(Dict[str, Any])
        return (
            records
            | "Gather" >> beam.combiners.ToList()
            | "Write" >> beam.Map(_write_side_output, lake_uri, kind, run_id)
        )


def _event_of(element: Any) -> dict[str, Any]:
    return element[0] if isinstance(element, tuple) else element


def _write_side_output(records: list[dict[str, Any]], lake_uri: str | Lake, kind: str, run_id: str) -> int:
    records = sorted(records, key=lambda r: json.dumps({k: v for k, v in r.items() if k != "payload"}, sort_keys=True, default=str))
    write_side_output(as_lake(lake_uri), kind, run_id, records)
    return len(records)
