"""`PartitionBatches`: gather a partition's small batches into large ones.

Streaming pipelines see many small batches per partition; a DEK scope is one
partition within one bundle, so small bundles mean many KMS calls.
PartitionBatches groups `(partition, RecordBatch)` elements per partition and
window with Beam's `GroupIntoBatches` (bounded by element count and by
`max_buffering_secs`, so data never waits longer than that), concatenates
each group, and re-splits it so no output batch exceeds `max_rows`.
Works with any windowing: groups never cross windows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Tuple

import apache_beam as beam
import pyarrow as pa

import keyturn.transforms.coders  # noqa: F401  (registers RecordBatchCoder)
from keyturn.ipc import batch_from_ipc, batch_to_ipc

__all__ = ["PartitionBatches", "concat_batches"]

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
