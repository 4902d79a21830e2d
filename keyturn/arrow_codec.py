"""Arrow codec: encrypt, decrypt, rewrap and re-encrypt `pyarrow.RecordBatch`es.

An encrypted batch keeps every non-sensitive column as it was. Each
sensitive column becomes a nullable `binary` column of cell ciphertexts
(nulls stay null) whose field metadata records the plain field
(`keyturn.plain_field`), the format (`keyturn.format` = "1") and any bound
row-key columns (`keyturn.bind`, a JSON list). Two columns are appended, so
every row is self-describing:

- `_keyturn_version` (int64): the key version of the row's DEK; Parquet
  column statistics on it let a job skip files without reading data;
- `_keyturn_dek` (dictionary<int32, binary>): the row's DEK envelope.
  Dictionary encoding stores each envelope once per row group.

A batch belongs to one `Location` (dataset and partition), which is bound
into every cell together with the column name and the plain type
(`arrow_type_descriptor`), so cells moved to another column, partition or
dataset, or read under an edited `keyturn.plain_field` type, fail
authentication. Binding row-key columns also pins a cell to its row.

Reads never raise for bad rows: every input row gets a `ReadStatus`, only
current and stale rows are decrypted, and the original bytes of the others
stay available through `rows_with`, so nothing is lost.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keyturn import native
from keyturn.arrow_values import (
    ArrowPlaintexts,
    arrow_type_descriptor,
    decode_plain_field,
    encode_plain_field,
    from_plain_array,
    to_plaintexts,
)
from keyturn.context import MAX_VALUE_BYTES
from keyturn.contract import DatasetContract, check_arrow_write
from keyturn.errors import DecryptionError
from keyturn.format import (
    CELL_HEADER_BYTES,
    CELL_OVERHEAD,
    DEK_FIELD,
    DEK_ID_BYTES,
    FORMAT_VERSION,
    MAX_CELL_PLAINTEXT,
    NONCE_BYTES,
    VERSION_FIELD,
)
from keyturn.kms.base import KmsBackend
from keyturn.policy import KeyPolicy, PairKeys, ReadStatus, StatusCounts, classify_pair, classify_rows
from keyturn.reader import DekReader, OpenedDek, cell_aad_bytes
from keyturn.rewrap import rewrap_rows
from keyturn.scope import ColumnSizes, DekScope, Location, SealedPart, Sealing

__all__ = [
    "VERSION_COLUMN",
    "DEK_COLUMN",
    "encrypt_batch",
    "decrypt_batch",
    "rewrap_batch",
    "reencrypt_batch",
    "encrypted_columns",
    "contract_schema",
    "contract_violations",
    "legacy_plain_columns",
    "shape_problems",
    "conform",
    "row_keys",
    "DecryptResult",
    "RewrapResult",
    "ReencryptResult",
]

VERSION_COLUMN = VERSION_FIELD  # aliases kept for compatibility; the names live in keyturn.format
DEK_COLUMN = DEK_FIELD
META_FORMAT = b"keyturn.format"
META_PLAIN = b"keyturn.plain_field"
META_BIND = b"keyturn.bind"
_RESERVED = (VERSION_COLUMN, DEK_COLUMN)
_DEK_TYPE = pa.dictionary(pa.int32(), pa.binary())
_NO_SEPARATOR = pa.scalar(b"", pa.binary())


def encrypted_columns(schema: pa.Schema) -> list[str]:
    """Names of the columns keyturn encrypted (format "1"), in schema order.

    A column whose ``keyturn.format`` is anything else is not listed here,
    and is never clear data either: see `_foreign_columns`.
    """
    return [f.name for f in schema if f.metadata and f.metadata.get(META_FORMAT) == b"1"]


def _foreign_columns(schema: pa.Schema) -> list[str]:
    """Columns carrying ``keyturn.format`` metadata with a value other than "1".

    They hold cells this version cannot read (another format, or tampered
    metadata). `decrypt_batch` never passes them through as clear data: a row
    with a non-null cell in one is corrupt, and the column is left out of
    `plain`.
    """
    return [f.name for f in schema if f.metadata and META_FORMAT in f.metadata and f.metadata[META_FORMAT] != b"1"]


def _type_descriptor(plain_type: pa.DataType) -> str:
    """`arrow_type_descriptor` on the read path: `DecryptionError` if unsupported or too long to bind."""
    try:
        descriptor = arrow_type_descriptor(plain_type)
    except ValueError:
        raise DecryptionError() from None
    if len(descriptor.encode("utf-8")) > MAX_VALUE_BYTES:
        raise DecryptionError()
    return descriptor


def _bind_list(f: pa.Field) -> list[str]:
    try:
        names = json.loads((f.metadata or {}).get(META_BIND, b"[]"))
    except ValueError:
        raise DecryptionError() from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DecryptionError()
    return names


def _bindings(batch: pa.RecordBatch, names: Sequence[str]) -> list[dict[str, bytes]] | None:
    if not names:
        return None
    values = [to_plaintexts(batch.column(n)) for n in names]
    return [{n: col[i] for n, col in zip(names, values) if col[i] is not None} for i in range(batch.num_rows)]


def _column_names(value: Sequence[str], what: str) -> list[str]:
    """`value` as a list of column names; `TypeError` for a bare string or non-str entries."""
    names = None if isinstance(value, (str, bytes)) else list(value)
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be a sequence of column names (str), not {value!r}")
    return names


# -- encrypt ----------------------------------------------------------------


def encrypt_batch(
    batch: pa.RecordBatch,
    columns: Sequence[str],
    scope: DekScope,
    *,
    bind_columns: Sequence[str] = (),
    contract: DatasetContract | None = None,
) -> pa.RecordBatch:
    """Encrypt `columns` of `batch` under `scope`'s DEK(s); see the module docstring for the layout.

    `bind_columns` are non-sensitive columns whose values are bound into each
    row's cells. With the dataset's `contract`, the batch is first checked
    against it (`ContractError` before any KMS call if the columns, their
    types or the bindings differ). An empty batch makes no KMS call.
    """
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"encrypt_batch needs a pyarrow.RecordBatch, not {type(batch).__name__}")
    if contract is not None:
        check_arrow_write(contract, batch.schema, columns, bind=bind_columns)
        columns, bind_columns = contract.names, list(contract.bind)
    names = batch.schema.names
    columns = _column_names(columns, "columns")
    bind_columns = _column_names(bind_columns, "bind_columns")
    if not columns:
        raise ValueError("name at least one column to encrypt")
    for reserved in _RESERVED:
        if reserved in names:
            raise ValueError(f"batch already has the reserved column {reserved!r}: is it encrypted already?")
    for name in columns + bind_columns:
        if names.count(name) == 0:
            raise ValueError(f"column {name!r} is not in the batch (columns: {', '.join(names)})")
        if names.count(name) > 1:
            raise ValueError(f"column {name!r} appears {names.count(name)} times in the batch; names must be unique")
    if len(set(columns)) != len(columns):
        raise ValueError(f"a column is named twice: {sorted({c for c in columns if columns.count(c) > 1})}")
    overlap = set(columns) & set(bind_columns)
    if overlap:
        raise ValueError(f"bind columns must not be encrypted: {sorted(overlap)}")
    already = encrypted_columns(batch.schema) + _foreign_columns(batch.schema)
    if set(already) & set(columns):
        raise ValueError(f"columns already encrypted: {sorted(set(already) & set(columns))}")

    plaintexts = [ArrowPlaintexts(batch.column(name)) for name in columns]
    types = [arrow_type_descriptor(batch.schema.field(name).type) for name in columns]
    outputs = [_CellColumn(batch.num_rows, column.sizes()) for column in plaintexts]  # refuses > 2 GiB before any KMS call
    sealing = scope.seal_stream(columns, plaintexts, _bindings(batch, bind_columns), types=types)
    for j, part in sealing.parts:  # framed as they come, while the chunk is in cache
        outputs[j].add(part)
    sealed_by_name = {name: out.array() for name, out in zip(columns, outputs)}

    bind_json = json.dumps(bind_columns).encode()
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for f, arr in zip(batch.schema, batch.columns):
        if f.name in sealed_by_name:
            meta = {META_FORMAT: b"1", META_PLAIN: encode_plain_field(f), META_BIND: bind_json}
            fields.append(pa.field(f.name, pa.binary(), nullable=True, metadata=meta))
            arrays.append(sealed_by_name[f.name])
        else:
            fields.append(f)
            arrays.append(arr)
    n = batch.num_rows
    fields.append(pa.field(VERSION_COLUMN, pa.int64(), nullable=True))
    arrays.append(pa.array(np.full(n, scope.kek.version, dtype=np.int64)))
    fields.append(pa.field(DEK_COLUMN, _DEK_TYPE, nullable=True))
    arrays.append(pa.DictionaryArray.from_arrays(_envelope_indices(sealing), pa.array(sealing.envelopes, pa.binary())))
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


def _framed(part: SealedPart) -> pa.Array:
    """The cells of `part` as a `binary` array, framed by one Arrow kernel rather than per cell in Python."""
    count = len(part.bodies)
    offsets = np.arange(0, NONCE_BYTES * (count + 1), NONCE_BYTES, dtype=np.int32)
    nonces = pa.Array.from_buffers(pa.binary(), count, [None, pa.py_buffer(offsets), pa.py_buffer(part.nonces)])
    bodies = pa.array(part.bodies, pa.binary())
    return pc.binary_join_element_wise(pa.scalar(part.header, pa.binary()), nonces, bodies, _NO_SEPARATOR)


_MAX_BINARY = (1 << 31) - 1  # the data a `binary` array can hold


class _BinaryBuilder:
    """Binary pieces appended into one buffer sized up front; the pieces' own buffers are let go (and reused).

    Building a column this way allocates its output once, instead of once
    for the pieces and again to concatenate them.
    """

    def __init__(self, nbytes: int, count: int) -> None:
        self._large = nbytes > _MAX_BINARY
        width = np.dtype(np.int64 if self._large else np.int32)
        # Arrow's memory pool, not numpy's: the pool keeps freed pages for the next batch's column (fresh pages
        # cost a fault each on first touch), and the column's bytes count in `pa.total_allocated_bytes()`.
        self._data_buffer = pa.allocate_buffer(nbytes)
        self._offset_buffer = pa.allocate_buffer(width.itemsize * (count + 1))
        self._data = np.frombuffer(self._data_buffer, dtype=np.uint8)
        self._offsets = np.frombuffer(self._offset_buffer, dtype=width)
        self._offsets[0] = 0
        self.count = 0

    def add(self, piece: pa.Array) -> None:
        """Append the values of `piece` (binary or large_binary, no nulls); `ValueError` past the capacity."""
        k = len(piece)
        width = np.int64 if pa.types.is_large_binary(piece.type) else np.int32
        offsets = np.frombuffer(piece.buffers()[1], dtype=width)[piece.offset : piece.offset + k + 1].astype(np.int64)
        size, base = int(offsets[-1] - offsets[0]), int(self._offsets[self.count])
        if self.count + k >= len(self._offsets) or base + size > len(self._data):
            raise ValueError("binary pieces outgrew the capacity they were given")
        self._data[base : base + size] = np.frombuffer(piece.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        self._offsets[self.count + 1 : self.count + k + 1] = offsets[1:] - offsets[0] + base
        self.count += k

    def add_joined(self, data: bytes, lengths: np.ndarray) -> None:
        """Append values given as their concatenation `data` and their `lengths`; `ValueError` if they disagree
        or past the capacity.

        The bulk form of `add` for values that arrive as Python `bytes`: one
        join and one copy, instead of an Arrow array built and copied again.
        """
        k, size, base = len(lengths), len(data), int(self._offsets[self.count])
        ends = np.cumsum(lengths, dtype=np.int64)
        if k and int(ends[-1]) != size:
            raise ValueError("binary values do not have the lengths they were given")
        if self.count + k >= len(self._offsets) or base + size > len(self._data):
            raise ValueError("binary pieces outgrew the capacity they were given")
        self._data[base : base + size] = np.frombuffer(data, dtype=np.uint8)
        self._offsets[self.count + 1 : self.count + k + 1] = ends + base
        self.count += k

    @property
    def full(self) -> bool:
        return self.count == len(self._offsets) - 1 and int(self._offsets[-1]) == len(self._data)

    def array(self) -> pa.Array:
        """What was appended, as one binary (large_binary past 2 GiB) array."""
        kind = pa.large_binary() if self._large else pa.binary()
        size = int(self._offsets[self.count])
        offsets = self._offset_buffer.slice(0, self._offsets.itemsize * (self.count + 1))
        return pa.Array.from_buffers(kind, self.count, [None, offsets, self._data_buffer.slice(0, size)])


class _CellColumn:
    """One sealed field, built as its parts arrive.

    A Python part is framed, then copied into one `_BinaryBuilder`; a native
    part comes framed, nulls in place, and is kept as it is (the parts of
    one field cover its rows in order, so they concatenate into the column).
    """

    def __init__(self, nrows: int, sizes: ColumnSizes) -> None:
        nbytes = sizes.bytes + CELL_OVERHEAD * sizes.cells
        if nbytes > _MAX_BINARY:
            raise ValueError("an encrypted column of one batch must stay under 2 GiB; split the batch")
        self._nrows = nrows
        self._nbytes, self._count = nbytes, sizes.cells
        self._builder: _BinaryBuilder | None = None
        self._rows: list[range | list[int]] = []
        self._framed: list[pa.Array] = []

    @property
    def _cells(self) -> _BinaryBuilder:
        if self._builder is None:
            self._builder = _BinaryBuilder(self._nbytes, self._count)
        return self._builder

    def add(self, part: SealedPart) -> None:
        """Frame `part` and append its cells."""
        if part.framed is not None:
            self._framed.append(part.framed)
        elif part.bodies:
            self._cells.add(_framed(part))
            self._rows.append(part.rows)

    def array(self) -> pa.Array:
        """The column: every row's cell, null where the value was null."""
        if self._framed:
            return self._native_array()
        if not self._cells.full:
            raise ValueError("a sealed column fell short of the sizes its plaintexts reported")
        if not self._cells.count:
            return pa.nulls(self._nrows, pa.binary())
        cells = self._cells.array()
        if self._cells.count == self._nrows:
            return cells
        valid = np.zeros(self._nrows, dtype=bool)  # nulls: put each cell in its row
        for rows in self._rows:
            if isinstance(rows, range):
                valid[rows.start : rows.stop] = True
            else:
                valid[np.asarray(rows, dtype=np.int64)] = True
        position = np.cumsum(valid, dtype=np.int64) - 1
        return cells.take(pa.array(position, mask=~valid))

    def _native_array(self) -> pa.Array:
        cells = self._framed[0] if len(self._framed) == 1 else pa.concat_arrays(self._framed)
        if self._builder is not None or cells.type != pa.binary() or len(cells) != self._nrows:
            raise ValueError("a sealed column's parts do not cover its rows")
        offsets = np.frombuffer(cells.buffers()[1], dtype=np.int32)[cells.offset : cells.offset + len(cells) + 1]
        if len(cells) - cells.null_count != self._count or int(offsets[-1] - offsets[0]) != self._nbytes:
            raise ValueError("a sealed column fell short of the sizes its plaintexts reported")
        return cells


