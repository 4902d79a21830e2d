"""Hive partition paths: the `name=value` segments keyturn writes and reads, and splitting a batch by them.

Beam-free. Values are URI-encoded; a null is `NULL_PARTITION`, and the
literal string `NULL_PARTITION` is written as `NULL_LITERAL_SEGMENT`, so the
two stay distinct directories.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import date, datetime
from typing import Any, Tuple
from urllib.parse import quote, unquote

import numpy as np
import pyarrow as pa

from keyturn.errors import InputError
from keyturn.lake.layout import KEYTURN_DIR

__all__ = [
    "NULL_PARTITION",
    "NULL_LITERAL_SEGMENT",
    "hive_path",
    "hive_segments",
    "check_partition_names",
    "check_partition_type",
    "split_by_partition",
    "conform",
]

Keyed = Tuple[str, pa.RecordBatch]


NULL_LITERAL_SEGMENT = "%5F%5FHIVE_DEFAULT_PARTITION%5F%5F"
"""The path value of the literal string `NULL_PARTITION` (not a null): its underscores percent-encoded."""


def _hive_value(value: Any) -> str:
    if value is None:
        return NULL_PARTITION
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _hive_segment_value(value: Any) -> str:
    """A partition value as it appears in the path: URI-encoded; null as `NULL_PARTITION`.

    The literal string `NULL_PARTITION` is written as `NULL_LITERAL_SEGMENT`
    (``quote`` never encodes "_", so no other value is written that way):
    two distinct directories, which DuckDB, Spark and `hive_segments` read
    back as a null and as the string. pyarrow.dataset reads both as null (it
    decodes before its null check, and its own writer puts both in one
    directory).
    """
    if value is None:
        return NULL_PARTITION
    text = _hive_value(value)
    if text == NULL_PARTITION:
        return NULL_LITERAL_SEGMENT
    return quote(text, safe="")


def hive_path(pairs: Sequence[tuple[str, Any]]) -> str:
    """`[("region", 3), ("day", "2024-01-01")]` -> `"region=3/day=2024-01-01"` (values URI-encoded)."""
    return "/".join(f"{quote(k, safe='')}={_hive_segment_value(v)}" for k, v in pairs)


def check_partition_names(names: Sequence[str]) -> None:
    """`InputError` for a partition column name a hive directory cannot carry.

    A name starting with "_" or "." makes a hidden directory (pyarrow,
    Spark, keyturn's own listings skip it: the rows would vanish), and
    ``_keyturn`` is keyturn's own directory; "/", "\\" and "=" would split
    or confuse the ``name=value`` segment; an empty name has no segment.
    """
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InputError("a partition column name is empty (--partition-by a,b)")
        if name.startswith(("_", ".")):
            what = "keyturn's own directory" if name == KEYTURN_DIR else "a hidden directory that readers skip"
            raise InputError(
                f"partition column {name!r} cannot be a hive partition: a name starting with '_' or '.' makes "
                f"{what}, so its rows would be invisible; rename the column first"
            )
        bad = [c for c in ("/", "\\", "=") if c in name] or [c for c in name if not c.isprintable()]
        if bad:
            raise InputError(f"partition column {name!r} cannot be a hive partition: it contains {bad[0]!r}")
        if name in seen:
            raise InputError(f"partition column {name!r} is named twice in --partition-by")
        seen.add(name)


def check_partition_type(name: str, kind: pa.DataType) -> None:
    """`InputError` for a partition column whose values a hive path cannot carry and give back as they were.

    Nested and null types have no path form; binary values would be written
    as hex text and read back as that text, a different value.
    """
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_nested(kind) or pa.types.is_null(kind):
        raise InputError(f"partition column {name!r} has type {kind}, which a hive path cannot hold")
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_fixed_size_binary(kind):
        raise InputError(
            f"partition column {name!r} has type {kind}: a hive path holds text, so its bytes would come back as "
            "their hex spelling; cast it to a string first"
        )


def split_by_partition(
    batch: pa.RecordBatch, base: str, split_columns: Sequence[str], drop: Sequence[str], schema: pa.Schema
) -> Iterator[Keyed]:
    """`(partition, batch)` pieces of `batch`: `base` plus one segment per `split_columns` value.

    Columns in `drop` (partition columns) leave the data; each piece is
    conformed to `schema` (column order and types; absent columns as nulls).
    """
    if not split_columns:
        yield base, conform(batch, schema, drop)
        return
    for c in split_columns:
        if c in batch.schema.names:
            check_partition_type(c, batch.schema.field(c).type)
    keys = pa.Table.from_batches([batch]).select(list(split_columns))
    keys = keys.append_column(_ROW, pa.array(np.arange(batch.num_rows, dtype=np.int64)))
    groups = keys.group_by(list(split_columns), use_threads=False).aggregate([(_ROW, "list")])
    rows_of = groups.column(f"{_ROW}_list").combine_chunks()  # row numbers stay Arrow arrays, never Python lists
    for i, group in enumerate(groups.select(list(split_columns)).to_pylist()):
        segment = hive_path([(c, group[c]) for c in split_columns])
        partition = f"{base}/{segment}" if base else segment
        rows = rows_of[i].values
        yield partition, conform(batch if len(rows) == batch.num_rows else batch.take(rows), schema, drop)


_ROW = "__keyturn_row"


def conform(batch: pa.RecordBatch, schema: pa.Schema, drop: Sequence[str]) -> pa.RecordBatch:
    """`batch` with the columns of `schema`, in its order and types, without schema metadata."""
    names = batch.schema.names
    arrays = []
    for f in schema:
        if f.name in drop:
            continue
        if f.name in names:
            arr = batch.column(f.name)
            arrays.append(arr if arr.type == f.type else arr.cast(f.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, f.type))
    fields = [f for f in schema if f.name not in drop]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"
"""The hive path value of a null partition value (what Hive, Spark, pyarrow and DuckDB write and read)."""


def hive_segments(partition: str) -> list[tuple[str, str | None]]:
    """`"a=1/b=x%2Fy"` -> `[("a", "1"), ("b", "x/y")]`; segments without "=" are ignored.

    A raw value of `NULL_PARTITION` is None (a null); the value written for
    the literal string (``%5F%5FHIVE_DEFAULT_PARTITION%5F%5F``, see
    `keyturn.pipelines.encrypt.hive_path`) decodes to that string. This is how
    DuckDB and Spark read hive paths (the null check comes before decoding);
    pyarrow.dataset decodes first, so it reads both as null.
    """
    out: list[tuple[str, str | None]] = []
    for segment in partition.split("/") if partition else []:
        if "=" in segment:
            key, value = segment.split("=", 1)
            out.append((unquote(key), None if value == NULL_PARTITION else unquote(value)))
    return out
