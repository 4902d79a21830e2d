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

from keyturn.arrow_values import (
    arrow_type_descriptor,
    decode_plain_field,
    encode_plain_field,
    from_plaintexts,
    to_plaintexts,
)
from keyturn.context import MAX_VALUE_BYTES
from keyturn.errors import DecryptionError
from keyturn.format import DEK_FIELD, VERSION_FIELD
from keyturn.kms.base import KmsBackend
from keyturn.policy import KeyPolicy, ReadStatus, classify_rows, count_statuses
from keyturn.reader import DekReader, open_rows
from keyturn.rewrap import rewrap_rows
from keyturn.scope import DekScope, Location

__all__ = [
    "VERSION_COLUMN",
    "DEK_COLUMN",
    "encrypt_batch",
    "decrypt_batch",
    "rewrap_batch",
    "reencrypt_batch",
    "encrypted_columns",
    "DecryptResult",
    "RewrapResult",
    "ReencryptResult",
]

VERSION_COLUMN = VERSION_FIELD  # aliases kept for compatibility; the names live in keyturn.format
DEK_COLUMN = DEK_FIELD
META_FORMAT = b"keyturn.format"
META_PLAIN = b"keyturn.plain_field"
META_BIND = b"keyturn.bind"
_CURRENT, _STALE = ReadStatus.CURRENT, ReadStatus.STALE  # identity checks in per-row loops
_RESERVED = (VERSION_COLUMN, DEK_COLUMN)
_DEK_TYPE = pa.dictionary(pa.int32(), pa.binary())


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
    batch: pa.RecordBatch, columns: Sequence[str], scope: DekScope, *, bind_columns: Sequence[str] = ()
) -> pa.RecordBatch:
    """Encrypt `columns` of `batch` under `scope`'s DEK(s); see the module docstring for the layout.

    `bind_columns` are non-sensitive columns whose values are bound into each
    row's cells. An empty batch makes no KMS call.
    """
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"encrypt_batch needs a pyarrow.RecordBatch, not {type(batch).__name__}")
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

    plaintexts = [to_plaintexts(batch.column(name)) for name in columns]
    types = [arrow_type_descriptor(batch.schema.field(name).type) for name in columns]
    sealed = scope.seal_rows(columns, plaintexts, _bindings(batch, bind_columns), types=types)
    sealed_by_name = dict(zip(columns, sealed.cells))

    bind_json = json.dumps(bind_columns).encode()
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for f, arr in zip(batch.schema, batch.columns):
        if f.name in sealed_by_name:
            meta = {META_FORMAT: b"1", META_PLAIN: encode_plain_field(f), META_BIND: bind_json}
            fields.append(pa.field(f.name, pa.binary(), nullable=True, metadata=meta))
            arrays.append(pa.array(sealed_by_name[f.name], pa.binary()))
        else:
            fields.append(f)
            arrays.append(arr)
    n = batch.num_rows
    fields.append(pa.field(VERSION_COLUMN, pa.int64(), nullable=True))
    arrays.append(pa.array(np.full(n, scope.kek.version, dtype=np.int64)))
    fields.append(pa.field(DEK_COLUMN, _DEK_TYPE, nullable=True))
    arrays.append(
        pa.DictionaryArray.from_arrays(
            pa.array(sealed.row_envelope, pa.int32()), pa.array(sealed.envelopes, pa.binary())
        )
    )
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))


# -- reading: per-row classification -----------------------------------------


def _row_keys(batch: pa.RecordBatch) -> tuple[list[int | None], list[bytes | None]]:
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
    versions, envelopes = _row_keys(batch)
    return classify_rows(policy, versions, envelopes), versions, envelopes


# -- decrypt ----------------------------------------------------------------