def _envelope_indices(sealing: Sealing) -> pa.Array:
    """Per row, the int32 index of its envelope in `sealing.envelopes`."""
    indices = np.empty(sealing.nrows, dtype=np.int32)
    for index, start, stop in sealing.segments:
        indices[start:stop] = index
    return pa.array(indices)


# -- reading: per-row classification -----------------------------------------


def row_keys(batch: pa.RecordBatch) -> tuple[list[int | None], list[bytes | None]]:
    """Each row's version column value and envelope bytes (None where absent)."""
    n = batch.num_rows
    names = batch.schema.names
    versions = batch.column(VERSION_COLUMN).to_pylist() if VERSION_COLUMN in names else [None] * n
    if DEK_COLUMN not in names:
        return versions, [None] * n
    dek = batch.column(DEK_COLUMN)
    if not pa.types.is_dictionary(dek.type):
        dek = dek.dictionary_encode()
    dictionary = dek.dictionary.to_pylist()
    indices = dek.indices.to_pylist()
    return versions, [None if i is None else dictionary[i] for i in indices]


def _classify_rows(
    batch: pa.RecordBatch, policy: KeyPolicy
) -> tuple[list[ReadStatus], list[int | None], list[bytes | None]]:
    versions, envelopes = row_keys(batch)
    return classify_rows(policy, versions, envelopes), versions, envelopes


