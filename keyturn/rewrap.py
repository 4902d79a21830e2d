"""Re-wrapping a DEK envelope under another key version.

Only the wrapping fields of the envelope change (key version, KEK id,
wrapped DEK); the dek_id and commitment stay, so every cell sealed under the
DEK stays byte-for-byte identical. The KMS does the work (AWS ReEncrypt), so
the plaintext DEK never enters this process on this path.
"""

from __future__ import annotations

from keyturn.errors import DecryptionError
from keyturn.format import kms_context, parse_envelope
from keyturn.kms.base import KmsBackend
from keyturn.scope import KekRef, Location

__all__ = ["rewrap_envelope"]


def rewrap_envelope(kms: KmsBackend, envelope_bytes: bytes, location: Location, target: KekRef) -> tuple[bytes, str]:
    """Return (new envelope bytes, KMS request id). `DecryptionError` if the envelope is bad."""
    envelope = parse_envelope(envelope_bytes)
    source = kms_context(
        dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=envelope.key_version
    )
    destination = kms_context(
        dataset=location.dataset, partition=location.partition, dek_id=envelope.dek_id, key_version=target.version
    )
    try:
        result = kms.rewrap(
            envelope.wrapped_dek,
            source_kek_id=envelope.kek_id,
            source_context=source,
            destination_kek_id=target.kek_id,
            destination_context=destination,
        )
    except (ValueError, TypeError):  # the KMS refused an argument that came from the data
        raise DecryptionError() from None
    new = envelope.with_wrapping(key_version=target.version, kek_id=target.kek_id, wrapped_dek=result.wrapped)
    return new.to_bytes(), result.request_id
