"""Arrow IPC stream bytes for one record batch: the coder format and the quarantine payload."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from keyturn.errors import DecryptionError

__all__ = ["batch_ipc_buffer", "batch_to_ipc", "batch_from_ipc"]


def _compact(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with buffers holding only its own rows.

    A slice (even one at offset 0) shares its parent's buffers, and the IPC
    writer may copy whole buffers: the bytes would then depend on how the
    batch was made, and carry rows outside it. `take` rebuilds compact
    buffers with zeroed padding bits; batches that are already compact (no
    unreferenced buffer bytes) are written as they are.
    """
    if batch.nbytes == batch.get_total_buffer_size():
        return batch
    return batch.take(pa.array(np.arange(batch.num_rows, dtype=np.int64)))


def batch_ipc_buffer(batch: pa.RecordBatch) -> pa.Buffer:
    """`batch` (schema included) as an Arrow IPC stream, in an Arrow buffer (no copy into Python bytes).

    Equal batches give equal bytes, however they were built (fresh, sliced,
    copied); a slice never carries bytes of the rows around it. Hash it or
    write it as it is; `batch_to_ipc` gives the same bytes as `bytes`.
    """
    batch = _compact(batch)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def batch_to_ipc(batch: pa.RecordBatch) -> bytes:
    """`batch_ipc_buffer(batch)` as Python bytes."""
    return batch_ipc_buffer(batch).to_pybytes()


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
