"""Arrow IPC stream bytes for one record batch: the coder format and the quarantine payload."""

from __future__ import annotations

import pyarrow as pa

from keyturn.errors import DecryptionError

__all__ = ["batch_to_ipc", "batch_from_ipc"]


def batch_to_ipc(batch: pa.RecordBatch) -> bytes:
    """Serialize `batch` (schema included) as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def batch_from_ipc(data: bytes) -> pa.RecordBatch:
    """Read back one batch written by `batch_to_ipc`; `DecryptionError` if malformed."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(data))
        batches = list(reader)
    except (pa.ArrowException, ValueError, OSError):
        raise DecryptionError() from None
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_pylist([], schema=reader.schema)
    return pa.Table.from_batches(batches).combine_chunks().to_batches()[0]
