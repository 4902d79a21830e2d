"""Beam coders: Arrow record batches travel as Arrow IPC streams, never as pickles.

Importing this module registers `RecordBatchCoder` for `pyarrow.RecordBatch`
and `TableCoder` for `pyarrow.Table`, so any PCollection typed with them (also
inside tuples) uses them.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from keyturn.ipc import batch_from_ipc, batch_to_ipc

__all__ = ["RecordBatchCoder", "TableCoder"]


class RecordBatchCoder(beam.coders.Coder):
    """Encodes one `pyarrow.RecordBatch` as an Arrow IPC stream (schema + batch).

    Deterministic: `keyturn.ipc.batch_to_ipc` compacts sliced batches before
    writing and the IPC writer omits all-valid bitmaps, so equal batches with
    equal schemas encode to equal bytes.
    """

    def encode(self, value: pa.RecordBatch) -> bytes:
        if not isinstance(value, pa.RecordBatch):
            raise TypeError(f"RecordBatchCoder encodes pyarrow.RecordBatch, not {type(value).__name__}")
        return batch_to_ipc(value)

    def decode(self, encoded: bytes) -> pa.RecordBatch:
        return batch_from_ipc(encoded)

    def is_deterministic(self) -> bool:
        return True

    def to_type_hint(self) -> type:
        return pa.RecordBatch

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))




class TableCoder(beam.coders.Coder):
    """Encodes a `pyarrow.Table` as one Arrow IPC stream, so tables, like batches, never travel as pickles."""

    def encode(self, value: pa.Table) -> bytes:
        if not isinstance(value, pa.Table):
            raise TypeError(f"TableCoder encodes pyarrow.Table, not {type(value).__name__}")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(pa.py_buffer(encoded)).read_all()

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> type:
        return pa.Table

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


beam.coders.registry.register_coder(pa.RecordBatch, RecordBatchCoder)
beam.coders.registry.register_coder(pa.Table, TableCoder)
