"""`DekScope`: one data key (DEK) per partition scope, with hard usage caps.

A scope is one partition's records within one bundle, or one partition
batch. It generates its first DEK lazily through the KMS (one
GenerateDataKey call), seals many cells with it, and takes a fresh DEK when
the next row would cross a cap on cells or plaintext bytes. All cells of one
row always share one DEK, so each row references exactly one envelope.

Nonces are a 96-bit big-endian counter per DEK, starting at 0. A DEK is
random, used only inside the scope that generated it, and never rebuilt from
its wrapped form for encryption, so a nonce can never repeat under a DEK.

With a `directory` (the key registry's DEK directory), every DEK is
registered, with its envelope, before the first cell is sealed under it; a
registration failure stops the scope before any ciphertext exists.

The plaintext DEK is used once to derive the cell key and the commitment,
then wiped; the scope keeps an `AESGCM` object and, where the native kernel
is loaded (`keyturn.native`), the 32-byte cell key in a `SecretKey` for the
kernel to read in place. `close()` wipes those keys and drops the ciphers.
A scope refuses pickling and its repr shows no key material.

Where `keyturn.native.native_available()` says so when sealing starts, the
kernel seals each field's run of rows under one DEK in one call; otherwise
the pure-Python path below does. Both give the same bytes, reserve each
run's nonces before sealing it and check the same caps.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from typing import TYPE_CHECKING, NoReturn

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyturn import native
from keyturn.context import MAX_VALUE_BYTES, encode_context
from keyturn.directory import DekDirectory, new_entry
from keyturn.errors import ScopeClosedError
from keyturn.format import (
    DEK_ID_BYTES,
    FORMAT_VERSION,
    MAX_CELL_PLAINTEXT,
    NONCE_BYTES,
    Envelope,
    cell_aad,
    derive_cell_key,
    derive_commitment,
    kms_context,
)
from keyturn.kms.base import KmsBackend
from keyturn.secret import SecretKey

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "KekRef",
    "ScopeLimits",
    "DekScope",
    "SealedRows",
    "SealedColumn",
    "SealedPart",
    "Sealing",
    "PlainColumn",
    "ColumnSizes",
    "Location",
    "nonce_block",
]

_MAX_NONCE = (1 << (8 * NONCE_BYTES)) - 1
_VERSION_BYTE = bytes([FORMAT_VERSION])
_CHUNK = 1 << 14  # rows sealed per part: bounds the temporary Python objects and keeps them in cache
_NATIVE_CHUNK = 1 << 20  # rows per native kernel call: large enough for its worker threads, bounds its output
_LOW = 1 << 64  # nonce_block writes the counter as a big-endian u32 (high) and u64 (low)
_NONCE_DTYPE = np.dtype([("high", ">u4"), ("low", ">u8")])  # 12 bytes, packed


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def nonce_block(first: int, count: int) -> np.ndarray:
    """Nonces `first` .. `first + count - 1` as a (count, 12) uint8 array: 96-bit big-endian counters.

    Row k equals ``(first + k).to_bytes(12, "big")`` (docs/FORMAT.md section 6).
    `OverflowError` if the run leaves the 96-bit nonce space.
    """
    if first < 0 or count < 0 or first + count - 1 > _MAX_NONCE:
        raise OverflowError("nonce space exhausted")
    out = np.empty(count, dtype=_NONCE_DTYPE)
    done = 0
    while done < count:  # one pass, unless the low 64 bits wrap inside the run
        high, low = divmod(first + done, _LOW)
        k = min(count - done, _LOW - low)
        out["high"][done : done + k] = high
        out["low"][done : done + k] = np.arange(k, dtype=np.uint64) + np.uint64(low)
        done += k
    return out.view(np.uint8).reshape(count, NONCE_BYTES)


def _nonce_list(block: np.ndarray) -> list[bytes]:
    """The rows of a `nonce_block` as 12-byte `bytes`, made without a Python loop."""
    return np.ascontiguousarray(block).view(f"V{NONCE_BYTES}").ravel().tolist()


@dataclass(frozen=True, slots=True)
class Location:
    """Where data belongs: bound into every cell's associated data."""

    dataset: str
    partition: str

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError("dataset must be a non-empty str")
        if not isinstance(self.partition, str):
            raise TypeError("partition must be a str ('' for an unpartitioned dataset)")


