"""Exact serialization of Arrow values to cell plaintext bytes, and back.

Each non-null value becomes one byte string (see docs/FORMAT.md, "Cell
plaintext"):

- string types: UTF-8 bytes; binary types: the raw bytes;
- boolean: one byte, 0x00 or 0x01;
- fixed-width types (integers, floats, decimals, dates, times, timestamps,
  durations): the value's Arrow buffer bytes, little-endian, full width
  (decimal128 is a 16-byte two's-complement unscaled integer);
- dictionary: the decoded value, serialized as its value type; decryption
  dictionary-encodes the result again;
- anything else (list, large_list, fixed_size_list, struct, map, ...): an
  Arrow IPC record-batch message (no schema) of a one-row, one-column batch
  whose single field is `pa.field("v", plain_type)` (nullable, no metadata).

Nulls are not serialized: they stay null. The plain field (name, type,
nullability, metadata) travels in the encrypted field's metadata, under
`keyturn.plain_field`, as a base64 Arrow IPC schema.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keyturn.errors import DecryptionError
from keyturn.scope import ColumnSizes, PlainColumn

__all__ = [
    "to_plaintexts",
    "ArrowPlaintexts",
    "from_plaintexts",
    "from_plain_array",
    "encode_plain_field",
    "decode_plain_field",
    "arrow_type_descriptor",
]


def _is_fixed_width(t: pa.DataType) -> bool:
    return (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_decimal(t)
        or pa.types.is_temporal(t)
    ) and not pa.types.is_interval(t)


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", lambda _: False)(t):
        return "utf8"
    if (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or getattr(pa.types, "is_binary_view", lambda _: False)(t)
    ):
        return "binary"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_dictionary(t):
        return "dictionary"
    if _is_fixed_width(t):
        return "fixed"
    return "ipc"


def arrow_type_descriptor(plain_type: pa.DataType) -> str:
    """The type descriptor bound into every cell's associated data.

    Part of wire format v1 (docs/FORMAT.md, "Cell associated data"): cells
    sealed under one descriptor only open under the same one, so this
    function must never change for v1. Leaf types use pyarrow's type name
    (``arrow:int64``, ``arrow:timestamp[us, tz=UTC]``); nested types are
    spelled out here, recursively, so a change in how pyarrow prints them
    can never make old cells unreadable (``arrow:list<item: int32>``,
    ``arrow:struct<a: int16, b: string not null>``).
    """
    if not isinstance(plain_type, pa.DataType):
        raise TypeError(f"an Arrow type descriptor needs a pyarrow.DataType, not {type(plain_type).__name__}")
    return "arrow:" + _describe(plain_type)


def _describe_child(f: pa.Field) -> str:
    return f"{f.name}: {_describe(f.type)}" + ("" if f.nullable else " not null")


def _describe(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_describe_child(t.value_field)}>"
    if pa.types.is_large_list(t):
        return f"large_list<{_describe_child(t.value_field)}>"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_describe_child(t.value_field)}>[{t.list_size}]"
    if pa.types.is_map(t):
        item = _describe(t.item_type) + ("" if t.item_field.nullable else " not null")
        return f"map<{_describe(t.key_type)}, {item}{', keys_sorted' if t.keys_sorted else ''}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(_describe_child(t.field(i)) for i in range(t.num_fields)) + ">"
    if pa.types.is_dictionary(t):
        return f"dictionary<values={_describe(t.value_type)}, indices={_describe(t.index_type)}, ordered={int(t.ordered)}>"
    if pa.types.is_nested(t):  # union, list_view and friends: no stable spelling of our own yet
        raise ValueError(f"Arrow type {t} is not supported for encryption")
    return str(t)


def encode_plain_field(field: pa.Field) -> bytes:
    """The plain field as base64 Arrow IPC schema bytes, for field metadata."""
    return base64.b64encode(pa.schema([field]).serialize().to_pybytes())


def decode_plain_field(encoded: bytes) -> pa.Field:
    """Inverse of `encode_plain_field`; `DecryptionError` if it is not one."""
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded, validate=True)))
    except (ValueError, pa.ArrowException):
        raise DecryptionError() from None
    if len(schema) != 1:
        raise DecryptionError()
    return schema.field(0)


def _valid_mask(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    return arr.is_valid().to_numpy(zero_copy_only=False)


def to_plaintexts(arr: pa.Array | pa.ChunkedArray) -> list[bytes | None]:
    """One plaintext per value, `None` for nulls."""
    if isinstance(arr, pa.ChunkedArray):
        out: list[bytes | None] = []
        for chunk in arr.chunks:
            out.extend(to_plaintexts(chunk))
        return out
    kind = _kind(arr.type)
    if kind == "dictionary":
        return to_plaintexts(arr.dictionary_decode())
    if kind == "utf8":  # a string's bytes as binary: no copy for `string`
        return arr.cast(pa.binary() if pa.types.is_string(arr.type) else pa.large_binary()).to_pylist()
    if kind == "binary":
        return arr.to_pylist()
    if kind == "null":
        return [None] * len(arr)
    if kind == "bool":
        return [None if v is None else (b"\x01" if v else b"\x00") for v in arr.to_pylist()]
    if kind == "fixed":
        width = arr.type.bit_width // 8
        data = arr.buffers()[1]
        raw = np.frombuffer(data, dtype=np.uint8)[arr.offset * width : (arr.offset + len(arr)) * width]
        values = raw.view(f"V{width}").tolist()  # one `bytes` of `width` bytes per value, without a Python loop
        if arr.null_count:
            valid = _valid_mask(arr)
            values = [v if ok else None for v, ok in zip(values, valid)]
        return values
    # nested: one IPC record-batch message per cell
    schema = pa.schema([pa.field("v", arr.type)])
    valid = _valid_mask(arr)
    return [
        pa.record_batch([arr.slice(i, 1)], schema=schema).serialize().to_pybytes() if valid[i] else None
        for i in range(len(arr))
    ]


class ArrowPlaintexts(PlainColumn):
    """An Arrow array's plaintexts for `DekScope.seal_stream`: sizes from Arrow, values `to_plaintexts` a slice at a time.

    Strings, binaries and fixed-width values are sized without a Python
    loop; other types are serialized once, up front, and sized from that.
    """

    __slots__ = ("_array", "_plaintexts", "_sizes")

    def __init__(self, array: pa.Array | pa.ChunkedArray) -> None:
        self._array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        self._plaintexts: list[bytes | None] | None = None
        self._sizes: ColumnSizes | None = None

    def __len__(self) -> int:
        return len(self._array)

    def sizes(self) -> ColumnSizes:
        """Worked out once."""
        if self._sizes is None:
            self._sizes = self._measure()
        return self._sizes

    def _measure(self) -> ColumnSizes:
        arr = self._array
        t = arr.type
        valid = len(arr) - arr.null_count
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
            lengths = pc.binary_length(arr)
            nbytes = pc.sum(lengths).as_py() or 0
            longest = pc.max(lengths).as_py() or 0
            return ColumnSizes(valid, nbytes, longest, arr.null_count > 0)
        if _kind(t) == "fixed":
            width = t.bit_width // 8
            return ColumnSizes(valid, valid * width, width if valid else 0, arr.null_count > 0)
        values = self._all()
        lengths = [len(v) for v in values if v is not None]
        return ColumnSizes(len(lengths), sum(lengths), max(lengths, default=0), len(lengths) != len(values))

    def values(self, start: int, stop: int) -> Sequence[bytes | None]:
        if self._plaintexts is not None:
            return self._plaintexts[start:stop]
        return to_plaintexts(self._array.slice(start, stop - start))

    arrow_backed = True

    def arrow(self, start: int, stop: int) -> pa.Array:
        """Strings and binaries as they are, fixed-width values as a binary view of their buffer (no copies).

        Other types (serialized up front) as a binary array of their plaintexts.
        """
        if self._plaintexts is None:
            view = _binary_view(self._array.slice(start, stop - start))
            if view is not None:
                return view
        return pa.array(self.values(start, stop), pa.large_binary())

    def _all(self) -> list[bytes | None]:
        if self._plaintexts is None:
            self._plaintexts = to_plaintexts(self._array)
        return self._plaintexts


def _binary_view(arr: pa.Array) -> pa.Array | None:
    """`to_plaintexts(arr)` as a binary-like array over `arr`'s own buffers, or None where that is not a view.

    A string or binary array is its own plaintexts. A fixed-width array's
    values sit back to back in its data buffer, `width` bytes each: a binary
    array with offsets 0, width, 2 * width, ... over that buffer (and the
    same validity) holds exactly the plaintexts, nulls null.
    """
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return arr
    if _kind(t) != "fixed":
        return None
    width = t.bit_width // 8
    validity, data = arr.buffers()
    n = len(arr)
    if data is None or not n:
        return None
    shift = arr.offset % 8  # keep the validity bitmap byte-aligned: slice whole bytes, carry the bit offset
    first = arr.offset - shift
    count = shift + n
    large = count * width > _MAX_BINARY_DATA
    offsets = np.arange(0, (count + 1) * width, width, dtype=np.int64 if large else np.int32)
    buffers = [
        None if validity is None or arr.null_count == 0 else validity.slice(first // 8),
        pa.py_buffer(offsets),
        data.slice(first * width, count * width),
    ]
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), n, buffers, offset=shift)


_MAX_BINARY_DATA = (1 << 31) - 1


def from_plaintexts(values: list[bytes | None], field: pa.Field) -> pa.Array:
    """Rebuild an array of `field.type` from plaintexts; `DecryptionError` on a mismatch."""
    try:
        return _from_plaintexts(values, field.type)
    except (ValueError, TypeError, IndexError, pa.ArrowException):
        raise DecryptionError() from None


def from_plain_array(values: pa.Array, field: pa.Field) -> pa.Array:
    """`from_plaintexts` of plaintexts held in a binary or large_binary array (nulls stay null).

    Strings, variable-length binaries and fixed-width values are rebuilt
    with Arrow and numpy, without a Python operation per value; other types
    go through `from_plaintexts`. `DecryptionError` on a mismatch, as there.
    """
    try:
        return _from_array(values, field.type)
    except (ValueError, TypeError, IndexError, pa.ArrowException):
        raise DecryptionError() from None


def _from_array(values: pa.Array, t: pa.DataType) -> pa.Array:
    kind = _kind(t)
    if kind == "dictionary":
        return _from_array(values, t.value_type).dictionary_encode().cast(t)
    if kind == "utf8":  # the cast checks UTF-8
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return values.cast(t)
        return values.cast(pa.large_binary()).cast(pa.large_string()).cast(t)
    if kind == "binary" and (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return values.cast(t)
    if kind == "null":
        if values.null_count != len(values):
            raise ValueError("null column with values")
        return pa.nulls(len(values))
    if kind == "fixed":
        return _fixed_from_array(values, t)
    return _from_plaintexts(values.to_pylist(), t)


def _fixed_from_array(values: pa.Array, t: pa.DataType) -> pa.Array:
    """Fixed-width values from their plaintexts: each non-null one exactly the type's width."""
    width = t.bit_width // 8
    n = len(values)
    values = values.cast(pa.large_binary())
    valid = _valid_mask(values)
    lengths = np.diff(np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset : values.offset + n + 1])
    if np.any(lengths[valid] != width) or np.any(lengths[~valid] != 0):
        raise ValueError("bad fixed-width value")
    count = int(valid.sum())
    raw = np.zeros(0, dtype=np.uint8)
    if count:  # the values sit back to back in the data buffer
        start = int(np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset])
        raw = np.frombuffer(values.buffers()[2], dtype=np.uint8)[start : start + width * count]
    if count == n:
        return pa.Array.from_buffers(t, n, [None, pa.py_buffer(raw)], null_count=0)
    data = np.zeros((n, width), dtype=np.uint8)
    data[valid] = raw.reshape(-1, width)
    validity = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    return pa.Array.from_buffers(t, n, [validity, pa.py_buffer(data)], null_count=n - count)


