"""Beam coders: Arrow record batches travel as Arrow IPC streams, never as pickles.

Importing this module registers `RecordBatchCoder` for `pyarrow.RecordBatch`,
so any PCollection typed with record batches (also inside tuples) uses it.
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from keyturn.ipc import batch_from_ipc, batch_to_ipc

__all__ = ["RecordBatchCoder"]


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


beam.coders.registry.register_coder(pa.RecordBatch, RecordBatchCoder)