# Read-path row state as arrays: a status is its index in _STATUSES
_STATUSES = tuple(ReadStatus)
_CODE = {s: i for i, s in enumerate(_STATUSES)}
_CORRUPT = _CODE[ReadStatus.CORRUPT]
_LAST_READABLE = 1  # codes 0 and 1 (current, stale) are read; `_readable` compares instead of looking up
if [s.readable for s in _STATUSES] != [i <= _LAST_READABLE for i in range(len(_STATUSES))]:
    raise ImportError("ReadStatus must list its readable statuses first")
_STATUS_OBJECTS = np.empty(len(_STATUSES), dtype=object)
_STATUS_OBJECTS[:] = _STATUSES
_EVERY_COLUMN = np.iinfo(np.int64).max  # the revision of a DEK that needs every contract column (None in RowKeys)


@dataclass
class _BatchKeys:
    """Every row's key facts, as arrays: its `classify_keys` outcome and its envelope."""

    codes: np.ndarray  # int8 status code per row (index into _STATUSES)
    versions: list[int | None]  # the effective key version per row (`RowKeys.versions`)
    revisions: np.ndarray  # int64 contract revision of the row's DEK; _EVERY_COLUMN for None
    envelope: np.ndarray | None  # int64 index of the row's envelope in `envelopes`, -1 for none; None: all envelopes[0]
    envelopes: list[bytes]  # the batch's distinct envelopes


def _value_codes(array: pa.Array) -> tuple[np.ndarray | None, list]:
    """(per row, the index of its value among the distinct values, -1 for null; those values).

    The codes are None when every row holds `values[0]` (the common case, found without hashing).
    """
    if array.null_count == 0 and len(array) and (pa.types.is_integer(array.type) or pa.types.is_dictionary(array.type)):
        bounds = pc.min_max(array.indices if pa.types.is_dictionary(array.type) else array)
        if bounds["min"] == bounds["max"]:
            only = bounds["min"].as_py()
            return None, [array.dictionary[only].as_py() if pa.types.is_dictionary(array.type) else only]
    encoded = array if pa.types.is_dictionary(array.type) else array.dictionary_encode()
    indices = pc.fill_null(encoded.indices.cast(pa.int64()), -1).to_numpy()
    return indices, encoded.dictionary.to_pylist()


