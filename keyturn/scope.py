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
then wiped; the scope keeps only an `AESGCM` object, and drops it on
`close()`. A scope refuses pickling and its repr shows no key material.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import NoReturn

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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

__all__ = ["KekRef", "ScopeLimits", "DekScope", "SealedRows", "Location"]

_MAX_NONCE = (1 << (8 * NONCE_BYTES)) - 1


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)
_CHUNK = 1 << 16  # cells sealed per comprehension; bounds the temporary list of nonces


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


@dataclass(slots=True)
class SealedRows:
    """The result of sealing rows: cells per field, and one envelope per row.

    `row_envelope[i]` indexes `envelopes`; `envelopes` lists each DEK used by
    this call once, in order of first use.
    """

    cells: list[list[bytes | None]]
    row_envelope: list[int]
    envelopes: list[bytes]


class _ActiveDek:
    """A DEK in use: its envelope, cipher, and usage counters. Never leaves the scope."""

    __slots__ = ("envelope", "dek_id", "aead", "next_nonce", "cells", "bytes")

    def __init__(self, envelope: bytes, dek_id: bytes, aead: AESGCM) -> None:
        self.envelope = envelope
        self.dek_id = dek_id
        self.aead = aead
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
        self._closed = False
        self.stats = ScopeStats()

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> DekScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drop the cipher; the scope can no longer seal. Idempotent."""
        self._dek = None
        self._closed = True

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
        try:
            material = generated.plaintext.material
            aead = AESGCM(derive_cell_key(material, dek_id))
            commitment = derive_commitment(material, dek_id)
        finally:
            generated.plaintext.wipe()
        del material
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
        return _ActiveDek(envelope, dek_id, aead)

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
        columns: Sequence[Sequence[bytes | None]],
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
        if self._closed:
            raise ScopeClosedError("this DEK scope is closed")
        if len(fields) != len(columns):
            raise ValueError("fields and columns must have the same length")
        types = check_types(fields, types)
        nrows = len(columns[0]) if columns else (len(bindings) if bindings is not None else 0)
        if any(len(col) != nrows for col in columns):
            raise ValueError("all columns must have the same number of rows")
        if bindings is not None and len(bindings) != nrows:
            raise ValueError("bindings must have one entry per row")
        lengths = [_value_lengths(col) for col in columns]
        if any(col_lengths and max(col_lengths) > MAX_CELL_PLAINTEXT for col_lengths in lengths):
            raise ValueError(f"a cell value exceeds {MAX_CELL_PLAINTEXT} bytes")

        segments = self._plan_segments(columns, nrows, lengths)
        cells: list[list[bytes | None]] = [[None] * nrows for _ in columns]
        row_envelope = [0] * nrows
        envelopes: list[bytes] = []
        for dek, start, stop in segments:
            if not envelopes or envelopes[-1] != dek.envelope:
                envelopes.append(dek.envelope)
            env_index = len(envelopes) - 1
            row_envelope[start:stop] = [env_index] * (stop - start)
            for name, value_type, col, out in zip(fields, types, columns, cells):
                self._seal_column(dek, name, value_type, col, out, start, stop, bindings)
        self.stats.rows += nrows
        return SealedRows(cells, row_envelope, envelopes)

    def _plan_segments(
        self, columns: Sequence[Sequence[bytes | None]], nrows: int, lengths: Sequence[Sequence[int]]
    ) -> list[tuple[_ActiveDek, int, int]]:
        """Split rows into runs that each fit one DEK, generating DEKs as needed.

        `lengths[j]` lists the lengths of column j's non-None values (see `_value_lengths`).
        """
        if nrows == 0:
            return []
        total_cells = sum(len(col_lengths) for col_lengths in lengths)
        total_bytes = sum(sum(col_lengths) for col_lengths in lengths)
        dek = self._dek
        limits = self.limits
        if dek is not None and dek.cells + total_cells <= limits.max_cells and dek.bytes + total_bytes <= limits.max_bytes:
            self._charge(dek, total_cells, total_bytes)
            return [(dek, 0, nrows)]
        if dek is None and total_cells <= limits.max_cells and total_bytes <= limits.max_bytes:
            dek = self._dek_for(0, 0)
            self._charge(dek, total_cells, total_bytes)
            return [(dek, 0, nrows)]
        segments: list[tuple[_ActiveDek, int, int]] = []
        start = 0
        current: _ActiveDek | None = None
        for i in range(nrows):
            row_cells = 0
            row_bytes = 0
            for col in columns:
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

    def _seal_column(
        self,
        dek: _ActiveDek,
        name: str,
        value_type: str,
        col: Sequence[bytes | None],
        out: list[bytes | None],
        start: int,
        stop: int,
        bindings: Sequence[Mapping[str, bytes]] | None,
    ) -> None:
        loc = self.location
        header = bytes([FORMAT_VERSION]) + dek.dek_id
        encrypt = dek.aead.encrypt
        counter = dek.next_nonce
        if bindings is None:
            aad = encode_context(
                cell_aad(dataset=loc.dataset, partition=loc.partition, field=name, dek_id=dek.dek_id, value_type=value_type)
            )
            for lo in range(start, stop, _CHUNK):
                hi = min(stop, lo + _CHUNK)
                values = col[lo:hi]
                if _count_none(values):
                    for i in range(lo, hi):
                        value = col[i]
                        if value is not None:
                            nonce = counter.to_bytes(12, "big")
                            counter += 1
                            out[i] = header + nonce + encrypt(nonce, value, aad)
                else:
                    # No nulls (the common case): the same nonces in the same
                    # order as the loop above, built in two comprehensions.
                    nonces = [c.to_bytes(12, "big") for c in range(counter, counter + (hi - lo))]
                    out[lo:hi] = [header + nonce + encrypt(nonce, value, aad) for nonce, value in zip(nonces, values)]
                    counter += hi - lo
        else:
            for i in range(start, stop):
                value = col[i]
                if value is not None:
                    aad = encode_context(
                        cell_aad(
                            dataset=loc.dataset,
                            partition=loc.partition,
                            field=name,
                            dek_id=dek.dek_id,
                            value_type=value_type,
                            bindings=dict(bindings[i]),
                        )
                    )
                    nonce = counter.to_bytes(12, "big")
                    counter += 1
                    out[i] = header + nonce + encrypt(nonce, value, aad)
        if counter > _MAX_NONCE:  # unreachable with validated limits; a last guard
            raise OverflowError("nonce space exhausted")
        dek.next_nonce = counter


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


def _value_lengths(col: Sequence[bytes | None]) -> list[int]:
    """The lengths of the non-None values of `col`, in order."""
    if _count_none(col):
        return [len(v) for v in col if v is not None]
    return list(map(len, col))


def _count_none(col: Sequence[bytes | None]) -> int:
    try:
        return col.count(None)  # type: ignore[union-attr]
    except AttributeError:
        return sum(1 for v in col if v is None)
