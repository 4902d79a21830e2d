"""Beam coders: Arrow record batches travel as Arrow IPC streams, never as pickles.

Importing this module registers `RecordBatchCoder` for `pyarrow.RecordBatch`
and `TableCoder` for `pyarrow.Table`, so any PCollection typed with them (also
inside tuples) uses them.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import pyarrow as pa

from keyturn.ipc import batch_from_ipc, batch_to_ipc

__all__ = ["RecordBatchCoder", "TableCoder"]


class _ArrowIpcCoder(beam.coders.Coder):
    """An Arrow value as one IPC stream; subclasses name the type and the two conversions."""

    value_type: type

    def _encode(self, value: Any) -> bytes:
        raise NotImplementedError

    def _decode(self, encoded: bytes) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> bytes:
        if not isinstance(value, self.value_type):
            raise TypeError(f"{type(self).__name__} encodes pyarrow.{self.value_type.__name__}, not {type(value).__name__}")
        return self._encode(value)

    def decode(self, encoded: bytes) -> Any:
        return self._decode(encoded)

    def to_type_hint(self) -> type:
        return self.value_type

    def estimate_size(self, value: Any) -> int:
        """The value's Arrow buffer size: Beam sizes sampled elements without encoding them."""
        return int(value.get_total_buffer_size())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(type(self))


class RecordBatchCoder(_ArrowIpcCoder):
    """Encodes one `pyarrow.RecordBatch` as an Arrow IPC stream (schema + batch).

    Deterministic: `keyturn.ipc.batch_to_ipc` compacts sliced batches before
    writing and the IPC writer omits all-valid bitmaps, so equal batches with
    equal schemas encode to equal bytes.
    """

    value_type = pa.RecordBatch

    def _encode(self, value: pa.RecordBatch) -> bytes:
        return batch_to_ipc(value)

    def _decode(self, encoded: bytes) -> pa.RecordBatch:
        return batch_from_ipc(encoded)

    def is_deterministic(self) -> bool:
        return True


class TableCoder(_ArrowIpcCoder):
    """Encodes a `pyarrow.Table` as one Arrow IPC stream, so tables, like batches, never travel as pickles."""

    value_type = pa.Table

    def _encode(self, value: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return sink.getvalue().to_pybytes()

    def _decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(pa.py_buffer(encoded)).read_all()

    def is_deterministic(self) -> bool:
        return False


beam.coders.registry.register_coder(pa.RecordBatch, RecordBatchCoder)
beam.coders.registry.register_coder(pa.Table, TableCoder)