@dataclass(frozen=True, slots=True)
class KekRef:
    """A key version from the registry and the KMS key that implements it."""

    version: int
    kek_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or self.version < 1:
            raise ValueError("key version must be an int >= 1")
        if not self.kek_id:
            raise ValueError("kek_id must be non-empty")


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """Hard caps per DEK. At a cap the scope takes a fresh DEK."""

    max_cells: int = 1 << 32
    max_bytes: int = 1 << 36

    def __post_init__(self) -> None:
        if not isinstance(self.max_cells, int) or not 1 <= self.max_cells <= _MAX_NONCE:
            raise ValueError("max_cells must be an int in 1..2**96-1")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError("max_bytes must be an int >= 1")


@dataclass(frozen=True, slots=True)
class SealedPart:
    """What one DEK sealed of one field, in one of two shapes.

    Python path: `bodies[k]` (AES-GCM ciphertext and tag) belongs to row
    `rows[k]` and was sealed with nonce `nonces[k]` (a row of a
    `nonce_block`); a cell is `header` + nonce + body (docs/FORMAT.md
    section 4), which `cells()` frames in Python and a codec may frame in
    bulk. Native path: `framed` is a binary array of the framed cells of
    every row of `rows` (a range), null where the value was null; `nonces`
    is empty and `bodies` is empty.
    """

    dek_id: bytes
    nonces: np.ndarray = field(repr=False)
    rows: range | list[int] = field(repr=False)
    bodies: list[bytes] = field(repr=False)
    framed: pa.Array | None = field(default=None, repr=False)

    @property
    def header(self) -> bytes:
        """The bytes every cell of the part starts with: the format version byte and the dek_id."""
        return _VERSION_BYTE + self.dek_id

    @property
    def count(self) -> int:
        """How many cells the part sealed (nonces it used)."""
        if self.framed is not None:
            return len(self.framed) - self.framed.null_count
        return len(self.bodies)

    def cells(self) -> list[bytes | None]:
        """The framed cell ciphertexts, one per row of `rows`, in order (None only in a native part's null rows)."""
        if self.framed is not None:
            return self.framed.to_pylist()
        header = self.header
        return [header + nonce + body for nonce, body in zip(_nonce_list(self.nonces), self.bodies)]


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """One field's cells over `nrows` rows: the parts in row order; a row no part names is a null cell."""

    nrows: int
    parts: list[SealedPart]

    def cells(self) -> list[bytes | None]:
        """One framed cell per row, None for a null."""
        out: list[bytes | None] = [None] * self.nrows
        for part in self.parts:
            if isinstance(part.rows, range):
                out[part.rows.start : part.rows.stop] = part.cells()
            else:
                for i, cell in zip(part.rows, part.cells()):
                    out[i] = cell
        return out


@dataclass(slots=True)
class SealedRows:
    """The result of sealing rows: cells per field, and one envelope per row.

    `columns[j]` holds field j's cells (`cells[j]` lists them framed, None
    for nulls). `segments` are (envelope index, start, stop): rows
    start..stop-1 are sealed under `envelopes[index]`; `row_envelope[i]`
    indexes `envelopes` per row. `envelopes` lists each DEK used by this call
    once, in order of first use.
    """

    columns: list[SealedColumn]
    segments: list[tuple[int, int, int]]
    envelopes: list[bytes]
    nrows: int
    _cells: list[list[bytes | None]] | None = field(default=None, repr=False, compare=False)
    _row_envelope: list[int] | None = field(default=None, repr=False, compare=False)

    @property
    def cells(self) -> list[list[bytes | None]]:
        """Per field, one framed cell per row (None for nulls); built on first use."""
        if self._cells is None:
            self._cells = [column.cells() for column in self.columns]
        return self._cells

    @property
    def row_envelope(self) -> list[int]:
        """Per row, the index of its envelope in `envelopes`; built on first use."""
        if self._row_envelope is None:
            out = [0] * self.nrows
            for index, start, stop in self.segments:
                out[start:stop] = [index] * (stop - start)
            self._row_envelope = out
        return self._row_envelope


@dataclass
class Sealing:
    """A `DekScope.seal_stream` call: every row's DEK is chosen; iterating `parts` seals the cells.

    `segments` and `envelopes` are as in `SealedRows`. `parts` yields
    (field index, `SealedPart`) in sealing order; a field's parts are in row
    order.
    """

    nrows: int
    segments: list[tuple[int, int, int]]
    envelopes: list[bytes]
    parts: Iterator[tuple[int, SealedPart]] = field(repr=False)