def _from_plaintexts(values: list[bytes | None], t: pa.DataType) -> pa.Array:
    kind = _kind(t)
    n = len(values)
    if kind == "dictionary":
        return _from_plaintexts(values, t.value_type).dictionary_encode().cast(t)
    if kind == "utf8":
        return pa.array(values, pa.large_binary()).cast(pa.large_string()).cast(t)
    if kind == "binary":
        return pa.array(values, t)
    if kind == "null":
        if any(v is not None for v in values):
            raise ValueError("null column with values")
        return pa.nulls(n)
    if kind == "bool":
        bools = []
        for v in values:
            if v is None:
                bools.append(None)
            elif v == b"\x01" or v == b"\x00":
                bools.append(v == b"\x01")
            else:
                raise ValueError("bad boolean")
        return pa.array(bools, pa.bool_())
    if kind == "fixed":
        width = t.bit_width // 8
        zero = bytes(width)
        if any(v is not None and len(v) != width for v in values):
            raise ValueError("bad fixed-width value")
        data = pa.py_buffer(b"".join(zero if v is None else v for v in values))
        nulls = sum(1 for v in values if v is None)
        validity = None
        if nulls:
            mask = np.fromiter((v is not None for v in values), dtype=bool, count=n)
            validity = pa.py_buffer(np.packbits(mask, bitorder="little").tobytes())
        return pa.Array.from_buffers(t, n, [validity, data], null_count=nulls)
    schema = pa.schema([pa.field("v", t)])
    pieces = []
    for v in values:
        if v is None:
            pieces.append(pa.nulls(1, t))
        else:
            batch = pa.ipc.read_record_batch(pa.py_buffer(v), schema)
            if batch.num_rows != 1:
                raise ValueError("nested cell must hold one row")
            pieces.append(batch.column(0))
    if not pieces:
        return pa.array([], t)
    return pa.concat_arrays(pieces)
