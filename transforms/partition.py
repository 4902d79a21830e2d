"""`PartitionBatches`: gather a partition's small batches into large ones.

Streaming pipelines see many small batches per partition; a DEK scope is one
partition within one bundle, so small bundles mean many KMS calls.
PartitionBatches groups `(partition, RecordBatch)` elements per partition and
window with Beam's `GroupIntoBatches` (bounded by element count and by
`max_buffering_secs`, so data never waits longer than that), concatenates
each group, and re-splits it so no output batch exceeds `max_rows`.
Works with any windowing: groups never cross windows.

Keying (what the keyturn transforms do before their DoFns): `KeyBatches`
turns bare `pyarrow.Table` / `RecordBatch` elements (partition "", an
unpartitioned dataset) and keyed `(partition, RecordBatch)` elements into
keyed batches, split by `partition_by` columns into hive partitions
(`keyturn.lake.hive`); `KeyRecords` does the same for Avro records.
Element types are checked when the pipeline is built where the
PCollection has a type hint, and element by element otherwise, with an
`ElementTypeError` naming the accepted forms. `AsTables` goes back: keyed
batches to tables with the partition columns restored from the path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Dict, Tuple, Union

import apache_beam as beam
import pyarrow as pa

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder and TableCoder)
from keyturn.contract import settle_arrow_contract
from keyturn.errors import ElementTypeError, InputError
from keyturn.ipc import batch_from_ipc, batch_to_ipc
from keyturn.lake.hive import check_partition_names, hive_path, hive_segments, split_by_partition

__all__ = [
    "PartitionBatches",
    "concat_batches",
    "KeyBatches",
    "KeyRecords",
    "AsTables",
    "ContractSettle",
    "key_batch",
    "key_record",
    "as_table",
    "check_element_type",
    "main_of",
    "ARROW_FORMS",
    "RECORD_FORMS",
]

Keyed = Tuple[str, pa.RecordBatch]


def concat_batches(batches: Iterable[pa.RecordBatch], max_rows: int) -> Iterator[pa.RecordBatch]:
    """Concatenate batches of one schema and yield pieces of at most `max_rows` rows."""
    batches = [b for b in batches if b.num_rows]
    if not batches:
        return
    table = pa.Table.from_batches(batches).combine_chunks()
    yield from table.to_batches(max_chunksize=max_rows)


class PartitionBatches(beam.PTransform):
    """Group `(partition, RecordBatch)` into batches of up to `max_rows` rows per partition."""

    def __init__(self, *, max_rows: int = 100_000, max_batches: int = 1_000, max_buffering_secs: float | None = 10.0) -> None:
        super().__init__()
        if max_rows < 1 or max_batches < 1:
            raise ValueError("max_rows and max_batches must be >= 1")
        if max_buffering_secs is not None and max_buffering_secs <= 0:
            raise ValueError("max_buffering_secs must be positive (or None)")
        self.max_rows = max_rows
        self.max_batches = max_batches
        self.max_buffering_secs = max_buffering_secs

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        max_rows = self.max_rows
        # GroupIntoBatches buffers its elements in state with a FastPrimitivesCoder, which would pickle
        # record batches; buffer them as Arrow IPC bytes instead, so batches never go through pickle.
        return (
            pcoll
            | "ToIpc" >> beam.Map(_to_ipc).with_input_types(Keyed).with_output_types(Tuple[str, bytes])
            | "Group" >> beam.GroupIntoBatches(self.max_batches, max_buffering_duration_secs=self.max_buffering_secs)
            | "Concat"
            >> beam.FlatMap(lambda kv: ((kv[0], b) for b in concat_batches(map(batch_from_ipc, kv[1]), max_rows)))
            .with_output_types(Keyed)
        )


def _to_ipc(element: Keyed) -> Tuple[str, bytes]:
    partition, batch = element
    return partition, batch_to_ipc(batch)


# ------------------------------------------------------------------ keying: bare tables and batches, partition_by

ARROW_FORMS = "pyarrow.Table, pyarrow.RecordBatch or (partition: str, pyarrow.RecordBatch)"
RECORD_FORMS = "dict (an Avro record) or (partition: str, dict)"
_ARROW_HINT = Union[pa.Table, pa.RecordBatch, Tuple[str, pa.RecordBatch]]
_RECORD_HINT = Union[Dict[str, Any], Tuple[str, Dict[str, Any]]]


def check_element_type(pcoll: beam.PCollection, what: str, *, records: bool = False) -> None:
    """`ElementTypeError` when the pipeline is built if `pcoll`'s element type hint cannot be what `what` takes.

    A PCollection without a hint (``Any``, as Beam's file readers give) is
    checked element by element when it runs (`key_batch` / `key_record`).
    """
    from apache_beam.typehints import typehints
    from apache_beam.typehints.native_type_compatibility import convert_to_beam_type

    hint = getattr(pcoll, "element_type", None)
    if hint is None:
        return
    accepted = convert_to_beam_type(_RECORD_HINT if records else _ARROW_HINT)
    try:
        ok = typehints.is_consistent_with(hint, accepted)
    except (TypeError, ValueError):  # a hint Beam cannot compare: leave it to the run-time check
        return
    if not ok:
        raise ElementTypeError(f"{what} takes {RECORD_FORMS if records else ARROW_FORMS} elements, not {hint}")


def main_of(pvalueish: Any) -> Any:
    """The `main` PCollection of a keyturn output tuple (`KeyturnOutputs`, `ReadLake`'s), else `pvalueish` itself."""
    if isinstance(pvalueish, tuple) and hasattr(pvalueish, "_fields") and "main" in pvalueish._fields:
        return pvalueish.main
    return pvalueish


def _wrong_element(what: str, element: Any, forms: str) -> ElementTypeError:
    kind = type(element).__name__
    if isinstance(element, tuple):
        kind = f"tuple({', '.join(type(x).__name__ for x in element)})"
    return ElementTypeError(f"{what} takes {forms} elements, not {kind}")


def key_batch(element: Any, partition_by: Sequence[str] | None, what: str) -> Iterator[Keyed]:
    """`(partition, RecordBatch)` pieces of one element; empty pieces are dropped.

    Bare tables and batches belong to partition "" (unpartitioned), keyed
    ones to their key. With `partition_by`, each piece is split further by
    those columns' values into hive segments (`keyturn.lake.hive`), which
    leave the data (`split_by_partition`), exactly as ``keyturn encrypt
    --partition-by`` does. `InputError` for any other element, or a
    partition column the data lacks.
    """
    if isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], str) and isinstance(element[1], pa.RecordBatch):
        base, batches = element[0], [element[1]]
    elif isinstance(element, pa.Table):
        base, batches = "", element.to_batches()
    elif isinstance(element, pa.RecordBatch):
        base, batches = "", [element]
    else:
        raise _wrong_element(what, element, ARROW_FORMS)
    for batch in batches:
        if not batch.num_rows:
            continue
        if not partition_by:
            yield base, batch
            continue
        missing = [c for c in partition_by if c not in batch.schema.names]
        if missing:
            raise InputError(
                f"{what}: partition column {missing[0]!r} is not in the data (columns: {', '.join(batch.schema.names)})"
            )
        yield from split_by_partition(batch, base, list(partition_by), list(partition_by), batch.schema)


