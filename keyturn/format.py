"""Wire format v1: cell ciphertexts and DEK envelopes, byte by byte.

docs/FORMAT.md is the normative description; keep the two in step.

Cell ciphertext (one encrypted value)::

    offset  size  field
    0       1     format version, 0x01 (checked first)
    1       16    dek_id: reference to the DEK envelope that sealed it
    17      12    nonce: 96-bit big-endian counter, unique per DEK
    29      n     AES-256-GCM ciphertext of the serialized value
    29+n    16    GCM tag

DEK envelope (one per DEK; every row references one)::

    offset  size  field
    0       1     format version, 0x01 (checked first)
    1       1     algorithm id, 0x01 = AES-256-GCM with HKDF-SHA256 subkeys
    2       16    dek_id (random)
    18      4     key version, u32 big-endian, >= 1 (the registry version of the KEK)
    22      2     K = KEK id length, u16 big-endian, 1..1024
    24      K     KEK id, UTF-8
    24+K    32    key commitment
    56+K    2     W = wrapped DEK length, u16 big-endian, 1..4096
    58+K    W     wrapped DEK (opaque to this layer; produced by the KMS)

The envelope ends exactly there; trailing bytes are an error.

Keys: the 32-byte DEK is never used directly. HKDF-SHA256 (salt = dek_id)
derives the cell key (info ``keyturn/v1/cell-key``) and the commitment
(info ``keyturn/v1/commitment``). A reader unwraps the DEK, recomputes the
commitment and compares in constant time before touching any cell, so a
substituted DEK is caught.

The wrapped DEK is bound by the KMS to `kms_context()`: dataset, partition,
dek_id and key version. Any change to those envelope fields fails the unwrap.

Every parse or authentication failure raises `DecryptionError`, with the
same message whatever the cause.
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyturn.errors import DecryptionError

__all__ = [
    "FORMAT_VERSION",
    "ALG_AES256_GCM_HKDF",
    "DEK_BYTES",
    "DEK_ID_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "CELL_OVERHEAD",
    "MAX_CELL_PLAINTEXT",
    "MAX_KEK_ID_BYTES",
    "MAX_WRAPPED_DEK_BYTES",
    "Envelope",
    "CellHeader",
    "parse_envelope",
    "parse_cell_header",
    "derive_cell_key",
    "derive_commitment",
    "kms_context",
    "cell_aad",
    "VERSION_FIELD",
    "DEK_FIELD",
]

FORMAT_VERSION = 0x01
ALG_AES256_GCM_HKDF = 0x01
DEK_BYTES = 32
DEK_ID_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
COMMITMENT_BYTES = 32
CELL_HEADER_BYTES = 1 + DEK_ID_BYTES + NONCE_BYTES
CELL_OVERHEAD = CELL_HEADER_BYTES + TAG_BYTES
MAX_CELL_PLAINTEXT = 64 * 1024 * 1024
MAX_KEK_ID_BYTES = 1024
MAX_WRAPPED_DEK_BYTES = 4096
MAX_KEY_VERSION = 0xFFFFFFFF

# Row-level key metadata, the same names in every codec (Arrow columns, Avro fields).
VERSION_FIELD = "_keyturn_version"  # the key version of the row's DEK
DEK_FIELD = "_keyturn_dek"  # the row's DEK envelope

_VERSION_BYTE = bytes([FORMAT_VERSION])
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_CELL_KEY_INFO = b"keyturn/v1/cell-key"
_COMMITMENT_INFO = b"keyturn/v1/commitment"


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed DEK envelope. Holds no plaintext key."""

    dek_id: bytes
    key_version: int
    kek_id: str
    commitment: bytes
    wrapped_dek: bytes
    algorithm: int = ALG_AES256_GCM_HKDF

    def __post_init__(self) -> None:
        if len(self.dek_id) != DEK_ID_BYTES:
            raise ValueError(f"dek_id must be {DEK_ID_BYTES} bytes")
        if not 1 <= self.key_version <= MAX_KEY_VERSION:
            raise ValueError("key_version must be in 1..2**32-1")
        if not 1 <= len(self.kek_id.encode("utf-8")) <= MAX_KEK_ID_BYTES:
            raise ValueError(f"kek_id must be 1..{MAX_KEK_ID_BYTES} UTF-8 bytes")
        if len(self.commitment) != COMMITMENT_BYTES:
            raise ValueError(f"commitment must be {COMMITMENT_BYTES} bytes")
        if not 1 <= len(self.wrapped_dek) <= MAX_WRAPPED_DEK_BYTES:
            raise ValueError(f"wrapped DEK must be 1..{MAX_WRAPPED_DEK_BYTES} bytes")
        if self.algorithm != ALG_AES256_GCM_HKDF:
            raise ValueError(f"unsupported algorithm id {self.algorithm}")

    def to_bytes(self) -> bytes:
        kek = self.kek_id.encode("utf-8")
        return b"".join(
            (
                _VERSION_BYTE,
                bytes([self.algorithm]),
                self.dek_id,
                _U32.pack(self.key_version),
                _U16.pack(len(kek)),
                kek,
                self.commitment,
                _U16.pack(len(self.wrapped_dek)),
                self.wrapped_dek,
            )
        )

    def with_wrapping(self, *, key_version: int, kek_id: str, wrapped_dek: bytes) -> Envelope:
        """The same DEK under another KEK: only the wrapping fields change."""
        return Envelope(self.dek_id, key_version, kek_id, self.commitment, wrapped_dek, self.algorithm)

    def __repr__(self) -> str:
        return f"Envelope(dek_id={self.dek_id.hex()}, key_version={self.key_version}, kek_id={self.kek_id!r})"


