"""The plan of an encrypt run: the source files listed and checked (schemas, columns, partitions, bindings) before anything is written.

Beam-free; shared by `keyturn encrypt`, `keyturn ingest` and the Beam `WriteLake` path.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from keyturn.arrow_codec import DEK_COLUMN, VERSION_COLUMN
from keyturn.errors import InputError
from keyturn.lake.hive import check_partition_names, check_partition_type, hive_segments
from keyturn.sources import SourceFile, file_schema_and_rows, list_source_files

__all__ = ["EncryptPlan", "plan", "plan_files", "check_bind"]


class EncryptPlan:
    """What a run will do, checked before anything is written.

    `source_rows` maps each file's path to its row count from the Parquet
    footer (None for Avro: counted as it is read).
    """

    def __init__(
        self,
        files: list[SourceFile],
        data_schema: pa.Schema,
        hive_keys: list[str],
        split_columns: list[str],
        source_rows: dict[str, int | None] | None = None,
    ) -> None:
        self.files = files
        self.data_schema = data_schema
        self.hive_keys = hive_keys
        self.split_columns = split_columns
        self.source_rows = dict(source_rows or {})

    @property
    def drop(self) -> list[str]:
        return self.hive_keys + self.split_columns


def plan(source: str, columns: Sequence[str], partition_by: Sequence[str], bind: Sequence[str] = ()) -> EncryptPlan:
    """List and check the source; `InputError` (one clear line) for any problem."""
    return plan_files(list_source_files(source), columns, partition_by, bind)


def plan_files(
    files: list[SourceFile], columns: Sequence[str], partition_by: Sequence[str], bind: Sequence[str] = ()
) -> EncryptPlan:
    """Check listed source files (schemas only); `InputError` (one clear line) for any problem."""
    if isinstance(columns, str) or not columns:
        raise InputError("name at least one column to encrypt (--columns a,b)")
    columns = list(columns)
    if len(set(columns)) != len(columns):
        raise InputError(f"a column is named twice in --columns: {', '.join(columns)}")
    partition_by = list(partition_by)
    hive_keys = [k for k, _ in hive_segments(files[0].partition)]
    split_columns = [c for c in partition_by if c not in hive_keys]
    check_partition_names(split_columns)  # before any file is opened: a bad name is refused at once
    read = [(f, *file_schema_and_rows(f)) for f in files]
    schemas = [(f, schema) for f, schema, _ in read]
    for f, schema in schemas:
        names = schema.names
        for reserved in (VERSION_COLUMN, DEK_COLUMN):
            if reserved in names:
                raise InputError(f"source file {f.path!r} is already encrypted by keyturn (it has column {reserved!r})")
        for column in columns:
            if column not in names:
                where = "a partition column of the source" if column in hive_keys else f"not in source file {f.path!r}"
                raise InputError(f"column {column!r} does not exist: {where} (columns: {', '.join(names)})")
        for column in split_columns:
            if column not in names:
                raise InputError(f"partition column {column!r} is not in source file {f.path!r} (columns: {', '.join(names)})")
            kind = schema.field(column).type
            check_partition_type(column, kind)
    for column in columns:
        if column in partition_by or column in hive_keys:
            raise InputError(f"column {column!r} is a partition column; partition values are stored in clear in the path")
    check_bind(bind, columns, hive_keys + split_columns, schemas)
    try:
        data_schema = pa.unify_schemas([s.remove_metadata() for _, s in schemas])
    except (pa.ArrowException, ValueError) as exc:
        raise InputError(f"the source files' schemas disagree: {' '.join(str(exc).split())[:300]}") from None
    everywhere = set.intersection(*(set(s.names) for _, s in schemas))
    data_schema = pa.schema(
        [f if f.name in everywhere else f.with_nullable(True) for f in data_schema if f.name not in hive_keys]
    )
    if not [f for f in data_schema if f.name not in split_columns]:
        raise InputError("nothing would be left in the data files once the partition columns are removed")
    return EncryptPlan(files, data_schema, hive_keys, split_columns, {f.path: rows for f, _, rows in read})


def check_bind(
    bind: Sequence[str], columns: Sequence[str], partition_columns: Sequence[str], schemas: Sequence[tuple[SourceFile, pa.Schema]]
) -> None:
    """`InputError` unless every row-key column to bind is a clear data column of every source file."""
    bind = list(bind)
    if len(set(bind)) != len(bind):
        raise InputError(f"a column is named twice in --bind: {', '.join(bind)}")
    for name in bind:
        if name in columns:
            raise InputError(f"--bind column {name!r} is also encrypted; bind non-sensitive row-key columns")
        if name in partition_columns:
            raise InputError(f"--bind column {name!r} is a partition column; it is not in the data files to bind")
        for f, schema in schemas:
            if name not in schema.names:
                raise InputError(f"--bind column {name!r} is not in source file {f.path!r} (columns: {', '.join(schema.names)})")