def key_record(element: Any, partition_by: Sequence[str] | None, what: str) -> Keyed:
    """`(partition, record)` for one Avro element: bare dicts belong to partition "" (or to their
    `partition_by` fields' hive path; the fields stay in the record), keyed ones to their key."""
    if isinstance(element, tuple) and len(element) == 2 and isinstance(element[0], str) and isinstance(element[1], dict):
        base, record = element
    elif isinstance(element, dict):
        base, record = "", element
    else:
        raise _wrong_element(what, element, RECORD_FORMS)
    if not partition_by:
        return base, record
    missing = [f for f in partition_by if f not in record]
    if missing:
        raise InputError(f"{what}: partition field {missing[0]!r} is not in the record (fields: {', '.join(record)})")
    segment = hive_path([(f, record[f]) for f in partition_by])
    return (f"{base}/{segment}" if base else segment), record


class _KeyBatchesFn(beam.DoFn):
    """`key_batch` over each element; with `settle`, the dataset contract is settled for every new schema."""

    def __init__(self, partition_by: Sequence[str] | None, what: str, settle: ContractSettle | None = None) -> None:
        self.partition_by = None if partition_by is None else list(partition_by)
        self.what = what
        self.settle = settle

    def setup(self) -> None:
        if self.settle is not None:
            self.settle.open()

    def process(self, element: Any) -> Iterator[Keyed]:
        keyed = isinstance(element, tuple)
        for partition, batch in key_batch(element, self.partition_by, self.what):
            if self.settle is not None:
                # bare input without partition_by is an unpartitioned dataset; keyed input names its own partitions
                partition_by = self.partition_by if self.partition_by else (None if keyed else [])
                self.settle.check(batch.schema, partition_by)
            yield partition, batch

    def teardown(self) -> None:
        if self.settle is not None:
            self.settle.close()