def _envelope_codes(batch: pa.RecordBatch) -> tuple[np.ndarray | None, list[bytes]]:
    """Per row, the index of its envelope among the batch's distinct envelopes (-1 for none); those envelopes.

    The codes are None when every row holds `envelopes[0]`.
    """
    n = batch.num_rows
    if DEK_COLUMN not in batch.schema.names:
        return np.full(n, -1, dtype=np.int64), []
    codes, values = _value_codes(batch.column(DEK_COLUMN))
    if codes is None:
        return (None, values) if values[0] is not None else (np.full(n, -1, dtype=np.int64), [])
    distinct: dict[bytes, int] = {}  # a dictionary may repeat an envelope, or hold a null
    remap = [-1 if v is None else distinct.setdefault(v, len(distinct)) for v in values]
    return np.array([*remap, -1], dtype=np.int64)[codes], list(distinct)


def _distinct(keys: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct values of `keys`, ascending; per row, the position of its value among them). Keys are 0..size-1."""
    if size <= max(1 << 16, 4 * len(keys)):
        seen = np.bincount(keys, minlength=size) > 0
        return np.flatnonzero(seen), (np.cumsum(seen) - 1)[keys]
    distinct, inverse = np.unique(keys, return_inverse=True)
    return distinct, inverse.reshape(-1)


def _batch_keys(batch: pa.RecordBatch, policy: KeyPolicy, reader: DekReader, location: Location) -> _BatchKeys:
    """Classify every row (`classify_keys`'s rules), once per distinct (version, envelope) pair.

    Against the reader's DEK directory when it has one (one lookup for the batch's envelopes).
    """
    n = batch.num_rows
    if VERSION_COLUMN in batch.schema.names:
        version_codes, versions = _value_codes(batch.column(VERSION_COLUMN))
    else:
        version_codes, versions = np.full(n, -1, dtype=np.int64), []
    envelope_codes, envelopes = _envelope_codes(batch)
    entries = reader.entries(envelopes)

    def classify(version: int | None, envelope: bytes | None) -> PairKeys:
        return classify_pair(policy, version, envelope, entries=entries, location=location if entries is not None else None)

    if version_codes is None and envelope_codes is None:  # one pair for every row: no per-row work
        only = classify(versions[0], envelopes[0])
        revision = _EVERY_COLUMN if only.revision is None else only.revision
        return _BatchKeys(
            np.full(n, _CODE[only.status], dtype=np.int8), [only.version] * n, np.full(n, revision, dtype=np.int64), None, envelopes
        )
    version_codes = np.zeros(n, dtype=np.int64) if version_codes is None else version_codes
    envelope_codes = np.zeros(n, dtype=np.int64) if envelope_codes is None else envelope_codes
    width = len(envelopes) + 1
    pairs, row_pair = _distinct((version_codes + 1) * width + (envelope_codes + 1), (len(versions) + 1) * width)
    found = [
        classify(versions[p // width - 1] if p >= width else None, envelopes[p % width - 1] if p % width else None)
        for p in pairs.tolist()
    ]
    codes = np.array([_CODE[f.status] for f in found], dtype=np.int8)
    revisions = np.array([_EVERY_COLUMN if f.revision is None else f.revision for f in found], dtype=np.int64)
    table = np.empty(len(found), dtype=object)
    table[:] = [f.version for f in found]
    return _BatchKeys(codes[row_pair], table[row_pair].tolist(), revisions[row_pair], envelope_codes, envelopes)


def _readable(codes: np.ndarray) -> np.ndarray:
    """Per row, whether its status is current or stale (decrypted)."""
    return codes <= _LAST_READABLE


def _rows_where(mask: np.ndarray) -> np.ndarray:
    """The indices where `mask` holds (int64, ascending)."""
    return np.arange(len(mask), dtype=np.int64) if mask.all() else np.flatnonzero(mask)


def _status_list(codes: np.ndarray) -> list[ReadStatus]:
    """The `ReadStatus` of each status code."""
    if len(codes) and codes.min() == codes.max():
        return [_STATUSES[codes[0]]] * len(codes)
    return _STATUS_OBJECTS[codes].tolist()


_SEALED, _PLAIN, _ABSENT = "sealed", "plain", "absent"


def _binary(array: pa.Array) -> pa.Array:
    """A ciphertext column as plain `binary` (engines write it as large_binary, binary_view or dictionary)."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return array if array.type == pa.binary() else array.cast(pa.binary())


