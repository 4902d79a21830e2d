"""Plain input for the lake pipelines: Parquet or Avro, one file or a directory, read in bounded batches.

A *source* is a path (local, or a URI that `pyarrow.fs` understands): one
`.parquet` / `.avro` file, or a directory searched recursively for them.
Names starting with "." or "_" are skipped (hidden files, `_SUCCESS`,
`_keyturn/`), as `pyarrow.dataset` does. A directory laid out hive style
(`region=3/part-0.parquet`) keeps its partitions: each file's `partition`
is the hive path of its directory, relative to the source root, and those
partition columns are not in the file's data.

Avro input is converted to Arrow record batches with a schema mapping
(`avro_to_arrow_type`): primitives to their Arrow types, enum and uuid to
string, fixed to fixed_size_binary, the date/time/timestamp/decimal logical
types to the matching Arrow types (timestamps in UTC), arrays to lists, maps
to map<string, ...>, records to structs, and `["null", T]` unions to a
nullable T. Other unions are refused with a clear error. The lake is always
Parquet; an Avro source is encrypted *into* Parquet through Arrow (the
Avro-record transforms in `transforms/avro.py` are for Avro-in, Avro-out
pipelines).

Batches never exceed `batch_rows` rows: Parquet is read with
`ParquetFile.iter_batches`, Avro record by record into chunks, so memory
stays bounded whatever the file size.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from keyturn.errors import InputError
from keyturn.lake.hive import NULL_PARTITION, hive_segments

__all__ = [
    "SourceFile",
    "resolve",
    "list_source_files",
    "file_schema",
    "file_schema_and_rows",
    "read_batches",
    "avro_to_arrow_type",
    "avro_to_arrow_schema",
    "hive_segments",
    "is_hidden",
    "FORMATS",
    "NULL_PARTITION",
]

FORMATS = {".parquet": "parquet", ".parq": "parquet", ".avro": "avro"}
DEFAULT_BATCH_ROWS = 65_536


@dataclass(frozen=True)
class SourceFile:
    """One input file: where it is, its format, its hive partition path ("" if none) and size."""

    path: str
    format: str
    partition: str = ""
    size: int = 0
    mtime_ns: int | None = None

    @property
    def partition_values(self) -> dict[str, str | None]:
        return dict(hive_segments(self.partition))


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """A filesystem and the path on it for `uri` (a local path, absolute or relative, or a URI)."""
    if filesystem is not None:
        return filesystem, uri
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def is_hidden(name: str) -> bool:
    """Files and directories whose name starts with "." or "_" are never data."""
    return name.startswith((".", "_"))


def _format_of(name: str) -> str | None:
    for ext, fmt in FORMATS.items():
        if name.lower().endswith(ext):
            return fmt
    return None


def list_source_files(uri: str, *, filesystem: pafs.FileSystem | None = None, allow_empty: bool = False) -> list[SourceFile]:
    """Every Parquet/Avro file at `uri`, sorted by path; `InputError` if there is none (unless `allow_empty`)."""
    fs, root = resolve(uri, filesystem)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"source {uri!r} does not exist")
    if info.type == pafs.FileType.File:
        fmt = _format_of(info.base_name)
        if fmt is None:
            raise InputError(f"source {uri!r} is neither a .parquet nor an .avro file")
        return [SourceFile(root, fmt, "", info.size or 0, info.mtime_ns)]
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if entry.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(entry.path, root) if entry.path.startswith(root) else entry.path
        parts = rel.split("/")
        if any(is_hidden(p) for p in parts):
            continue
        fmt = _format_of(parts[-1])
        if fmt is None:
            continue
        partition = "/".join(p for p in parts[:-1] if "=" in p)
        files.append(SourceFile(entry.path, fmt, partition, entry.size or 0, entry.mtime_ns))
    if not files and allow_empty:
        return []
    if not files:
        raise InputError(f"source {uri!r} holds no .parquet or .avro files")
    files.sort(key=lambda f: f.path)
    keys = {tuple(k for k, _ in hive_segments(f.partition)) for f in files}
    if len(keys) > 1:
        raise InputError(f"source {uri!r} mixes hive layouts: partition keys {sorted(keys)}")
    return files


# ------------------------------------------------------------------ Avro -> Arrow


def _avro_logical(schema: dict[str, Any]) -> pa.DataType | None:
    logical = schema.get("logicalType")
    base = schema.get("type")
    if logical == "date" and base == "int":
        return pa.date32()
    if logical == "time-millis" and base == "int":
        return pa.time32("ms")
    if logical == "time-micros" and base == "long":
        return pa.time64("us")
    if logical == "timestamp-millis" and base == "long":
        return pa.timestamp("ms", tz="UTC")
    if logical == "timestamp-micros" and base == "long":
        return pa.timestamp("us", tz="UTC")
    if logical == "local-timestamp-millis" and base == "long":
        return pa.timestamp("ms")
    if logical == "local-timestamp-micros" and base == "long":
        return pa.timestamp("us")
    if logical == "decimal" and base in ("bytes", "fixed"):
        precision = int(schema["precision"])
        scale = int(schema.get("scale", 0))
        return pa.decimal128(precision, scale) if precision <= 38 else pa.decimal256(precision, scale)
    if logical == "uuid" and base == "string":
        return pa.string()
    return None


_AVRO_PRIMITIVES = {
    "null": pa.null(),
    "boolean": pa.bool_(),
    "int": pa.int32(),
    "long": pa.int64(),
    "float": pa.float32(),
    "double": pa.float64(),
    "bytes": pa.binary(),
    "string": pa.string(),
}


def avro_to_arrow_type(schema: Any, *, where: str = "") -> tuple[pa.DataType, bool]:
    """`(arrow type, nullable)` for a (parsed or plain) Avro schema; `InputError` if unsupported."""
    if isinstance(schema, str):
        if schema in _AVRO_PRIMITIVES:
            return _AVRO_PRIMITIVES[schema], schema == "null"
        raise InputError(f"Avro field {where or '?'}: named type {schema!r} is not supported (inline it)")
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if len(branches) == 1:
            t, _ = avro_to_arrow_type(branches[0], where=where)
            return t, len(branches) < len(schema)
        raise InputError(f"Avro field {where or '?'}: unions other than [\"null\", T] are not supported")
    if not isinstance(schema, dict):
        raise InputError(f"Avro field {where or '?'}: unreadable schema")
    logical = _avro_logical(schema)
    if logical is not None:
        return logical, False
    kind = schema.get("type")
    if kind in _AVRO_PRIMITIVES or isinstance(kind, (list, dict)):
        return avro_to_arrow_type(kind, where=where)
    if kind == "enum":
        return pa.string(), False
    if kind == "fixed":
        return pa.binary(int(schema["size"])), False
    if kind == "array":
        t, nullable = avro_to_arrow_type(schema["items"], where=f"{where}[]")
        return pa.list_(pa.field("item", t, nullable=nullable)), False
    if kind == "map":
        t, nullable = avro_to_arrow_type(schema["values"], where=f"{where}{{}}")
        return pa.map_(pa.string(), pa.field("value", t, nullable=nullable)), False
    if kind == "record":
        return pa.struct(_avro_fields(schema, prefix=f"{where}.")), False
    raise InputError(f"Avro field {where or '?'}: type {kind!r} is not supported")


def _avro_fields(record: dict[str, Any], *, prefix: str = "") -> list[pa.Field]:
    fields = []
    for f in record.get("fields", []):
        t, nullable = avro_to_arrow_type(f["type"], where=f"{prefix}{f['name']}")
        fields.append(pa.field(f["name"], t, nullable=nullable))
    return fields


def avro_to_arrow_schema(record: dict[str, Any]) -> pa.Schema:
    """The Arrow schema of an Avro record schema."""
    if not isinstance(record, dict) or record.get("type") != "record":
        raise InputError("an Avro source must hold records")
    return pa.schema(_avro_fields(record))


def _avro_value(value: Any) -> Any:
    """fastavro gives uuid.UUID for uuid strings and (key, value) maps as dicts; Arrow wants str / items."""
    if isinstance(value, dict):
        return {k: _avro_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_avro_value(v) for v in value]
    if type(value).__name__ == "UUID":
        return str(value)
    return value


def _avro_batch(records: list[dict[str, Any]], schema: pa.Schema) -> pa.RecordBatch:
    arrays = []
    for f in schema:
        values = [_avro_value(r.get(f.name)) for r in records]
        if pa.types.is_map(f.type):
            values = [None if v is None else list(v.items()) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


# ------------------------------------------------------------------ reading


def file_schema(source: SourceFile, *, filesystem: pafs.FileSystem | None = None) -> pa.Schema:
    """The Arrow schema of one file's data, read from its footer (Parquet) or header (Avro) only."""
    return file_schema_and_rows(source, filesystem=filesystem)[0]