class ContractSettle:
    """Settles a dataset's contract for a write (`keyturn.contract.settle_arrow_contract`), once per schema.

    Picklable: holds the key source and names, opens the registry on the
    worker. The first write to a dataset pins its contract, partition
    columns included; a write that breaks it raises `ContractError`.
    """

    def __init__(self, keys: Any, dataset: str, columns: Sequence[str], bind: Sequence[str], actor: str) -> None:
        self.keys, self.dataset, self.columns, self.bind, self.actor = keys, dataset, list(columns), list(bind), actor
        self._registry: Any = None
        self._seen: list[tuple[pa.Schema, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_registry": None, "_seen": []}

    def open(self) -> None:
        self._registry = self.keys.open_registry()

    def check(self, schema: pa.Schema, partition_by: Sequence[str] | None) -> None:
        key = None if partition_by is None else tuple(partition_by)
        if any(s.equals(schema) and p == key for s, p in self._seen):
            return
        if self._registry is None:
            self.open()
        settle_arrow_contract(
            self._registry, self.dataset, schema, self.columns, bind=self.bind, partition_by=partition_by, actor=self.actor
        )
        self._seen.append((schema, key))

    def close(self) -> None:
        self._registry = None


class KeyBatches(beam.PTransform):
    """Any of the accepted Arrow forms (`ARROW_FORMS`) -> `(partition, RecordBatch)`; see `key_batch`."""

    def __init__(self, partition_by: Sequence[str] | None = None, *, what: str = "KeyBatches", settle: ContractSettle | None = None) -> None:
        super().__init__()
        self.partition_by = _partition_names(partition_by)
        self.what = what
        self.settle = settle

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        check_element_type(pcoll, self.what)
        return pcoll | beam.ParDo(_KeyBatchesFn(self.partition_by, self.what, self.settle)).with_output_types(Keyed)


class KeyRecords(beam.PTransform):
    """Avro elements (`RECORD_FORMS`) -> `(partition, record)`; see `key_record`."""

    def __init__(self, partition_by: Sequence[str] | None = None, *, what: str = "KeyRecords") -> None:
        super().__init__()
        self.partition_by = _partition_names(partition_by)
        self.what = what

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        check_element_type(pcoll, self.what, records=True)
        partition_by, what = self.partition_by, self.what
        return pcoll | beam.Map(key_record, partition_by, what).with_output_types(Tuple[str, Dict[str, Any]])


def _partition_names(partition_by: Sequence[str] | str | None) -> list[str] | None:
    """`partition_by` as a checked list of hive partition names (`check_partition_names`), or None."""
    if partition_by is None:
        return None
    names = [partition_by] if isinstance(partition_by, str) else list(partition_by)
    check_partition_names(names)
    return names


# ------------------------------------------------------------------ back to bare tables


def as_table(element: Keyed, schema: pa.Schema | None = None) -> pa.Table:
    """A keyed batch as a `pyarrow.Table` with its partition's hive segments back as columns.

    Each ``name=value`` segment of the partition (`hive_segments`) becomes a
    string column (null for the null partition), appended unless the batch
    already has it. With `schema`, the table has exactly its columns, in its
    order and types (partition values cast from their text); `InputError`
    if a column is missing on either side, so nothing is dropped or
    invented silently.
    """
    partition, batch = element
    arrays, fields = list(batch.columns), list(batch.schema)
    for name, value in hive_segments(partition):
        if name not in batch.schema.names:
            arrays.append(pa.array([value] * batch.num_rows, pa.string()))
            fields.append(pa.field(name, pa.string()))
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))
    if schema is None:
        return table
    missing = [f.name for f in schema if f.name not in table.schema.names]
    extra = [n for n in table.schema.names if n not in schema.names]
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"has {', '.join(extra)}, which the schema lacks"
        raise InputError(f"a batch of partition {partition!r} does not fit output_schema: it {what}")
    return pa.Table.from_arrays(
        [table.column(f.name) if table.schema.field(f.name).type == f.type else table.column(f.name).cast(f.type) for f in schema],
        schema=schema,
    )


class AsTables(beam.PTransform):
    """`(partition, RecordBatch)` -> `pyarrow.Table` (see `as_table`), e.g. for `beam.io.WriteToParquetBatched`."""

    def __init__(self, schema: pa.Schema | None = None) -> None:
        super().__init__()
        self.schema = schema

    def expand(self, pcoll: beam.PCollection) -> beam.PCollection:
        return pcoll | beam.Map(as_table, self.schema).with_output_types(pa.Table)