def _is_binary_like(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or getattr(pa.types, "is_binary_view", lambda _: False)(t)


@dataclass
class _ReadLayout:
    """Where the encrypted columns of a batch are, and as what they are read."""

    sensitive: list[str]
    plain_fields: dict[str, pa.Field]
    types: dict[str, str]
    binds: list[str]
    modes: dict[str, str]
    since: dict[str, int]
    foreign: list[str]
    broken: bool = False  # the metadata path could not describe a column: every readable row is corrupt


def _layout_from_contract(schema: pa.Schema, contract: DatasetContract) -> _ReadLayout:
    """The read layout a contract dictates; the file's own metadata is not consulted for any of it."""
    plain_fields, types, modes, since = {}, {}, {}, {}
    for c in contract.columns:
        plain_fields[c.name] = c.arrow_field()
        types[c.name] = c.type_descriptor
        since[c.name] = c.since_revision
        if c.name not in schema.names:
            modes[c.name] = _ABSENT
        elif _is_binary_like(schema.field(c.name).type):
            modes[c.name] = _SEALED
        else:
            modes[c.name] = _PLAIN
    # never clear data: a non-contract column carrying keyturn metadata, and any column whose name differs
    # from a contract, bound or key column only in case (case-insensitive engines would read it as that column)
    guarded = {n.casefold(): n for n in [*contract.names, *contract.bind, *_RESERVED]}
    foreign = [
        f.name
        for f in schema
        if f.name not in contract.names
        and f.name not in _RESERVED
        and ((f.metadata and META_FORMAT in f.metadata) or guarded.get(f.name.casefold(), f.name) != f.name)
    ]
    return _ReadLayout(contract.names, plain_fields, types, list(contract.bind), modes, since, foreign)


def _layout_from_metadata(schema: pa.Schema, wanted: Sequence[str]) -> _ReadLayout:
    """The read layout the file's own field metadata describes (core use without a contract)."""
    sensitive = encrypted_columns(schema)
    layout = _ReadLayout(sensitive, {}, {}, [], {n: _SEALED for n in sensitive}, {n: 1 for n in sensitive}, _foreign_columns(schema))
    try:
        layout.binds = sorted({n for name in wanted for n in _bind_list(schema.field(name))})
        for name in wanted:
            f = decode_plain_field(schema.field(name).metadata[META_PLAIN])
            if f.name != name:
                raise DecryptionError()
            layout.plain_fields[name] = f
            # the type the plaintext will be read as, from the (untrusted) metadata: authenticated per cell
            layout.types[name] = _type_descriptor(f.type)
    except (DecryptionError, KeyError):
        layout.broken = True
    return layout


def shape_problems(schema: pa.Schema) -> list[str]:
    """What makes a batch unreadable as a whole: duplicated column names, or key columns of the wrong type.

    A hostile or broken file; every row of it is `corrupt` (kept, quarantined), never guessed at.
    """
    out = [f"column {n!r} appears {schema.names.count(n)} times" for n in sorted(set(schema.names)) if schema.names.count(n) > 1]
    if not out:
        if VERSION_COLUMN in schema.names and not pa.types.is_integer(schema.field(VERSION_COLUMN).type):
            out.append(f"{VERSION_COLUMN} is {schema.field(VERSION_COLUMN).type}, not an integer")
        if DEK_COLUMN in schema.names and not _is_binary_like(schema.field(DEK_COLUMN).type):
            out.append(f"{DEK_COLUMN} is {schema.field(DEK_COLUMN).type}, not binary")
    return out


def contract_violations(schema: pa.Schema, contract: DatasetContract, revision: int | None = None) -> list[str]:
    """Why a file with `schema` breaks `contract` (a contract column missing or not ciphertext); [] if it does not.

    `revision` is the newest contract revision among the file's DEKs: columns
    added to the contract after it are not required of the file. None (or 0)
    requires every contract column.
    """
    out = shape_problems(schema)
    if out:
        return out
    for c in contract.columns:
        if revision and c.since_revision > revision:
            continue
        if c.name not in schema.names:
            out.append(f"contract column {c.name!r} is missing")
        elif not _is_binary_like(schema.field(c.name).type):
            out.append(f"contract column {c.name!r} holds {schema.field(c.name).type}, not ciphertext")
    return out


def legacy_plain_columns(schema: pa.Schema, contract: DatasetContract) -> list[str]:
    """Contract columns a file holds in clear although the contract says ciphertext (data written before
    `dataset add-column` made them sensitive, or a downgrade): readers never return their values."""
    if shape_problems(schema):
        return []
    return [c.name for c in contract.columns if c.name in schema.names and not _is_binary_like(schema.field(c.name).type)]


def contract_schema(schema: pa.Schema, contract: DatasetContract) -> pa.Schema:
    """`schema` of an encrypted file with each contract column's field (and the key columns) as keyturn writes them.

    Restores what another engine stripped (field metadata, dictionary
    encoding of ``_keyturn_dek``), from the contract, never from the file.
    """
    bind_json = json.dumps(list(contract.bind)).encode()

    def sealed_field(name: str) -> pa.Field:
        meta = {META_FORMAT: b"1", META_PLAIN: encode_plain_field(contract.column(name).arrow_field()), META_BIND: bind_json}
        return pa.field(name, pa.binary(), nullable=True, metadata=meta)

    fields = []
    absent = [name for name in contract.names if name not in schema.names]  # added to the contract after the file
    for f in schema:
        if f.name in contract.names:
            fields.append(sealed_field(f.name))
        elif f.name == VERSION_COLUMN:
            fields.extend(sealed_field(name) for name in absent)
            absent = []
            fields.append(pa.field(VERSION_COLUMN, pa.int64(), nullable=True))
        elif f.name == DEK_COLUMN:
            fields.append(pa.field(DEK_COLUMN, _DEK_TYPE, nullable=True))
        else:
            fields.append(f)
    fields.extend(sealed_field(name) for name in absent)
    return pa.schema(fields, metadata=schema.metadata)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with `schema` (same column names and order), casting columns whose type differs."""
    if batch.schema.equals(schema, check_metadata=True):
        return batch
    return pa.RecordBatch.from_arrays(
        [col if col.type == f.type else col.cast(f.type) for col, f in zip(batch.columns, schema)], schema=schema
    )


# -- decrypt ----------------------------------------------------------------


@dataclass
class DecryptResult(StatusCounts):
    """Decrypted readable rows, and a status for every input row."""

    plain: pa.RecordBatch
    plain_status: list[ReadStatus]
    status: list[ReadStatus]
    versions: list[int | None]
    source: pa.RecordBatch = field(repr=False)

    def rows_with(self, *statuses: ReadStatus) -> pa.RecordBatch:
        """The original (still encrypted) input rows having any of `statuses`."""
        wanted = set(statuses)
        return self.source.take(pa.array([i for i, s in enumerate(self.status) if s in wanted], pa.int64()))


def decrypt_batch(
    batch: pa.RecordBatch,
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
    *,
    columns: Sequence[str] | None = None,
    contract: DatasetContract | None = None,
) -> DecryptResult:
    """Decrypt the current and stale rows of `batch`; classify every row.

    `columns` limits which encrypted columns are decrypted; the others are
    left out of `plain`. With the dataset's `contract` (every keyturn job
    passes one), the encrypted columns, their plain types and the bound
    row-key columns come from the contract, never from the file: a contract
    column that is missing or holds anything but ciphertext makes every row
    that needs it `corrupt` (rows under a DEK born before the column joined
    the contract read it as null: a clear value there is never returned), and a column
    whose metadata another engine stripped reads normally when its cells
    authenticate. Without a contract the file's field metadata describes the
    columns. KMS outages raise; bad data never does. A batch that lacks the
    key columns but has an encrypted column (or one key column of the two)
    raises `ValueError`: a projection of keyturn data must keep them.
    """
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"decrypt_batch needs a pyarrow.RecordBatch, not {type(batch).__name__}")
    if shape_problems(batch.schema):  # duplicated names or mistyped key columns: a hostile file, nothing is read
        return DecryptResult(
            pa.RecordBatch.from_pylist([]), [], [ReadStatus.CORRUPT] * batch.num_rows, [None] * batch.num_rows, batch
        )
    # A batch without the key columns cannot be classified. If it shows any sign of having been
    # encrypted (keyturn field metadata, a contract column holding binary, one key column of the two),
    # it is a projection that dropped them (a caller mistake), not rows that lack metadata: reading them
    # all as `missing` would lose them silently. Genuinely missing rows have the key columns with nulls,
    # or come from a file that never had keyturn columns (a reader of whole files that may lack them adds
    # them as nulls). A projection of plain columns only shows no such sign: readers must not make one.
    lacking = [name for name in _RESERVED if name not in batch.schema.names]
    if lacking:
        signs = encrypted_columns(batch.schema) + _foreign_columns(batch.schema)
        if contract is not None:  # binary where the contract's plain type is not: ciphertext stripped of metadata
            signs += [c for c in contract.names if c in batch.schema.names and c not in signs
                      and _is_binary_like(batch.schema.field(c).type)
                      and not _is_binary_like(contract.column(c).arrow_field().type)]
        if signs or len(lacking) < len(_RESERVED):
            what = f"encrypted column(s) {sorted(set(signs))}" if signs else f"{sorted(set(_RESERVED) - set(lacking))[0]!r}"
            raise ValueError(
                f"the batch lacks the key column(s) {', '.join(map(repr, lacking))} but has {what}: a projection "
                f"of keyturn data must keep {VERSION_COLUMN!r} and {DEK_COLUMN!r} (and any bound columns)"
            )
    if contract is not None:
        layout = _layout_from_contract(batch.schema, contract)
        wanted = layout.sensitive if columns is None else _column_names(columns, "columns")
    else:
        sensitive = encrypted_columns(batch.schema)
        wanted = sensitive if columns is None else _column_names(columns, "columns")
    unknown = set(wanted) - set(layout.sensitive if contract is not None else sensitive)
    if unknown:
        known = layout.sensitive if contract is not None else sensitive
        raise ValueError(f"not encrypted columns of this batch: {sorted(unknown)} (encrypted: {known})")
    if contract is None:
        layout = _layout_from_metadata(batch.schema, wanted)

    keys = _batch_keys(batch, policy, reader, location)
    codes = keys.codes
    for name in layout.foreign:  # cells this version cannot authenticate: never clear data
        codes[_valid(batch.column(name))] = _CORRUPT
    missing_binds = [b for b in layout.binds if b not in batch.schema.names]
    if layout.broken or missing_binds:
        codes[_readable(codes)] = _CORRUPT
    sealed = _mark_downgrades(layout, wanted if contract is None else layout.sensitive, codes, keys.revisions)
    opened = _open_columns(batch, reader, location, layout, [name for name in wanted if name in sealed], keys)

    readable = _rows_where(_readable(codes))
    rebuilt: dict[str, pa.Array] = {}
    plain_fields = dict(layout.plain_fields)
    try:
        for name in wanted:
            field_ = plain_fields.get(name, pa.field(name, pa.null()))
            pieces = opened.get(name)
            values = _plain_values(pieces, readable, batch.num_rows) if pieces else pa.nulls(len(readable), pa.binary())
            rebuilt[name] = from_plain_array(values, field_)
    except (DecryptionError, pa.ArrowException):  # plaintext does not fit the declared type: refuse every row
        codes[readable] = _CORRUPT
        readable = readable[:0]
        rebuilt = {}
        for name in wanted:
            try:
                rebuilt[name] = pa.array([], plain_fields[name].type)
            except (KeyError, pa.ArrowException, ValueError, TypeError):  # unusable declared type
                plain_fields[name] = pa.field(name, pa.null())
                rebuilt[name] = pa.nulls(0)

    take = None if len(readable) == batch.num_rows else pa.array(readable, pa.int64())
    arrays, fields = [], []
    skip = set(_RESERVED) | set(layout.foreign) | (set(layout.sensitive) - set(rebuilt))
    for f in batch.schema:
        if f.name in skip:
            continue
        if f.name in rebuilt:  # a column whose plain field could not be read comes out empty and null-typed
            fields.append(plain_fields.get(f.name, pa.field(f.name, pa.null())))
            arrays.append(rebuilt.pop(f.name))
        else:
            fields.append(f)
            arrays.append(batch.column(f.name) if take is None else batch.column(f.name).take(take))
    for name, array in rebuilt.items():  # contract columns absent from the file (rows that did not need them)
        fields.append(plain_fields[name])
        arrays.append(array)
    plain = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))
    return DecryptResult(plain, _status_list(codes[readable]), _status_list(codes), keys.versions, batch)


def _valid(array: pa.Array) -> np.ndarray:
    """Per row, whether `array` holds a value there."""
    if array.null_count == 0:
        return np.ones(len(array), dtype=bool)
    return array.is_valid().to_numpy(zero_copy_only=False)


def _mark_downgrades(layout: _ReadLayout, names: Sequence[str], codes: np.ndarray, revisions: np.ndarray) -> set[str]:
    """Mark corrupt each readable row that needs a column the file does not hold as ciphertext; the names it does hold so.

    A row under a DEK born before the column joined the contract (`dataset
    add-column`) does not need it: it reads the column as null unless it
    holds ciphertext. A plain value stored there is never returned, because
    nothing proves it is not forged (its row may name any old DEK), and it
    stays in the file untouched.
    """
    readable = _readable(codes)
    if not readable.any():
        return set()
    sealed = set()
    for name in names:
        if layout.modes[name] == _SEALED:
            sealed.add(name)
        else:  # a downgrade: plaintext (or nothing) where the contract says ciphertext
            codes[readable & (revisions >= layout.since[name])] = _CORRUPT
    return sealed


def _open_columns(
    batch: pa.RecordBatch,
    reader: DekReader,
    location: Location,
    layout: _ReadLayout,
    names: Sequence[str],
    keys: _BatchKeys,
) -> dict[str, list[tuple[np.ndarray, pa.Array]]]:
    """Decrypt the cells of `names` in the readable rows, DEK by DEK; a row with any cell that fails becomes corrupt.

    Per column, the pieces (rows, their plaintexts) that opened, rows
    ascending within a piece; rows with a null cell are in no piece. Marks
    `keys.codes` as it goes. KMS errors propagate.
    """
    codes = keys.codes
    out: dict[str, list[tuple[np.ndarray, pa.Array]]] = {}
    bindings: list[dict[str, bytes]] | None = None
    open_group = _open_group_native if native.native_available() else _open_group
    for name in names:
        rows = _rows_where(_readable(codes))
        if not len(rows):
            break
        if bindings is None and layout.binds:
            bindings = _bindings(batch, layout.binds)
        cells = _binary(batch.column(name))
        pieces = out[name] = []
        for envelope, group in _by_envelope(keys.envelope, rows):
            try:
                if envelope < 0:  # unreachable: a row without an envelope is `missing`
                    raise DecryptionError()
                dek = reader.open(keys.envelopes[envelope], location)
            except DecryptionError:
                codes[group] = _CORRUPT
                continue
            aad = _AadSource(location, name, dek.envelope.dek_id, layout.types[name], bindings)
            bad, good, plaintexts = open_group(dek, cells, group, aad)
            codes[bad] = _CORRUPT
            pieces.append((good, plaintexts))
    return out


def _by_envelope(envelope: np.ndarray | None, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """`rows` (ascending) grouped by their envelope index (None: all 0), each group still ascending."""
    if envelope is None:
        return [(0, rows)]
    of_rows = envelope[rows]
    if (of_rows == of_rows[0]).all():  # the common case: one DEK
        return [(int(of_rows[0]), rows)]
    order = np.argsort(of_rows, kind="stable")
    ordered = of_rows[order]
    cuts = np.flatnonzero(np.diff(ordered)) + 1
    return [(int(ordered[start]), group) for start, group in zip([0, *cuts.tolist()], np.split(rows[order], cuts))]


@dataclass(frozen=True)
class _AadSource:
    """The associated data of one column's cells under one DEK: one for all rows, or one per row with bindings."""

    location: Location
    field: str
    dek_id: bytes
    value_type: str
    bindings: list[dict[str, bytes]] | None

    def for_rows(self, rows: np.ndarray) -> bytes | list[bytes]:
        if self.bindings is None:
            return cell_aad_bytes(self.location, self.field, self.dek_id, self.value_type)
        return [cell_aad_bytes(self.location, self.field, self.dek_id, self.value_type, self.bindings[i]) for i in rows.tolist()]


