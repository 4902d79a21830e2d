"""The native column kernel, when it is installed: whole columns of cells sealed and opened at once.

The extension `keyturn._native` (the `native/` folder; docs/NATIVE.md)
frames and authenticates cells exactly as docs/FORMAT.md section 4 lays them
out, with AES-256-GCM from one vetted Rust crate, the GIL released, and
large columns split across cores. The pure-Python cell path stays the
reference: both give byte-identical cells, and each opens the other's.

`keyturn.scope.DekScope` seals and `keyturn.arrow_codec.decrypt_batch`
opens through it whenever `native_available()` says so (the Avro reader
keeps the Python path).

`native_available()` says whether callers should use it: the extension
imported, matches this keyturn, and the environment variable
``KEYTURN_NATIVE`` does not turn it off (``0``, ``false``, ``no``, ``off``;
``1``, ``true``, ``yes``, ``on`` require it, so a worker image without it fails
instead of running slower). At debug level it logs, once per verdict, which
path runs. ``KEYTURN_NATIVE`` is read on every call, so setting it in the
environment switches the path for the next call (the tests run both paths
this way). Without the extension everything behaves as before.

Keys: each call takes the 32-byte cell key (bytes, bytearray or any buffer)
for the call only. The kernel keys AES from the caller's buffer without
copying it and wipes its key schedule before returning; nothing is cached.
Results are Arrow arrays and numpy arrays: no key material is in them.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from keyturn.format import DEK_ID_BYTES, FORMAT_VERSION

__all__ = [
    "ENV_VAR",
    "native_available",
    "kernel_loaded",
    "kernel_version",
    "seal_cells",
    "open_cells",
    "OpenedCells",
    "cells_to_seal",
    "OPENED",
    "NULL",
    "FAILED",
]

ENV_VAR = "KEYTURN_NATIVE"
_OFF = {"0", "false", "no", "off"}
_ON = {"1", "true", "yes", "on"}
_API_VERSION = 1  # the call contract of keyturn._native this module speaks
OPENED, NULL, FAILED = 0, 1, 2  # `OpenedCells.status` per row: opened, null cell, failed cell

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import pyarrow as pa


def _load() -> tuple[ModuleType | None, str]:
    """The extension module, or None and why not."""
    try:
        _native = importlib.import_module("keyturn._native")
    except ImportError as err:
        return None, f"the extension keyturn._native is not installed ({type(err).__name__})"
    if getattr(_native, "API_VERSION", None) != _API_VERSION or getattr(_native, "FORMAT_VERSION", None) != FORMAT_VERSION:
        return None, "the installed keyturn._native was built for another keyturn version; rebuild it"
    return _native, "loaded"


_KERNEL, _WHY = _load()
_logged: set[tuple[bool, str]] = set()


def kernel_loaded() -> bool:
    """Whether the extension imported and matches this keyturn (whatever ``KEYTURN_NATIVE`` says)."""
    return _KERNEL is not None


def kernel_version() -> str | None:
    """The extension's version, or None when it is not loaded."""
    return None if _KERNEL is None else str(_KERNEL.__version__)


def native_available() -> bool:
    """Whether the native kernel is loaded and not turned off by ``KEYTURN_NATIVE``.

    `RuntimeError` if ``KEYTURN_NATIVE`` requires it (``1``) and it is not
    loaded, or holds a value that is neither on nor off.
    """
    setting = os.environ.get(ENV_VAR, "").strip().lower()
    if setting in _OFF:
        verdict, why = False, f"{ENV_VAR}={setting} turns the native kernel off"
    elif _KERNEL is None:
        if setting in _ON:
            raise RuntimeError(f"{ENV_VAR}={setting} requires the native kernel, but {_WHY}")
        verdict, why = False, _WHY
    elif setting and setting not in _ON:
        raise RuntimeError(f"{ENV_VAR} must be one of 0/1, false/true, no/yes, off/on (got {setting!r})")
    else:
        verdict, why = True, f"keyturn._native {_KERNEL.__version__}, hardware AES: {_KERNEL.hardware_aes()}"
    if (verdict, why) not in _logged:
        _logged.add((verdict, why))
        _log.debug("keyturn cell path: %s (%s)", "native kernel" if verdict else "pure Python", why)
    return verdict


def _kernel() -> ModuleType:
    if _KERNEL is None:
        raise RuntimeError(f"the native kernel is not loaded: {_WHY}")
    return _KERNEL