class _ActiveDek:
    """A DEK in use: its envelope, cipher (and cell key for the native kernel), and usage counters. Never leaves the scope."""

    __slots__ = ("envelope", "dek_id", "aead", "cell_key", "next_nonce", "cells", "bytes")

    def __init__(self, envelope: bytes, dek_id: bytes, aead: AESGCM, cell_key: SecretKey | None) -> None:
        self.envelope = envelope
        self.dek_id = dek_id
        self.aead = aead
        self.cell_key = cell_key
        self.next_nonce = 0
        self.cells = 0
        self.bytes = 0

    def __reduce__(self) -> NoReturn:
        raise TypeError("a DEK never leaves its scope")


@dataclass
class ScopeStats:
    """What a scope did: for audit events and metrics. Holds no key material."""

    deks_generated: int = 0
    deks_registered: int = 0
    rows: int = 0
    cells: int = 0
    bytes: int = 0
    kms_request_ids: list[str] = field(default_factory=list)


class DekScope:
    """Seals cells for one partition scope. Use as a context manager."""

    def __init__(
        self,
        kms: KmsBackend,
        kek: KekRef,
        location: Location,
        *,
        limits: ScopeLimits = ScopeLimits(),
        random_bytes: Callable[[int], bytes] = os.urandom,
        directory: DekDirectory | None = None,
        actor: str = "keyturn",
        contract_revision: int = 0,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._kms = kms
        self.kek = kek
        self.location = location
        self.limits = limits
        self._random = random_bytes
        self._directory = directory
        self._actor = actor
        self._contract_revision = contract_revision
        self._clock = clock
        self._dek: _ActiveDek | None = None
        self._cell_keys: list[SecretKey] = []  # every DEK's cell key kept for the kernel, wiped on close
        self._closed = False
        self.stats = ScopeStats()

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> DekScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wipe the cell keys and drop the ciphers; the scope can no longer seal. Idempotent."""
        self._dek = None
        self._closed = True
        for key in self._cell_keys:
            key.wipe()
        self._cell_keys.clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def __reduce__(self) -> NoReturn:
        raise TypeError("DekScope refuses to be pickled: plaintext keys never leave their scope")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"DekScope({self.location.dataset!r}/{self.location.partition!r}, version={self.kek.version}, "
            f"{state}, deks={self.stats.deks_generated}, cells={self.stats.cells})"
        )

    # -- DEKs ------------------------------------------------------------
    def _fresh_dek(self) -> _ActiveDek:
        dek_id = self._random(DEK_ID_BYTES)
        if len(dek_id) != DEK_ID_BYTES:
            raise ValueError("random_bytes returned the wrong length")
        context = kms_context(
            dataset=self.location.dataset, partition=self.location.partition, dek_id=dek_id, key_version=self.kek.version
        )
        generated = self._kms.generate_data_key(self.kek.kek_id, context)
        cell_key = None
        try:
            material = generated.plaintext.material
            derived = derive_cell_key(material, dek_id)
            aead = AESGCM(derived)
            if native.kernel_loaded():
                cell_key = SecretKey(derived, label="cell key")
                self._cell_keys.append(cell_key)
            commitment = derive_commitment(material, dek_id)
        finally:
            generated.plaintext.wipe()
        del material, derived
        envelope = Envelope(dek_id, self.kek.version, self.kek.kek_id, commitment, generated.wrapped).to_bytes()
        if self._directory is not None:  # registered before any cell is sealed under it
            self._directory.register_deks(
                [
                    new_entry(
                        envelope,
                        dataset=self.location.dataset,
                        partition=self.location.partition,
                        created_at=self._clock(),
                        actor=self._actor,
                        contract_revision=self._contract_revision,
                    )
                ]
            )
            self.stats.deks_registered += 1
        self.stats.deks_generated += 1
        self.stats.kms_request_ids.append(generated.request_id)
        return _ActiveDek(envelope, dek_id, aead, cell_key)

    def _dek_for(self, cells: int, nbytes: int) -> _ActiveDek:
        """The DEK to seal a row of `cells` cells and `nbytes` bytes, rotating at a cap."""
        if cells > self.limits.max_cells or nbytes > self.limits.max_bytes:
            raise ValueError(
                f"one row needs {cells} cells / {nbytes} bytes, more than a DEK may seal "
                f"(max_cells={self.limits.max_cells}, max_bytes={self.limits.max_bytes})"
            )
        dek = self._dek
        if dek is None or dek.cells + cells > self.limits.max_cells or dek.bytes + nbytes > self.limits.max_bytes:
            dek = self._dek = self._fresh_dek()
        return dek

    # -- sealing ---------------------------------------------------------
    def seal_rows(
        self,
        fields: Sequence[str],
        columns: Sequence[Sequence[bytes | None] | PlainColumn],
        bindings: Sequence[Mapping[str, bytes]] | None = None,
        *,
        types: Sequence[str],
    ) -> SealedRows:
        """Seal `columns[j][i]` (row i of field j) and return cells plus envelopes.

        `None` values stay `None`. `types[j]` is the codec's descriptor of
        field j's plain type (e.g. ``arrow:int64``), bound into every cell of
        the field. `bindings[i]`, if given, maps row-key column names to
        serialized values bound into row i's associated data.
        """
        sealing = self.seal_stream(fields, columns, bindings, types=types)
        parts: list[list[SealedPart]] = [[] for _ in fields]
        for j, part in sealing.parts:
            parts[j].append(part)
        return SealedRows([SealedColumn(sealing.nrows, p) for p in parts], sealing.segments, sealing.envelopes, sealing.nrows)

    def seal_stream(
        self,
        fields: Sequence[str],
        columns: Sequence[Sequence[bytes | None] | PlainColumn],
        bindings: Sequence[Mapping[str, bytes]] | None = None,
        *,
        types: Sequence[str],
    ) -> Sealing:
        """`seal_rows`, streamed: every check and every DEK now, the cells as `Sealing.parts` is iterated.

        A column is a sequence of plaintexts (None for null) or a
        `PlainColumn`, which hands out its values `_CHUNK` rows at a time so
        a codec can convert, seal and frame a chunk while it is in cache.
        Parts come field by field, rows in order within a DEK: the nonces
        are exactly those `seal_rows` would use.
        """
        if self._closed:
            raise ScopeClosedError("this DEK scope is closed")
        if len(fields) != len(columns):
            raise ValueError("fields and columns must have the same length")
        types = check_types(fields, types)
        use_native = native.native_available()  # before any KMS call: KEYTURN_NATIVE=1 without the kernel fails here
        plain = [col if isinstance(col, PlainColumn) else _ListColumn(col) for col in columns]
        nrows = len(plain[0]) if plain else (len(bindings) if bindings is not None else 0)
        if any(len(col) != nrows for col in plain):
            raise ValueError("all columns must have the same number of rows")
        if bindings is not None and len(bindings) != nrows:
            raise ValueError("bindings must have one entry per row")
        sizes = [col.sizes() for col in plain]
        if any(size.longest > MAX_CELL_PLAINTEXT for size in sizes):
            raise ValueError(f"a cell value exceeds {MAX_CELL_PLAINTEXT} bytes")
        plan = self._plan_segments(plain, nrows, sizes)
        segments: list[tuple[int, int, int]] = []
        envelopes: list[bytes] = []
        for dek, start, stop in plan:
            if not envelopes or envelopes[-1] != dek.envelope:
                envelopes.append(dek.envelope)
            segments.append((len(envelopes) - 1, start, stop))
        self.stats.rows += nrows
        return Sealing(nrows, segments, envelopes, self._parts(plan, fields, types, plain, sizes, bindings, use_native))

    def _parts(
        self,
        plan: list[tuple[_ActiveDek, int, int]],
        fields: Sequence[str],
        types: Sequence[str],
        columns: Sequence[PlainColumn],
        sizes: Sequence[ColumnSizes],
        bindings: Sequence[Mapping[str, bytes]] | None,
        use_native: bool,
    ) -> Iterator[tuple[int, SealedPart]]:
        """Seal the planned runs: per DEK, field by field, a chunk of rows at a time; (field index, part).

        With `use_native`, a column that gives Arrow arrays (`PlainColumn.arrow`)
        is sealed one kernel call per `_NATIVE_CHUNK` rows; other columns
        (plain sequences, as the Avro codec passes) and every column without
        `use_native` go through `_seal_part`, `_CHUNK` rows at a time.
        """
        for dek, start, stop in plan:
            for j, (name, value_type, col, size) in enumerate(zip(fields, types, columns, sizes)):
                column = _SealColumn(name, value_type, col, bindings, size.nulls)
                kernel = use_native and col.arrow_backed and dek.cell_key is not None
                chunk, seal = (_NATIVE_CHUNK, self._seal_native) if kernel else (_CHUNK, self._seal_part)
                sealed = 0
                for lo in range(start, stop, chunk):
                    if self._closed:
                        raise ScopeClosedError("this DEK scope is closed")
                    part = seal(dek, column, lo, min(stop, lo + chunk))
                    sealed += part.count
                    yield j, part
                if len(plan) == 1 and sealed != size.cells:  # the column's sizes were wrong, so the caps were
                    if self._dek is dek:
                        self._dek = None  # never seal under it again
                    raise ValueError(f"column {name!r} reported {size.cells} values but held {sealed}")

    def _plan_segments(
        self, columns: Sequence[PlainColumn], nrows: int, sizes: Sequence[ColumnSizes]
    ) -> list[tuple[_ActiveDek, int, int]]:
        """Split rows into runs that each fit one DEK, generating DEKs as needed."""
        if nrows == 0:
            return []
        total_cells = sum(size.cells for size in sizes)
        total_bytes = sum(size.bytes for size in sizes)
        dek = self._dek
        limits = self.limits
        if dek is not None and dek.cells + total_cells <= limits.max_cells and dek.bytes + total_bytes <= limits.max_bytes:
            self._charge(dek, total_cells, total_bytes)
            return [(dek, 0, nrows)]
        if dek is None and total_cells <= limits.max_cells and total_bytes <= limits.max_bytes:
            dek = self._dek_for(0, 0)
            self._charge(dek, total_cells, total_bytes)
            return [(dek, 0, nrows)]
        values = [col.values(0, nrows) for col in columns]  # row by row from here: the rare case of a cap inside the call
        segments: list[tuple[_ActiveDek, int, int]] = []
        start = 0
        current: _ActiveDek | None = None
        for i in range(nrows):
            row_cells = 0
            row_bytes = 0
            for col in values:
                v = col[i]
                if v is not None:
                    row_cells += 1
                    row_bytes += len(v)
            dek = self._dek_for(row_cells, row_bytes)
            if dek is not current:
                if current is not None:
                    segments.append((current, start, i))
                current, start = dek, i
            self._charge(dek, row_cells, row_bytes)
        assert current is not None
        segments.append((current, start, nrows))
        return segments

    def _charge(self, dek: _ActiveDek, cells: int, nbytes: int) -> None:
        dek.cells += cells
        dek.bytes += nbytes
        self.stats.cells += cells
        self.stats.bytes += nbytes

    def _seal_part(self, dek: _ActiveDek, column: _SealColumn, start: int, stop: int) -> SealedPart:
        """Seal the non-null values of rows start..stop-1 of `column` under `dek`, taking its next nonces in row order.

        The nonces are reserved before the first cell is sealed, so a
        failure part way never lets a later call take them again.
        """
        rows: range | list[int] = range(start, stop)
        values = column.plain.values(start, stop)
        if column.nulls:
            rows = [i for i, v in zip(rows, values) if v is not None]
            values = [v for v in values if v is not None]
        first = self._reserve(dek, len(values))
        nonces = nonce_block(first, len(values))
        aad = self._aads(dek, column, rows)
        aads = repeat(aad) if isinstance(aad, bytes) else aad
        bodies = list(map(dek.aead.encrypt, _nonce_list(nonces), values, aads))
        return SealedPart(dek.dek_id, nonces, rows, bodies)

    def _seal_native(self, dek: _ActiveDek, column: _SealColumn, start: int, stop: int) -> SealedPart:
        """`_seal_part` in one native kernel call: the same nonces, the same bytes, nulls kept in place.

        The run's nonces are reserved before the call, so a failure part way
        never lets a later call take them again.
        """
        values = column.plain.arrow(start, stop)
        first = self._reserve(dek, native.cells_to_seal(values))
        aad = self._aads(dek, column, range(start, stop))
        assert dek.cell_key is not None
        framed = native.seal_cells(dek.cell_key.view(), dek.dek_id, first, values, aad)
        return SealedPart(dek.dek_id, _NO_NONCES, range(start, stop), [], framed)

    @staticmethod
    def _reserve(dek: _ActiveDek, count: int) -> int:
        """Take the next `count` nonces of `dek` before any is used; returns the first.

        `OverflowError` past 2**96 - 1 (unreachable with validated limits).
        Reserved before sealing, so a failure part way never lets a later
        call take them again.
        """
        first = dek.next_nonce
        if first + count - 1 > _MAX_NONCE:
            raise OverflowError("nonce space exhausted")
        dek.next_nonce = first + count
        return first

    def _aads(self, dek: _ActiveDek, column: _SealColumn, rows: Sequence[int]) -> bytes | list[bytes]:
        """One associated data for every cell of `column` (no bindings), or one per row of `rows`."""
        if column.bindings is None:
            return self._aad(dek, column.name, column.value_type, None)
        return [self._aad(dek, column.name, column.value_type, column.bindings[i]) for i in rows]

    def _aad(self, dek: _ActiveDek, name: str, value_type: str, row_bindings: Mapping[str, bytes] | None) -> bytes:
        """The encoded associated data of a cell of field `name` under `dek` (with its row's bindings, if any)."""
        loc = self.location
        return encode_context(
            cell_aad(
                dataset=loc.dataset,
                partition=loc.partition,
                field=name,
                dek_id=dek.dek_id,
                value_type=value_type,
                bindings=None if row_bindings is None else dict(row_bindings),
            )
        )


_NO_NONCES = np.empty((0, NONCE_BYTES), dtype=np.uint8)


@dataclass(frozen=True)
class _SealColumn:
    """One column of a seal: its field name and type descriptor (both in the cell AAD), its plain values,
    the rows' bindings (None: unbound) and whether it holds any null."""

    name: str
    value_type: str
    plain: PlainColumn
    bindings: Sequence[Mapping[str, bytes]] | None
    nulls: bool


def check_types(fields: Sequence[str], types: Sequence[str]) -> list[str]:
    """`types` as a list with one non-empty descriptor (str, at most MAX_VALUE_BYTES of UTF-8) per field."""
    if isinstance(types, (str, bytes)):
        raise TypeError("types must be a sequence of type descriptors (one per field), not one string")
    out = list(types)
    if len(out) != len(fields):
        raise ValueError(f"types must have one descriptor per field ({len(fields)} fields, {len(out)} types)")
    for name, t in zip(fields, out):
        if not isinstance(t, str) or not t:
            raise ValueError(f"the type descriptor of field {name!r} must be a non-empty str")
        if len(t.encode("utf-8")) > MAX_VALUE_BYTES:
            raise ValueError(f"the type descriptor of field {name!r} exceeds {MAX_VALUE_BYTES} bytes")
    return out


@dataclass(frozen=True, slots=True)
class ColumnSizes:
    """What the caps need of one field's plaintexts: the non-null values, their bytes, the longest, whether any is null.

    A `PlainColumn` must report `cells`, `bytes` and `nulls` exactly: the
    per-DEK caps are charged from them. `longest` may be any bound on the
    longest value that is exact once it passes `MAX_CELL_PLAINTEXT`.
    """

    cells: int
    bytes: int
    longest: int
    nulls: bool


class PlainColumn(ABC):
    """One field's plaintexts, as `DekScope.seal_stream` reads them: sizes first, then values by row range."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of rows."""

    @abstractmethod
    def sizes(self) -> ColumnSizes:
        """The exact sizes of the non-null values."""

    @abstractmethod
    def values(self, start: int, stop: int) -> Sequence[bytes | None]:
        """The plaintexts of rows start..stop-1, None for a null."""

    arrow_backed = False  # whether `arrow` gives the values as an Arrow array (the native kernel seals only those)

    def arrow(self, start: int, stop: int) -> pa.Array:
        """The plaintexts of rows start..stop-1 as a binary-like Arrow array, for the native kernel.

        Only for a column that sets `arrow_backed`: exactly the bytes
        `values` gives, null where a value is None.
        """
        raise NotImplementedError(f"{type(self).__name__} gives no Arrow arrays")


class _ListColumn(PlainColumn):
    """A sequence of plaintexts (None for null) as a `PlainColumn`."""

    __slots__ = ("_values",)

    def __init__(self, values: Sequence[bytes | None]) -> None:
        self._values = values

    def __len__(self) -> int:
        return len(self._values)

    def sizes(self) -> ColumnSizes:
        """One C-level pass when no value is None; the longest value is looked for only past the cap."""
        col = self._values
        try:
            cells, nbytes, nulls = len(col), sum(map(len, col)), False
        except TypeError:  # a None (or a value without a length, which raises again below)
            lengths = [len(v) for v in col if v is not None]
            cells, nbytes, nulls = len(lengths), sum(lengths), len(lengths) != len(col)
        longest = nbytes  # a bound, exact enough while under the cap
        if nbytes > MAX_CELL_PLAINTEXT:
            longest = max((len(v) for v in col if v is not None), default=0)
        return ColumnSizes(cells, nbytes, longest, nulls)

    def values(self, start: int, stop: int) -> Sequence[bytes | None]:
        col = self._values
        if start == 0 and stop == len(col) and isinstance(col, list):
            return col
        return col[start:stop]