def parse_envelope(data: bytes) -> Envelope:
    """Parse envelope bytes, bounding every length; `DecryptionError` on any flaw."""
    try:
        view = memoryview(data)
        if len(view) < 1 or view[0] != FORMAT_VERSION:
            raise DecryptionError()
        if len(view) < 24 or view[1] != ALG_AES256_GCM_HKDF:
            raise DecryptionError()
        dek_id = bytes(view[2:18])
        (key_version,) = _U32.unpack_from(view, 18)
        (kek_len,) = _U16.unpack_from(view, 22)
        if not 1 <= kek_len <= MAX_KEK_ID_BYTES or key_version == 0:
            raise DecryptionError()
        pos = 24 + kek_len
        if len(view) < pos + COMMITMENT_BYTES + 2:
            raise DecryptionError()
        kek_id = bytes(view[24:pos]).decode("utf-8")
        commitment = bytes(view[pos : pos + COMMITMENT_BYTES])
        pos += COMMITMENT_BYTES
        (wrapped_len,) = _U16.unpack_from(view, pos)
        pos += 2
        if not 1 <= wrapped_len <= MAX_WRAPPED_DEK_BYTES or len(view) != pos + wrapped_len:
            raise DecryptionError()
        wrapped = bytes(view[pos:])
        return Envelope(dek_id, key_version, kek_id, commitment, wrapped)
    except DecryptionError:
        raise
    except (struct.error, UnicodeDecodeError, ValueError, TypeError, IndexError):
        raise DecryptionError() from None


@dataclass(frozen=True, slots=True)
class CellHeader:
    """The cleartext prefix of a cell ciphertext."""

    dek_id: bytes
    nonce: bytes


def parse_cell_header(cell: bytes) -> CellHeader:
    """Check version and length bounds of a cell; `DecryptionError` on any flaw."""
    if not isinstance(cell, (bytes, bytearray, memoryview)):
        raise DecryptionError()
    if len(cell) < 1 or cell[0] != FORMAT_VERSION:
        raise DecryptionError()
    if not CELL_OVERHEAD <= len(cell) <= CELL_OVERHEAD + MAX_CELL_PLAINTEXT:
        raise DecryptionError()
    return CellHeader(bytes(cell[1:17]), bytes(cell[17:CELL_HEADER_BYTES]))


def _hkdf(dek: bytes, dek_id: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=dek_id, info=info).derive(dek)


def derive_cell_key(dek: bytes, dek_id: bytes) -> bytes:
    """The AES-256-GCM key for cells sealed under this DEK."""
    if len(dek) != DEK_BYTES:
        raise ValueError(f"a DEK must be {DEK_BYTES} bytes")
    return _hkdf(dek, dek_id, _CELL_KEY_INFO)


def derive_commitment(dek: bytes, dek_id: bytes) -> bytes:
    """The key commitment stored in the envelope."""
    if len(dek) != DEK_BYTES:
        raise ValueError(f"a DEK must be {DEK_BYTES} bytes")
    return _hkdf(dek, dek_id, _COMMITMENT_INFO)


def commitment_matches(dek: bytes, envelope: Envelope) -> bool:
    """Constant-time check that `dek` is the key the envelope committed to."""
    return len(dek) == DEK_BYTES and hmac.compare_digest(derive_commitment(dek, envelope.dek_id), envelope.commitment)


def kms_context(*, dataset: str, partition: str, dek_id: bytes, key_version: int) -> dict[str, str]:
    """The encryption context a KMS binds a wrapped DEK to."""
    return {
        "keyturn:dataset": dataset,
        "keyturn:partition": partition,
        "keyturn:dek": dek_id.hex(),
        "keyturn:version": str(key_version),
    }


def cell_aad(
    *,
    dataset: str,
    partition: str,
    field: str,
    dek_id: bytes,
    value_type: str,
    bindings: dict[str, bytes] | None = None,
) -> dict[str, str | bytes]:
    """The associated-data context of one cell (encode with `encode_context`).

    `value_type` is the codec's descriptor of the plain type the cell's
    plaintext is serialized under (``arrow:...`` or ``avro:...``); binding it
    means a reader that reinterprets the bytes under another type fails to
    authenticate instead of returning wrong plaintext. `bindings` maps
    row-key column names to their serialized values; each becomes a pair
    ``row:<name>``.
    """
    if not isinstance(value_type, str) or not value_type:
        raise ValueError("value_type must be a non-empty str")
    aad: dict[str, str | bytes] = {
        "keyturn:format": "1",
        "dataset": dataset,
        "partition": partition,
        "field": field,
        "type": value_type,
        "dek": dek_id,
    }
    if bindings:
        for name, value in bindings.items():
            aad["row:" + name] = value
    return aad
