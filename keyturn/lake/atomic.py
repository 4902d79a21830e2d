"""Atomic Parquet writes: a temp file in the same directory, fsync, rename, fsync the directory.

A writer never touches the final path until the file is complete: it
writes ``.keyturn-tmp-<uuid>-<name>.tmp`` next to it (a hidden name, so
pyarrow and Spark never see it as data, and not ending in ``.parquet``, so
DuckDB's ``*.parquet`` globs do not match it either), flushes and fsyncs
it, and then renames it over the final path. On a local filesystem the
rename is atomic, so a crash leaves either the old file or the new one,
never a mix; the directory is
fsynced so the rename survives a power cut. Leftover temp files of crashed
writers are removed by `Lake.remove_temp_files` (under the lake lock).

On S3 there is no rename: Arrow's move is a server-side CopyObject of the
finished (and, in a rewrite, verified) temp object onto the final key,
then a DeleteObject of the temp. A PUT or copy of a whole object is atomic
per key, so readers of the final key see the old object or the new one,
never a partial one, and the key is never absent. A crash leaves at most a
hidden temp object (removed by the next run under the lock) or, mid-upload,
an incomplete multipart upload (needs a bucket lifecycle rule); see
docs/AWS.md, "Atomic replacement on S3".

The ``keyturn`` footer (`keyturn.lake.footer`) is added to the file's
key-value metadata when the file is finished, so a writer that streams row
groups can count versions as it goes.

Ciphertext columns (binary fields with ``keyturn.format`` metadata) are
written with Parquet's ``DELTA_BYTE_ARRAY`` encoding and no dictionary:
neighbouring cells share their version byte and dek_id, which that
encoding stores once per run of cells (random nonces and tags do not
compress, and a dictionary of unique cells only costs), and without
column statistics (the min and max of ciphertext prune nothing and cost
about a fifth of the write). Every other column keeps pyarrow's defaults
(dictionary encoding, statistics). Any Parquet reader reads
the encoding (pyarrow, DuckDB, Spark); callers that pass ``use_dictionary``
or ``column_encoding`` themselves get exactly what they ask for.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from functools import lru_cache
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from keyturn.arrow_codec import META_FORMAT
from keyturn.fsutil import fsync_dir as local_fsync_dir, write_file_atomically
from keyturn.lake.footer import FOOTER_KEY, Footer, strip_footer
from keyturn.lake.layout import Lake, temp_name_for

__all__ = [
    "AtomicParquetWriter",
    "write_parquet_atomically",
    "write_bytes_atomically",
    "write_json_atomically",
    "fsync_dir",
    "ciphertext_columns",
    "encoding_options",
]

CIPHERTEXT_ENCODING = "DELTA_BYTE_ARRAY"


def ciphertext_columns(schema: pa.Schema) -> list[str]:
    """Top-level binary columns holding keyturn cells (any ``keyturn.format``), in schema order."""
    return [
        f.name
        for f in schema
        if f.metadata and META_FORMAT in f.metadata and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type))
    ]


@lru_cache(maxsize=64)
def _leaf_paths(schema: pa.Schema) -> tuple[str, ...]:
    """The Parquet leaf column paths of `schema` (``a.list.element`` for a list column, and so on)."""
    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink)
    parquet_schema = pq.ParquetFile(io.BytesIO(sink.getvalue())).schema
    return tuple(parquet_schema.column(i).path for i in range(len(parquet_schema)))


def encoding_options(schema: pa.Schema) -> dict[str, Any]:
    """Writer options for `schema`: ciphertext columns `CIPHERTEXT_ENCODING` without a dictionary or statistics, the rest as pyarrow's default.

    Parquet's writer options name columns by their dotted leaf path, so a
    ciphertext column whose name is also another column's path (``a.b``
    beside a struct ``a`` with a field ``b``) keeps pyarrow's defaults:
    options given by that name would reach the other column too.
    """
    paths = _leaf_paths(schema)
    cipher = [name for name in ciphertext_columns(schema) if paths.count(name) == 1]
    if not cipher:
        return {}
    clear = [path for path in paths if path not in cipher]
    return {
        "use_dictionary": clear or False,
        "column_encoding": {name: CIPHERTEXT_ENCODING for name in cipher},
        "write_statistics": clear or False,
    }


def fsync_dir(lake: Lake, directory: str) -> None:
    """fsync a directory of a local lake (no-op elsewhere), so a rename in it is durable."""
    if lake.is_local:
        local_fsync_dir(directory)


class AtomicParquetWriter:
    """Writes one Parquet file to a temp path; `commit` renames it over `path`.

    Use as a context manager: leaving the block without `commit` (an error)
    removes the temp file. `write` appends tables (each becomes one or more
    row groups); `finish(footer)` adds the footer and makes the temp file
    durable; `commit()` renames it into place.
    """

    def __init__(self, lake: Lake, path: str, schema: pa.Schema, **writer_options: Any) -> None:
        self.lake = lake
        self.path = path
        self.directory = posixpath.dirname(path)
        self.temp_path = posixpath.join(self.directory, temp_name_for(posixpath.basename(path)))
        self.schema = strip_footer(schema)
        lake.fs.create_dir(self.directory, recursive=True)
        self._file: BinaryIO | None = None
        self._stream: Any = None
        if lake.is_local:
            self._file = open(self.temp_path, "xb")  # noqa: SIM115 - closed in finish/abort
            sink: Any = self._file
        else:
            self._stream = sink = lake.fs.open_output_stream(self.temp_path)
        options: dict[str, Any] = {"compression": "snappy", "write_statistics": True}
        if "use_dictionary" not in writer_options and "column_encoding" not in writer_options:
            options.update(encoding_options(self.schema))
        options.update(writer_options)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(sink, self.schema, **options)
        self.rows = 0
        self.finished = False
        self.committed = False

    def write(self, table: pa.Table | pa.RecordBatch, *, row_group_size: int | None = None) -> None:
        if self._writer is None:
            raise RuntimeError("the writer is finished")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        table = table.replace_schema_metadata(self.schema.metadata)
        self._writer.write_table(table, row_group_size=row_group_size or max(1, table.num_rows))
        self.rows += table.num_rows

    def flush(self) -> None:
        """Push what is written so far to the OS (for tests that crash mid-write)."""
        if self._file is not None:
            self._file.flush()

    def finish(self, footer: Footer | None) -> str:
        """Add `footer`, close the file and fsync it; returns the temp path (not yet in place)."""
        if self._writer is None:
            raise RuntimeError("the writer is finished")
        if footer is not None:
            if footer.rows != self.rows:
                raise ValueError(f"footer says {footer.rows} rows, {self.rows} were written")
            self._writer.add_key_value_metadata({FOOTER_KEY: footer.to_bytes()})
        writer, self._writer = self._writer, None
        writer.close()
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self.finished = True
        return self.temp_path

    def commit(self) -> None:
        """Atomically replace `path` with the finished temp file, durably."""
        if not self.finished:
            raise RuntimeError("finish() the file before commit()")
        self.lake.fs.move(self.temp_path, self.path)
        fsync_dir(self.lake, self.directory)
        self.committed = True

    def abort(self) -> None:
        """Close and remove the temp file (idempotent; the final path is untouched)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass
            self._writer = None
        for handle in (self._file, self._stream):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001
                    pass
        self._file = self._stream = None
        if not self.committed:
            try:
                self.lake.fs.delete_file(self.temp_path)
            except (FileNotFoundError, OSError):
                pass

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self.committed:
            self.abort()


