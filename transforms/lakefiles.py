"""Beam I/O for keyturn lakes: read lake files as `(partition, RecordBatch)`, write batches as lake files and side outputs.

- `ReadLakeFiles`: elements `(partition, path)` -> `(partition, batch)`,
  batches of at most `batch_rows` rows, read with `ParquetFile.iter_batches`.
  A file that cannot be read as Parquet goes to the `quarantine` output as a
  `QuarantineRecord` (reason `unparseable`, its raw bytes up to
  `MAX_QUARANTINE_BYTES`); the file itself is left where it is.
- `WriteLakeFiles`: `(partition, batch)` -> one Parquet file per element
  under `<root>/<partition>/`, written atomically
  (`keyturn.lake.write_parquet_atomically`) with the ``keyturn`` footer
  (`keyturn.lake.footer.footer_of_batch`), so an inventory reads only footers.
  Emits a small dict per written file.
- `WriteSideOutput`: gathers a side output (audit events, version-mismatch
  events, quarantine records) and writes one Avro container file
  `<lake>/_keyturn/<kind>/<run-id>.avro` with the shipped schema
  (`keyturn.lake.sideoutputs`); nothing is written when the output is empty.

`add_key_columns` gives a whole file's batch the key columns it lacks (as
nulls), so `DecryptBatches` counts its rows `missing` instead of refusing it.
`keyturn.transforms.lake.ReadLake` and `WriteLake` are the public
PTransforms built on these.

Each takes the lake as a `keyturn.lake.Lake` (or a local path): a `Lake`
pickles with its filesystem settings, so workers reach an ``s3://`` lake at
the same endpoint as the driver.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Dict, Tuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.pvalue import TaggedOutput

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder)
from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN
from keyturn.audit.events import build_quarantine
from keyturn.crash import crashpoint
from keyturn.lake.atomic import write_parquet_atomically
from keyturn.lake.footer import footer_of_batch, strip_footer
from keyturn.lake.layout import Lake, as_lake
from keyturn.lake.sideoutputs import write_side_output
from keyturn.transforms.tags import QUARANTINE

__all__ = ["MAX_QUARANTINE_BYTES", "ReadLakeFiles", "WriteLakeFiles", "WriteSideOutput", "add_key_columns"]


MAX_QUARANTINE_BYTES = 64 << 20


SIDE_OUTPUT_SCHEMAS = {"audit": "audit_event", "mismatch": "version_mismatch", "quarantine": "quarantine_record"}


Keyed = Tuple[str, pa.RecordBatch]
_KEY_TYPES = {VERSION_COLUMN: pa.int64(), DEK_COLUMN: pa.dictionary(pa.int32(), pa.binary())}


def add_key_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """A whole lake file's batch with the key columns it lacks added as nulls.

    `ReadLakeFiles` reads every column of a file, so a key column that is not
    there is genuinely absent (a file keyturn never wrote, or one stripped of
    its key columns): its rows are `missing`. `decrypt_batch` refuses a
    batch without key columns, since it cannot tell it from a projection.
    """
    lacking = [name for name in (VERSION_COLUMN, DEK_COLUMN) if name not in batch.schema.names]
    if not lacking:
        return batch
    n = batch.num_rows
    arrays = list(batch.columns) + [pa.nulls(n, _KEY_TYPES[name]) for name in lacking]
    fields = list(batch.schema) + [pa.field(name, _KEY_TYPES[name], nullable=True) for name in lacking]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


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
        if self._lake.is_local and os.path.islink(path):  # never copy a file from outside the lake into a record
            payload, note = b"", "; a symbolic link, its target's bytes not kept"
        else:
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
        footer = None if self.footer_dataset is None else footer_of_batch(batch, self.footer_dataset, partition)
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