def _column(values: pa.Array | Sequence[bytes | None]) -> tuple | list:
    """`values` as the kernel takes them: a list of bytes/None, or an Arrow array's buffers (read in place)."""
    if isinstance(values, list):
        return values
    import pyarrow as pa  # here, not at import: the Avro codec imports keyturn.scope (and so this module) without pyarrow

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        t = values.type
        width = 4 if t in (pa.binary(), pa.string()) else 8 if t in (pa.large_binary(), pa.large_string()) else None
        if width is None:
            raise TypeError(f"the kernel reads binary, string, large_binary or large_string arrays, not {values.type}")
        validity, offsets, data = values.buffers()
        if data is None:  # an array with no value bytes at all
            data = b""
        if validity is None or values.null_count == 0:
            validity = None
        return (data, offsets, width, values.offset, len(values), validity)
    return list(values)


def _aad(aad: bytes | Sequence[bytes | None]) -> bytes | list:
    if isinstance(aad, (bytes, bytearray, memoryview)):
        return aad
    return aad if isinstance(aad, list) else list(aad)


def _array(nrows: int, validity: bytes | None, offsets: bytes, data: bytes, large: bool) -> pa.Array:
    import pyarrow as pa

    buffers = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), nrows, buffers)


def cells_to_seal(values: pa.Array | Sequence[bytes | None]) -> int:
    """How many nonces sealing `values` takes: its non-null values."""
    import pyarrow as pa

    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return len(values) - values.null_count
    return sum(v is not None for v in values)


def seal_cells(
    cell_key: bytes | bytearray | memoryview,
    dek_id: bytes,
    first_nonce: int,
    values: pa.Array | Sequence[bytes | None],
    aad: bytes | Sequence[bytes | None],
) -> pa.Array:
    """Seal each non-null value of `values` into a v1 cell; a `binary` array (large_binary past 2 GiB), null where null.

    `values` is a list of plaintexts (bytes or None) or a binary-like Arrow
    array (read in place). The k-th non-null value takes nonce
    ``first_nonce + k`` as `keyturn.scope.nonce_block` lays it out; the caller
    reserves those `cells_to_seal(values)` nonces before the call. `aad` is
    the encoded associated data of every cell, or a sequence with one per row
    (None at null rows). `ValueError` for a wrong key, dek_id or a value over
    64 MiB; `OverflowError` past the 96-bit nonce space.
    """
    if len(dek_id) != DEK_ID_BYTES:
        raise ValueError(f"dek_id must be {DEK_ID_BYTES} bytes")
    column = _column(values)
    validity, offsets, data, large, _ = _kernel().seal_cells(cell_key, dek_id, first_nonce, column, _aad(aad))
    return _array(len(offsets) // (8 if large else 4) - 1, validity, offsets, data, large)


@dataclass(frozen=True)
class OpenedCells:
    """What `open_cells` gives back: per row, the plaintext (null for a null or failed cell), and the rows that failed."""

    values: pa.Array = field(repr=False)
    failed: np.ndarray
    status: np.ndarray = field(repr=False)

    def __repr__(self) -> str:
        return f"OpenedCells(rows={len(self.values)}, failed={len(self.failed)})"


def open_cells(
    cell_key: bytes | bytearray | memoryview,
    dek_id: bytes,
    cells: pa.Array | Sequence[bytes | None],
    aad: bytes | Sequence[bytes | None],
) -> OpenedCells:
    """Open a column of cells under one cell key: `OpenedCells` with plaintexts, failed rows and a per-row status.

    The checks of `keyturn.reader.OpenedDek.open_cell`, per cell: 45 to
    45 + 64 MiB bytes, the version byte and `dek_id` first, then AES-GCM
    authentication under the cell's nonce and `aad` (one for every cell, or a
    sequence with one per row). A cell that fails any check is a failed row
    (its value null), never an exception; null cells are neither opened nor
    failed. `status[i]` is 0 (opened), 1 (null) or 2 (failed).
    """
    if len(dek_id) != DEK_ID_BYTES:
        raise ValueError(f"dek_id must be {DEK_ID_BYTES} bytes")
    column = _column(cells)
    validity, offsets, data, large, status, failed = _kernel().open_cells(cell_key, dek_id, column, _aad(aad))
    codes = np.frombuffer(status, dtype=np.uint8)
    values = _array(len(codes), validity, offsets, data, large)
    bad = np.flatnonzero(codes == 2) if failed else np.empty(0, dtype=np.int64)
    return OpenedCells(values, bad, codes)