def write_parquet_atomically(
    lake: Lake, path: str, table: pa.Table | pa.RecordBatch, footer: Footer | None, *, row_group_size: int | None = None
) -> None:
    """Write `table` to `path` (temp file, fsync, atomic rename, fsync dir) with `footer`.

    `row_group_size` defaults to one row group per 128Ki rows.
    """
    with AtomicParquetWriter(lake, path, table.schema) as writer:
        rows = table.num_rows
        size = row_group_size or min(max(1, rows), 1 << 17)
        writer.write(table, row_group_size=size)
        writer.finish(footer)
        writer.commit()


def write_bytes_atomically(lake: Lake, path: str, data: bytes) -> None:
    """Replace the small file `path` of `lake` with `data`: a fresh temp file beside it, fsync, rename, fsync the directory.

    The lake-side small-file writer (commit markers, the source ledger, the
    staging lists). On a local lake it is `keyturn.fsutil.write_file_atomically`
    (mode 0644), the writer of every other small local file. Two writers
    never share a temp file; a crash leaves the old file or the new one,
    never a mix (on S3: one PUT, then a copy).
    """
    directory = posixpath.dirname(path)
    lake.fs.create_dir(directory, recursive=True)
    if lake.is_local:
        write_file_atomically(path, data)
        return
    tmp = posixpath.join(directory, temp_name_for(posixpath.basename(path)))
    try:
        with lake.fs.open_output_stream(tmp) as out:
            out.write(data)
        lake.fs.move(tmp, path)
    except BaseException:
        try:
            lake.fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_json_atomically(lake: Lake, path: str, payload: Any) -> None:
    """`write_bytes_atomically` of `payload` as JSON with sorted keys."""
    write_bytes_atomically(lake, path, json.dumps(payload, sort_keys=True).encode())