@dataclass
class DecryptResult:
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

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present (zeros included)."""
        return count_statuses(self.status)


def decrypt_batch(
    batch: pa.RecordBatch,
    reader: DekReader,
    policy: KeyPolicy,
    location: Location,
    *,
    columns: Sequence[str] | None = None,
) -> DecryptResult:
    """Decrypt the current and stale rows of `batch`; classify every row.

    `columns` limits which encrypted columns are decrypted; the others are
    left out of `plain`. KMS outages raise; bad data never does.
    """
    if not isinstance(batch, pa.RecordBatch):
        raise TypeError(f"decrypt_batch needs a pyarrow.RecordBatch, not {type(batch).__name__}")
    sensitive = encrypted_columns(batch.schema)
    wanted = sensitive if columns is None else _column_names(columns, "columns")
    unknown = set(wanted) - set(sensitive)
    if unknown:
        raise ValueError(f"not encrypted columns of this batch: {sorted(unknown)} (encrypted: {sensitive})")

    status, versions, envelopes = _classify_rows(batch, policy)
    foreign = _foreign_columns(batch.schema)
    for name in foreign:  # cells this version cannot authenticate: never clear data
        for i, valid in enumerate(batch.column(name).is_valid().to_pylist()):
            if valid:
                status[i] = ReadStatus.CORRUPT
    readable = [i for i, s in enumerate(status) if s is _CURRENT or s is _STALE]
    plain_fields: dict[str, pa.Field] = {}
    values: list[list[bytes | None]] = []
    types: list[str] = []
    try:
        binds = sorted({n for name in wanted for n in _bind_list(batch.schema.field(name))})
        bindings = _bindings(batch, binds)
        for name in wanted:
            plain_fields[name] = decode_plain_field(batch.schema.field(name).metadata[META_PLAIN])
            if plain_fields[name].name != name:
                raise DecryptionError()
            # the type the plaintext will be read as, from the (untrusted) metadata: authenticated per cell
            types.append(_type_descriptor(plain_fields[name].type))
    except (DecryptionError, KeyError):
        for i in readable:
            status[i] = ReadStatus.CORRUPT
        readable = []
    if readable:
        cells = [batch.column(name).to_pylist() for name in wanted]
        opened = open_rows(reader, location, wanted, cells, envelopes, readable, bindings, types=types)
        for i in opened.failed:
            status[i] = ReadStatus.CORRUPT
        readable = [i for i in readable if i not in opened.failed]
        values = opened.values

    take = pa.array(readable, pa.int64())
    rebuilt: dict[str, pa.Array] = {}
    try:
        for j, name in enumerate(wanted):
            column_values = [values[j][i] for i in readable] if readable else []
            rebuilt[name] = from_plaintexts(column_values, plain_fields.get(name, pa.field(name, pa.null())))
    except DecryptionError:  # plaintext does not fit the declared type: refuse every row
        for i in readable:
            status[i] = ReadStatus.CORRUPT
        readable, take = [], pa.array([], pa.int64())
        rebuilt = {}
        for name in wanted:
            try:
                rebuilt[name] = pa.array([], plain_fields[name].type)
            except (KeyError, pa.ArrowException, ValueError, TypeError):  # unusable declared type
                plain_fields[name] = pa.field(name, pa.null())
                rebuilt[name] = pa.nulls(0)

    arrays, fields = [], []
    for f in batch.schema:
        if f.name in _RESERVED or f.name in foreign or (f.name in sensitive and f.name not in rebuilt):
            continue
        if f.name in rebuilt:  # a column whose plain field could not be read comes out empty and null-typed
            fields.append(plain_fields.get(f.name, pa.field(f.name, pa.null())))
            arrays.append(rebuilt[f.name])
        else:
            fields.append(f)
            arrays.append(batch.column(f.name).take(take))
    plain = pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields, metadata=batch.schema.metadata))
    return DecryptResult(plain, [status[i] for i in readable], status, versions, batch)


# -- rewrap -----------------------------------------------------------------


@dataclass
class RewrapResult:
    """The batch with stale envelopes re-wrapped under the active version."""

    batch: pa.RecordBatch
    status: list[ReadStatus]
    deks_rewrapped: int
    kms_request_ids: list[str]

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present (zeros included)."""
        return count_statuses(self.status)


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
class ReencryptResult:
    """The batch with readable rows sealed under fresh DEKs, others untouched."""

    batch: pa.RecordBatch
    status: list[ReadStatus]

    def counts(self) -> dict[str, int]:
        """Rows per status, every status present (zeros included)."""
        return count_statuses(self.status)


def reencrypt_batch(
    batch: pa.RecordBatch, reader: DekReader, scope: DekScope, policy: KeyPolicy, location: Location
) -> ReencryptResult:
    """Decrypt readable rows and seal them again under `scope` (a fresh DEK).

    Unreadable rows (retired, unknown, missing, corrupt) are kept byte for
    byte, in place, so a lake rewrite never loses them. Row order is kept.
    """
    if scope.location != location:
        raise ValueError("the scope must belong to the same location as the batch")
    decrypted = decrypt_batch(batch, reader, policy, location)
    sensitive = encrypted_columns(batch.schema)
    readable = [i for i, s in enumerate(decrypted.status) if s.readable]
    if not readable:
        return ReencryptResult(batch, decrypted.status)
    binds = sorted({n for name in sensitive for n in _bind_list(batch.schema.field(name))})
    sealed = encrypt_batch(decrypted.plain, sensitive, scope, bind_columns=binds)
    # columns left out of `plain` (another keyturn format) are all null in readable rows: keep them as they are
    readable_take = pa.array(readable, pa.int64())
    sealed = pa.RecordBatch.from_arrays(
        [
            sealed.column(f.name) if f.name in sealed.schema.names else batch.column(f.name).take(readable_take)
            for f in batch.schema
        ],
        schema=batch.schema,
    )
    if len(readable) == batch.num_rows:
        return ReencryptResult(sealed, decrypted.status)
    readable_set = set(readable)
    others = [i for i in range(batch.num_rows) if i not in readable_set]
    combined = pa.Table.from_batches([sealed, batch.take(pa.array(others, pa.int64()))]).combine_chunks()
    position = np.empty(batch.num_rows, dtype=np.int64)
    position[np.array(readable + others)] = np.arange(batch.num_rows)
    out = combined.take(pa.array(position)).to_batches()
    result = out[0] if len(out) == 1 else pa.Table.from_batches(out).combine_chunks().to_batches()[0]
    return ReencryptResult(result, decrypted.status)