def file_schema_and_rows(source: SourceFile, *, filesystem: pafs.FileSystem | None = None) -> tuple[pa.Schema, int | None]:
    """`(schema, rows)` of one file from its footer (Parquet) or header (Avro) only.

    `rows` is the Parquet footer's row count; None for Avro, whose header
    does not say (its rows are counted as they are read).
    """
    fs, path = resolve(source.path, filesystem)
    try:
        if source.format == "parquet":
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                return pf.schema_arrow, int(pf.metadata.num_rows)
        import fastavro

        with fs.open_input_stream(path) as f:
            reader = fastavro.reader(f)
            return avro_to_arrow_schema(reader.writer_schema), None
    except InputError:
        raise
    except (OSError, ValueError, pa.ArrowException, IndexError, KeyError, TypeError, EOFError) as exc:  # damaged headers
        raise InputError(f"cannot read {source.format} file {source.path!r}: {_one_line(exc)}") from None


def read_batches(
    source: SourceFile,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    filesystem: pafs.FileSystem | None = None,
    columns: Sequence[str] | None = None,
) -> Iterator[pa.RecordBatch]:
    """The file's rows as record batches of at most `batch_rows` rows."""
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    fs, path = resolve(source.path, filesystem)
    if source.format == "parquet":
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
                if batch.num_rows:
                    yield batch
        return
    import fastavro

    try:
        with fs.open_input_stream(path) as f:
            reader = fastavro.reader(f)
            schema = avro_to_arrow_schema(reader.writer_schema)
            chunk: list[dict[str, Any]] = []
            for record in reader:
                chunk.append(record)
                if len(chunk) >= batch_rows:
                    yield _select(_avro_batch(chunk, schema), columns)
                    chunk = []
            if chunk:
                yield _select(_avro_batch(chunk, schema), columns)
    except InputError:
        raise
    except Exception as exc:  # damaged blocks: fastavro raises IndexError, EOFError, UnicodeDecodeError, zlib.error...
        raise InputError(f"cannot read avro file {source.path!r}: {_one_line(exc)}") from None


def _select(batch: pa.RecordBatch, columns: Sequence[str] | None) -> pa.RecordBatch:
    return batch if not columns else batch.select(list(columns))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