_VERSION_BYTE = bytes([FORMAT_VERSION])
_PREFIX = 1 + DEK_ID_BYTES  # version byte + dek_id
_MAX_CELL = CELL_OVERHEAD + MAX_CELL_PLAINTEXT


def _open_group(
    dek: OpenedDek, cells: pa.Array, rows: np.ndarray, aad: _AadSource
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Open the cells of `rows` under `dek`: (rows with a bad cell, rows that opened, their plaintexts as binary).

    `OpenedDek.open_cell`'s checks on whole arrays: a non-null cell must be
    45 to 45 + 64 MiB bytes long and start with the version byte and this
    DEK's dek_id, and then authenticate (`OpenedDek.open_many`). Null cells
    are neither bad nor opened. Cells are decrypted `_OPEN_CHUNK` at a time,
    so their Python objects stay few and in cache.
    """
    group = cells if len(rows) == len(cells) else cells.take(pa.array(rows))
    lengths = pc.fill_null(pc.binary_length(group), 0).to_numpy()
    prefixed = pc.fill_null(pc.starts_with(group, _VERSION_BYTE + dek.envelope.dek_id), False).to_numpy(zero_copy_only=False)
    well = prefixed & (lengths >= CELL_OVERHEAD) & (lengths <= _MAX_CELL)  # a null cell is never prefixed
    bad = [rows[_valid(group) & ~well]]
    if not well.all():
        group, rows = group.filter(pa.array(well)), rows[well]
    opened, failures = [], False
    plain_lengths = lengths[well] - CELL_OVERHEAD  # AES-GCM's plaintext is its body less the 16-byte tag
    plaintexts = _BinaryBuilder(int(plain_lengths.sum()), len(rows))  # at most this
    shared = aad.for_rows(rows) if aad.bindings is None else None  # one associated data for every cell
    for lo in range(0, len(rows), _OPEN_CHUNK):
        chunk, chunk_rows = group.slice(lo, _OPEN_CHUNK), rows[lo : lo + _OPEN_CHUNK]
        chunk_lengths = plain_lengths[lo : lo + _OPEN_CHUNK]
        bodies = pc.binary_slice(chunk, CELL_HEADER_BYTES, _MAX_CELL).to_pylist()
        values, failed = dek.open_many(_nonce_list(chunk), bodies, aad.for_rows(chunk_rows) if shared is None else shared)
        if failed:
            keep = np.ones(len(chunk_rows), dtype=bool)
            keep[failed] = False
            bad.append(chunk_rows[~keep])
            chunk_rows, chunk_lengths, failures = chunk_rows[keep], chunk_lengths[keep], True
            values = [v for v in values if v is not None]
        opened.append(chunk_rows)
        plaintexts.add_joined(b"".join(values), chunk_lengths)  # type: ignore[arg-type]
    return np.concatenate(bad), _concat_rows(opened) if failures else rows, plaintexts.array()


_OPEN_CHUNK = 1 << 14  # cells decrypted per `open_many` call


def _open_group_native(
    dek: OpenedDek, cells: pa.Array, rows: np.ndarray, aad: _AadSource
) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """`_open_group` in one native kernel call: the same checks per cell, the same rows bad, opened and null.

    The kernel checks each non-null cell's length, version byte and dek_id,
    then authenticates it (`keyturn.native.open_cells`); a failed cell is a
    bad row and its plaintext is never returned.
    """
    group = cells if len(rows) == len(cells) else cells.take(pa.array(rows))
    opened = native.open_cells(dek.kernel_key(), dek.envelope.dek_id, group, aad.for_rows(rows))
    ok = opened.status == native.OPENED
    if ok.all():
        return opened.failed, rows, opened.values
    return rows[opened.failed], rows[ok], opened.values.filter(pa.array(ok))


def _nonce_list(cells: pa.Array) -> list[bytes]:
    """The 12-byte nonce of each (well-formed, non-null) cell, as `bytes`, without a Python loop."""
    nonces = pc.binary_slice(cells, _PREFIX, CELL_HEADER_BYTES)
    if not len(nonces):
        return []
    offsets = np.frombuffer(nonces.buffers()[1], dtype=np.int32)[nonces.offset : nonces.offset + len(nonces) + 1]
    data = np.frombuffer(nonces.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    if len(data) != NONCE_BYTES * len(nonces):  # unreachable for checked cells; never guess
        return nonces.to_pylist()
    return data.view(f"V{NONCE_BYTES}").tolist()


def _concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _plain_values(pieces: list[tuple[np.ndarray, pa.Array]], readable: np.ndarray, nrows: int) -> pa.Array:
    """The plaintexts of the `readable` rows as one binary array: null where a row has none."""
    if len(pieces) == 1 and np.array_equal(pieces[0][0], readable):  # the common case: every row, in order
        return pieces[0][1]
    values = _concat_binary([values for _, values in pieces])
    where = np.full(nrows, -1, dtype=np.int64)
    where[_concat_rows([rows for rows, _ in pieces])] = np.arange(len(values))
    index = where[readable]
    return values.take(pa.array(index, mask=index < 0))


def _concat_binary(arrays: list[pa.Array]) -> pa.Array:
    """Binary arrays as one (large_binary when they hold 2 GiB or more)."""
    if len(arrays) == 1:
        return arrays[0]
    if not arrays:
        return pa.array([], pa.binary())
    if sum(a.nbytes for a in arrays) >= (1 << 31) - 1 or any(a.type != pa.binary() for a in arrays):
        arrays = [a.cast(pa.large_binary()) for a in arrays]
    return pa.concat_arrays(arrays)


# -- rewrap -----------------------------------------------------------------


@dataclass
class RewrapResult(StatusCounts):
    """The batch with stale envelopes re-wrapped under the active version."""

    batch: pa.RecordBatch
    status: list[ReadStatus]
    deks_rewrapped: int
    kms_request_ids: list[str]


def rewrap_batch(batch: pa.RecordBatch, kms: KmsBackend, policy: KeyPolicy, location: Location) -> RewrapResult:
    """Re-wrap each distinct stale DEK once; cell bytes are untouched.

    Rows on other versions are left exactly as they were; `status` says why
    (a rewrapped row reports `stale`, its status before the rewrap).
    """
    status, versions, envelopes = _classify_rows(batch, policy)
    target = policy.active
    replaced, request_ids = rewrap_rows(kms, status, envelopes, location, target)
    if not any(replaced.values()):
        return RewrapResult(batch, status, 0, request_ids)

    new_envelopes = [replaced.get(env) or env if env is not None else None for env in envelopes]
    new_versions = [
        target.version if env is not None and replaced.get(env) else v for v, env in zip(versions, envelopes)
    ]
    dek_array = pa.array(new_envelopes, pa.binary()).dictionary_encode()
    if dek_array.indices.type != pa.int32():
        dek_array = dek_array.cast(_DEK_TYPE)
    idx_version = batch.schema.get_field_index(VERSION_COLUMN)
    idx_dek = batch.schema.get_field_index(DEK_COLUMN)
    arrays = list(batch.columns)
    arrays[idx_version] = pa.array(new_versions, batch.schema.field(idx_version).type)
    arrays[idx_dek] = dek_array.cast(batch.schema.field(idx_dek).type)
    out = pa.RecordBatch.from_arrays(arrays, schema=batch.schema)
    return RewrapResult(out, status, sum(1 for v in replaced.values() if v), request_ids)


# -- re-encrypt -------------------------------------------------------------


@dataclass
class ReencryptResult(StatusCounts):
    """The batch with readable rows sealed under fresh DEKs, others untouched."""

    batch: pa.RecordBatch
    status: list[ReadStatus]
    changed: bool = True


def reencrypt_batch(
    batch: pa.RecordBatch,
    reader: DekReader,
    scope: DekScope,
    policy: KeyPolicy,
    location: Location,
    *,
    contract: DatasetContract | None = None,
) -> ReencryptResult:
    """Decrypt readable rows and seal them again under `scope` (a fresh DEK).

    Unreadable rows (retired, unknown, missing, corrupt) are kept byte for
    byte, in place, with the envelope their cells name, so a lake rewrite
    never loses them. Row order is kept. With `contract`, the columns come
    from it (see `decrypt_batch`); a batch in which a contract column is
    missing or not ciphertext is returned unchanged (`changed` is False),
    because its rows could not be written back in one schema.
    """
    if scope.location != location:
        raise ValueError("the scope must belong to the same location as the batch")
    decrypted = decrypt_batch(batch, reader, policy, location, contract=contract)
    readable = [i for i, s in enumerate(decrypted.status) if s.readable]
    if not readable:
        return ReencryptResult(batch, decrypted.status, changed=False)
    if contract is not None:
        layout = _layout_from_contract(batch.schema, contract)
        # a contract column held in clear here (rows under DEKs older than the column): its stored values
        # cannot be proved genuine, so they are neither sealed nor dropped; the batch stays as it is.
        # An absent column is fine (its rows read it as null); unreadable rows must share the new schema
        modes = layout.modes.values()
        if any(mode == _PLAIN for mode in modes) or (any(mode == _ABSENT for mode in modes) and len(readable) < batch.num_rows):
            return ReencryptResult(batch, decrypted.status, changed=False)
        sensitive, binds = contract.names, list(contract.bind)
    else:
        sensitive = encrypted_columns(batch.schema)
        binds = sorted({n for name in sensitive for n in _bind_list(batch.schema.field(name))})
    if not readable:
        return ReencryptResult(batch, decrypted.status, changed=False)
    sealed = encrypt_batch(decrypted.plain, sensitive, scope, bind_columns=binds)
    # columns left out of `plain` (another keyturn format) are all null in readable rows: keep them as they are
    readable_take = pa.array(readable, pa.int64())
    if contract is not None:
        out_schema = contract_schema(batch.schema, contract)
    else:
        out_schema = pa.schema(
            [sealed.schema.field(f.name) if f.name in sealed.schema.names else f for f in batch.schema],
            metadata=batch.schema.metadata,
        )
    sealed = pa.RecordBatch.from_arrays(
        [
            sealed.column(f.name) if f.name in sealed.schema.names else batch.column(f.name).take(readable_take)
            for f in out_schema
        ],
        schema=out_schema,
    )
    if len(readable) == batch.num_rows:
        return ReencryptResult(sealed, decrypted.status)
    readable_set = set(readable)
    others = [i for i in range(batch.num_rows) if i not in readable_set]
    kept = batch.take(pa.array(others, pa.int64()))
    kept = pa.RecordBatch.from_arrays(
        [col if col.type == f.type else col.cast(f.type) for col, f in zip(kept.columns, out_schema)], schema=out_schema
    )
    combined = pa.Table.from_batches([sealed, kept]).combine_chunks()
    position = np.empty(batch.num_rows, dtype=np.int64)
    position[np.array(readable + others)] = np.arange(batch.num_rows)
    out = combined.take(pa.array(position)).to_batches()
    result = out[0] if len(out) == 1 else pa.Table.from_batches(out).combine_chunks().to_batches()[0]
    return ReencryptResult(result, decrypted.status)
