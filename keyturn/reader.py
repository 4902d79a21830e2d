"""`DekReader`: opens DEK envelopes for reading, within one scope.

A reader unwraps each distinct envelope once (one KMS Decrypt call), checks
the key commitment before any cell is touched, and keeps the cell cipher only
until `close()`. Opened DEKs can only decrypt: encryption needs a fresh DEK
from a `DekScope`, so a nonce is never reused.

`open_rows` is the Avro codec's read path: it turns sealed cells back into
plaintext, row by row, and reports rows that fail to authenticate instead of
raising, so callers can quarantine them. The Arrow codec checks cells with
Arrow kernels and decrypts them in bulk with `OpenedDek.open_many`, under the
same rules.

An opened DEK keeps its cell cipher and, where the native kernel is loaded,
its 32-byte cell key in a `SecretKey` for `keyturn.arrow_codec` to hand the
kernel; `DekReader.close()` wipes the cell key of every DEK it opened and
forgets them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyturn.context import encode_context
from keyturn.directory import DekDirectory, DekEntry, entry_matches
from keyturn.errors import DecryptionError, KmsError, ScopeClosedError
from keyturn.format import (
    CELL_HEADER_BYTES,
    CELL_OVERHEAD,
    DEK_ID_BYTES,
    FORMAT_VERSION,
    MAX_CELL_PLAINTEXT,
    Envelope,
    cell_aad,
    commitment_matches,
    derive_cell_key,
    kms_context,
    parse_cell_header,
    parse_envelope,
)
from keyturn import native
from keyturn.kms.base import KmsBackend
from keyturn.scope import Location, check_types
from keyturn.secret import SecretKey

__all__ = ["DekReader", "OpenedDek", "open_rows", "OpenedRows", "envelope_dek_id", "entry_matches", "cell_aad_bytes"]

_PREFIX = 1 + DEK_ID_BYTES  # format version byte + dek_id
_MAX_CELL = CELL_OVERHEAD + MAX_CELL_PLAINTEXT


class OpenedDek:
    """An unwrapped, commitment-checked DEK that can only decrypt cells."""

    __slots__ = ("envelope", "_aead", "_cell_key")

    def __init__(self, envelope: Envelope, aead: AESGCM, cell_key: SecretKey | None = None) -> None:
        self.envelope = envelope
        self._aead = aead
        self._cell_key = cell_key

    def kernel_key(self) -> memoryview:
        """The cell key for one native kernel call, as a read-only view (no copy); wiped when the reader closes.

        `ScopeClosedError` once closed; `RuntimeError` if it was opened without the kernel loaded.
        """
        if self._cell_key is None:
            raise RuntimeError("this DEK was opened without the native kernel")
        if self._cell_key.wiped:
            raise ScopeClosedError("this reader is closed")
        return self._cell_key.view()

    def close(self) -> None:
        """Wipe the cell key kept for the native kernel (`kernel_key` then refuses). Idempotent.

        The cipher object stays, as it always has: the reader only forgets
        it, and code that still holds this `OpenedDek` may open cells in Python.
        """
        if self._cell_key is not None:
            self._cell_key.wipe()

    def open_cell(self, cell: bytes, aad: bytes) -> bytes:
        """Decrypt one cell; `DecryptionError` if it is not exactly what this DEK sealed with `aad`."""
        header = parse_cell_header(cell)
        if header.dek_id != self.envelope.dek_id:
            raise DecryptionError()
        try:
            return self._aead.decrypt(header.nonce, bytes(cell[CELL_HEADER_BYTES:]), aad)
        except InvalidTag:
            raise DecryptionError() from None

    def open_cells(
        self, column: Sequence[bytes | None], rows: Sequence[int], aad: bytes, out: list[bytes | None], failed: set[int]
    ) -> None:
        """Decrypt `column[i]` into `out[i]` for each i in `rows`, all under one `aad`.

        The batch form of `open_cell` (same checks, no per-cell objects): a
        cell that fails any check adds its row to `failed`; nulls are skipped.
        """
        decrypt = self._aead.decrypt
        prefix = bytes([FORMAT_VERSION]) + self.envelope.dek_id
        for i in rows:
            cell = column[i]
            if cell is None:
                continue
            if type(cell) is not bytes or not (CELL_OVERHEAD <= len(cell) <= _MAX_CELL and cell.startswith(prefix)):
                failed.add(i)
                continue
            try:
                out[i] = decrypt(cell[_PREFIX:CELL_HEADER_BYTES], cell[CELL_HEADER_BYTES:], aad)
            except InvalidTag:
                failed.add(i)

    def open_many(
        self, nonces: Sequence[bytes], bodies: Sequence[bytes], aad: bytes | Sequence[bytes]
    ) -> tuple[list[bytes | None], list[int]]:
        """Decrypt `bodies[k]` (a cell's ciphertext and tag) with `nonces[k]`; (plaintexts, failed positions).

        The bulk form of `open_cell` after its framing checks: the caller has
        checked each cell (length bounds, version byte, this DEK's dek_id) and
        split off its 12-byte nonce. `aad` is one associated data for every
        cell, or one per cell. A body that fails authentication gives None
        and its position in the failed list; no wrong plaintext is returned.
        """
        aads = repeat(aad) if isinstance(aad, bytes) else aad
        decrypt = self._aead.decrypt
        try:
            return list(map(decrypt, nonces, bodies, aads)), []
        except InvalidTag:  # some cell is bad: find which, one by one
            pass
        aads = repeat(aad) if isinstance(aad, bytes) else aad
        out: list[bytes | None] = []
        failed: list[int] = []
        for k, (nonce, body, one_aad) in enumerate(zip(nonces, bodies, aads)):
            try:
                out.append(decrypt(nonce, body, one_aad))
            except InvalidTag:
                out.append(None)
                failed.append(k)
        return out, failed

    def __reduce__(self) -> NoReturn:
        raise TypeError("an opened DEK never leaves its scope")

    def __repr__(self) -> str:
        return f"OpenedDek({self.envelope!r})"


@dataclass
class ReaderStats:
    """What a reader did. Holds no key material."""

    unwraps: int = 0
    lookups: int = 0
    kms_request_ids: list[str] = field(default_factory=list)


class DekReader:
    """Unwraps envelopes for one read scope (e.g. a bundle). Use as a context manager.

    With a `directory` (the key registry's DEK directory), the envelope a row
    carries is only its *birth* envelope: the reader looks each DEK up in
    the directory (`entries`, one round trip for all DEKs it has not seen
    yet) and unwraps the directory's current envelope, so a DEK rewrapped in
    the directory reads without any change to the data. A DEK the directory
    does not know is never guessed at: `open` refuses it and classification
    calls it ``unknown``. Entries are cached for the reader's life only.
    Without a directory the row's envelope is unwrapped as it is (core use
    without a key home).
    """

    def __init__(self, kms: KmsBackend, *, directory: DekDirectory | None = None) -> None:
        self._kms = kms
        self._directory = directory
        self._entries: dict[bytes, DekEntry | None] = {}
        self._opened: dict[tuple[bytes, str, str], OpenedDek] = {}
        self._failed: set[tuple[bytes, str, str]] = set()
        self._closed = False
        self.stats = ReaderStats()

    def entries(self, envelopes: Iterable[bytes | None]) -> dict[bytes, DekEntry | None] | None:
        """dek_id -> directory entry (None: not registered) for the DEKs these row envelopes name.

        None when the reader has no directory. Envelopes that do not parse
        are skipped (classification calls their rows corrupt). One directory
        lookup for all dek ids not seen before by this reader.
        """
        if self._directory is None:
            return None
        if self._closed:
            raise ScopeClosedError("this reader is closed")
        ids: set[bytes] = set()
        for env in set(envelopes):
            if env is None:
                continue
            dek_id = envelope_dek_id(env)
            if dek_id is not None:
                ids.add(dek_id)
        unseen = [d for d in ids if d not in self._entries]
        if unseen:
            found = self._directory.lookup_deks(unseen)
            self.stats.lookups += 1
            for d in unseen:
                self._entries[d] = found.get(d)
        return {d: self._entries[d] for d in ids}

    def __enter__(self) -> DekReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wipe and forget every opened DEK, and forget every directory entry. Idempotent."""
        for opened in self._opened.values():
            opened.close()
        self._opened.clear()
        self._failed.clear()
        self._entries.clear()
        self._closed = True

    def __reduce__(self) -> NoReturn:
        raise TypeError("DekReader refuses to be pickled: plaintext keys never leave their scope")

    def __repr__(self) -> str:
        return f"DekReader(opened={len(self._opened)}, unwraps={self.stats.unwraps}, closed={self._closed})"

    def open(self, envelope_bytes: bytes, location: Location) -> OpenedDek:
        """Unwrap and verify an envelope for data at `location`.

        `DecryptionError` if the envelope is malformed, bound elsewhere, or
        its commitment does not match. KMS outages raise `KmsError` subclasses
        (never mistake an outage for bad data).
        """
        if self._closed:
            raise ScopeClosedError("this reader is closed")
        key = (bytes(envelope_bytes), location.dataset, location.partition)
        opened = self._opened.get(key)
        if opened is not None:
            return opened
        if key in self._failed:  # one KMS call per bad envelope, not one per row
            raise DecryptionError()
        try:
            opened = self._opened[key] = self._unwrap(envelope_bytes, location)
        except DecryptionError:
            self._failed.add(key)
            raise
        return opened

    def _unwrap(self, envelope_bytes: bytes, location: Location) -> OpenedDek:
        envelope = parse_envelope(envelope_bytes)
        if self._directory is not None:
            envelope = self._current(envelope, location)
        context = kms_context(
            dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=envelope.key_version
        )
        try:
            unwrapped = self._kms.decrypt(envelope.kek_id, envelope.wrapped_dek, context)
        except KmsError:  # an outage or a closed client is never a verdict on the data
            raise
        except (ValueError, TypeError):  # the KMS refused an argument that came from the data
            raise DecryptionError() from None
        self.stats.unwraps += 1
        self.stats.kms_request_ids.append(unwrapped.request_id)
        try:
            material = unwrapped.plaintext.material
            if not commitment_matches(material, envelope):
                raise DecryptionError()
            derived = derive_cell_key(material, envelope.dek_id)
            aead = AESGCM(derived)
            cell_key = SecretKey(derived, label="cell key") if native.kernel_loaded() else None
            del derived
        finally:
            unwrapped.plaintext.wipe()
        del material
        return OpenedDek(envelope, aead, cell_key)


    def _current(self, birth: Envelope, location: Location) -> Envelope:
        """The directory's current envelope for the DEK `birth` names; `DecryptionError` unless it matches."""
        entries = self.entries([birth.to_bytes()]) or {}
        entry = entries.get(birth.dek_id)
        if entry is None or not entry_matches(entry, birth, location):
            raise DecryptionError()
        return parse_envelope(entry.envelope)


def envelope_dek_id(envelope_bytes: bytes) -> bytes | None:
    """The dek_id an envelope names, or None if it does not parse."""
    try:
        return parse_envelope(envelope_bytes).dek_id
    except DecryptionError:
        return None


def cell_aad_bytes(
    location: Location, field: str, dek_id: bytes, value_type: str, bindings: Mapping[str, bytes] | None = None
) -> bytes:
    """The encoded associated data of a cell of `field` at `location` under the DEK `dek_id` (docs/FORMAT.md section 8)."""
    return encode_context(
        cell_aad(
            dataset=location.dataset,
            partition=location.partition,
            field=field,
            dek_id=dek_id,
            value_type=value_type,
            bindings=None if bindings is None else dict(bindings),
        )
    )


@dataclass(slots=True)
class OpenedRows:
    """Plaintext per field (None for null or failed cells) and the rows that failed."""

    values: list[list[bytes | None]]
    failed: set[int]


def open_rows(
    reader: DekReader,
    location: Location,
    fields: Sequence[str],
    cells: Sequence[Sequence[bytes | None]],
    row_envelopes: Sequence[bytes | None],
    rows: Sequence[int],
    bindings: Sequence[Mapping[str, bytes]] | None = None,
    *,
    types: Sequence[str],
) -> OpenedRows:
    """Decrypt `cells[j][i]` for each i in `rows`, using row i's envelope.

    `types[j]` is the descriptor of field j's plain type as the caller will
    interpret the plaintext (taken from the data's metadata); a descriptor
    other than the one the cell was sealed with fails authentication. A row
    whose envelope or any cell fails to authenticate is listed in `failed`
    and none of its values are returned. KMS errors propagate.
    """
    if len(fields) != len(cells):
        raise ValueError("fields and cells must have the same length")
    types = check_types(fields, types)
    values: list[list[bytes | None]] = [[None] * len(col) for col in cells]
    failed: set[int] = set()
    by_envelope: dict[bytes | None, list[int]] = {}
    if len(set(row_envelopes)) == 1:  # the common case: one DEK for the whole batch
        by_envelope[row_envelopes[0]] = list(rows)
    else:
        for i in rows:
            by_envelope.setdefault(row_envelopes[i], []).append(i)
    for envelope_bytes, group in by_envelope.items():
        try:
            if envelope_bytes is None:
                raise DecryptionError()
            dek = reader.open(envelope_bytes, location)
        except DecryptionError:
            failed.update(group)
            continue
        dek_id = dek.envelope.dek_id
        for j, (name, value_type) in enumerate(zip(fields, types)):
            if bindings is None:
                dek.open_cells(cells[j], group, cell_aad_bytes(location, name, dek_id, value_type), values[j], failed)
            else:
                for i in group:
                    aad = cell_aad_bytes(location, name, dek_id, value_type, bindings[i])
                    dek.open_cells(cells[j], (i,), aad, values[j], failed)
    for i in failed:
        for col in values:
            col[i] = None
    return OpenedRows(values, failed)
